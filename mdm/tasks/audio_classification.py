"""Audio classification: ESC-50 (single-label, 5-fold cross-validation) and AudioSet-style (multi-label, mAP).

Data: :mod:`mdm.tasks.audio_data` reads both layouts as published. Training follows the AudioMAE
fine-tuning recipe (Huang et al. 2022, facebookresearch/AudioMAE ``main_finetune_as.py`` / ``dataset.py``):
SpecAugment (``data.audio.freqm`` 48, ``timem`` 192 per 1024 frames), batch mixup with λ ~ Beta(0.5, 0.5)
on the filterbanks and the (label-smoothed) targets as timm's ``Mixup(mode="batch")``; AudioMAE's
additional waveform-level mixup inside its dataset is not reproduced.

Model: any backbone with the audio API — ``backbone(audio=(B, T, F), audio_padding_mask=(B, T) | None)`` —
either a Multiway Transformer with an audio expert (output (B, 1 + P, D), audio [CLS] first) or an
encoder without [CLS] such as :class:`mdm.models.beats.BEATsEncoder` (``has_audio_cls = False``; output
``(features (B, P, D), patch padding (B, P))``). ``task.pool``: ``mean`` (the mean of the non-padding
patch tokens, AudioMAE's ``global_pool`` and BEATs' predictor), ``max`` (their element-wise maximum),
``mean_max`` (the sum of the two, PANNs' global pooling: Kong et al. 2020) or ``cls``. A short event in a
long clip is diluted by the mean and kept by the maximum (docs/audio.md §7.3). Head: ``fc_norm`` (LayerNorm)
→ ``head`` (Linear(D, C), scaled by ``task.head_init_scale``). Loss: cross-entropy (soft targets under
mixup, label smoothing otherwise) or BCE for multi-label. Metrics: ``acc`` (top-1 ×100) and ``mAP``
(×100; macro average precision over the classes that have a positive, as AudioSet papers compute it with
``sklearn.metrics.average_precision_score(average=None)``).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.data.audio import PATCH, collate_fbanks, patch_padding_mask
from mdm.tasks.audio_data import (
    ClipDataset,
    ClipRecord,
    detect_layout,
    read_class_index,
    read_esc50,
    read_segments,
)
from mdm.tasks.base import TASKS, Task, TaskModel, gather_records, run_inference, trunc_normal_init
from mdm.tasks.common import Problems, TextTokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- metrics
def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision of one class: Σ (R_k − R_{k−1}) · P_k over the distinct score thresholds
    (tied scores form one threshold), as ``sklearn.metrics.average_precision_score``."""
    s = scores.double()
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], target[order].double()
    last = torch.cat(
        [torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([len(s) - 1])]
    )  # end of each tie
    tps, fps = torch.cumsum(t, 0)[last], torch.cumsum(1 - t, 0)[last]
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return float(((recall - torch.cat([recall.new_zeros(1), recall[:-1]])) * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[float | None]]:
    """(mAP over the classes with at least one positive, per-class AP (None without positives)).

    Args:
        scores: (N, C) scores (logits or probabilities: only the order matters).
        targets: (N, C) binary targets.
    """
    per_class: list[float | None] = []
    for c in range(scores.shape[1]):
        pos = targets[:, c] > 0.5
        per_class.append(average_precision(scores[:, c], pos) if pos.any() else None)
    present = [ap for ap in per_class if ap is not None]
    return (sum(present) / len(present) if present else 0.0), per_class


# ---------------------------------------------------------------------------------------------- batches
def mixup(batch: dict[str, Any], alpha: float, num_classes: int, smoothing: float) -> dict[str, Any]:
    """timm ``Mixup(mode="batch")``: one λ ~ Beta(α, α) per batch, mixing each sample with the batch
    reversed; adds ``soft_target`` (B, C) (label-smoothed one-hot or multi-hot, mixed alike).

    λ is drawn from torch's global RNG, which the DataLoader seeds per worker (as the image transforms).
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    out = dict(batch)
    out["audio"] = batch["audio"] * lam + batch["audio"].flip(0) * (1.0 - lam)
    if "audio_padding_mask" in batch:  # a frame stays padding only when it is padding in both clips
        out["audio_padding_mask"] = batch["audio_padding_mask"] & batch["audio_padding_mask"].flip(0)
    if "label" in batch:
        off = smoothing / num_classes
        target = torch.full((len(batch["label"]), num_classes), off).scatter_(
            1, batch["label"][:, None], 1 - smoothing + off
        )
    else:
        target = batch["labels"].float()
    out["soft_target"] = target * lam + target.flip(0) * (1.0 - lam)
    out["mixup_lambda"] = lam
    return out


class ClipCollate:
    """Stacks clips (padding to the longest), and mixes training batches up (picklable for workers)."""

    def __init__(
        self, pad_value: float, num_classes: int, alpha: float, prob: float, smoothing: float
    ) -> None:
        self.pad_value, self.num_classes, self.alpha, self.prob, self.smoothing = (
            pad_value,
            num_classes,
            alpha,
            prob,
            smoothing,
        )

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("collate: empty batch")
        audio, pad = collate_fbanks(
            [s["audio"] for s in samples], [s["n_frames"] for s in samples], self.pad_value
        )
        batch: dict[str, Any] = {
            "audio": audio,
            "key": [s["key"] for s in samples],
            "path": [s["path"] for s in samples],
        }
        if pad is not None:
            batch["audio_padding_mask"] = pad
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        else:
            batch["labels"] = torch.stack([s["labels"] for s in samples])
        if samples[0].get("mixup") and self.alpha > 0 and float(torch.rand(())) < self.prob:
            batch = mixup(batch, self.alpha, self.num_classes, self.smoothing)
        return batch


# ---------------------------------------------------------------------------------------------- model
def pooled_audio_features(backbone: nn.Module, batch: dict[str, Any], pool: str) -> torch.Tensor:
    """(B, D) summary of the backbone's audio tokens (see the module docstring)."""
    audio, frames = batch["audio"], batch.get("audio_padding_mask")
    out = backbone(audio=audio, audio_padding_mask=frames)
    P = (audio.shape[1] // PATCH) * (audio.shape[2] // PATCH)
    if getattr(backbone, "has_audio_cls", True):
        cls, patches = out[:, 0], out[:, 1 : 1 + P]  # (B, D), (B, P, D)
        pad = None if frames is None else patch_padding_mask(frames, audio.shape[2] // PATCH)
    else:
        (patches, pad), cls = out, None
    if pool == "cls":
        if cls is None:
            raise ValueError(
                f"task.pool=cls: {type(backbone).__name__} has no audio [CLS]; use task.pool=mean"
            )
        return cls
    if pool not in ("mean", "max", "mean_max"):
        raise ValueError(f"task.pool must be 'mean', 'max', 'mean_max' or 'cls', got {pool!r}")
    if pad is None and pool == "mean":
        return patches.mean(1)
    if pad is None:
        pad = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
    keep = (~pad).unsqueeze(-1).to(patches.dtype)  # (B, P, 1)
    mean = (patches * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, D)
    if pool == "mean":
        return mean
    # a clip of nothing but padding has no maximum: 0 (its mean is 0 too)
    peak = patches.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(1)  # (B, D)
    peak = torch.where(keep.sum(1) > 0, peak, torch.zeros_like(peak))
    return peak if pool == "max" else mean + peak


class AudioClassificationModel(TaskModel):
    """Backbone + pooled audio tokens → ``fc_norm`` → ``head``.

    Args:
        backbone: a backbone with the audio API.
        num_classes: classes C.
        multilabel: BCE on multi-hot targets instead of cross-entropy.
        pool: ``mean``, ``max``, ``mean_max`` or ``cls`` (see the module docstring).
        init_scale: factor on the head's weights and bias after init.
        label_smoothing: cross-entropy label smoothing (without mixup; with mixup it is in the targets).
    """

    HEAD_PREFIXES = ("fc_norm.", "head.")

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        multilabel: bool,
        pool: str = "mean",
        init_scale: float = 0.001,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(backbone)
        D = getattr(backbone, "num_features", None) or backbone.cfg.embed_dim
        self.fc_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, num_classes)
        self.multilabel, self.pool, self.label_smoothing = multilabel, pool, label_smoothing
        trunc_normal_init(self.fc_norm)
        trunc_normal_init(self.head)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head(self.fc_norm(pooled_audio_features(self.backbone, batch, self.pool)))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch).float()
        if self.multilabel:
            target = batch.get("soft_target", batch.get("labels"))
            loss = F.binary_cross_entropy_with_logits(logits, target.float())
            return {"loss": loss, "audio_cls_loss": loss}
        if "soft_target" in batch:
            loss = -(batch["soft_target"] * F.log_softmax(logits, -1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean() * 100.0
        return {"loss": loss, "audio_cls_loss": loss, "acc": acc.detach()}

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch)}


# ---------------------------------------------------------------------------------------------- task
@TASKS.register("audio_classification")
class AudioClassificationTask(Task):
    """ESC-50 / AudioSet-style audio classification (see the module docstring)."""

    METRICS = ("acc", "mAP")
    PRIMARY_METRIC = "acc"
    DEFAULT_SPLITS = {
        "train_splits": ["balanced_train_segments"],
        "val_split": "eval_segments",
        "test_split": "eval_segments",
    }

    @property
    def layout(self) -> str:
        if "layout" not in self._state:
            self._state["layout"] = detect_layout(Path(self.data.root), self.data.audio)
        return self._state["layout"]

    @property
    def multilabel(self) -> bool:
        return self.layout == "audioset"

    @property
    def classes(self) -> list[str]:
        """Class names (index → ESC-50 category / AudioSet display name)."""
        if "classes" not in self._state:
            root = Path(self.data.root)
            if self.layout == "esc50":
                self._state["classes"] = read_esc50(
                    root, self.data.audio.audio_dir, Problems(str(root)), set()
                )[1]
            else:
                mids, names = read_class_index(root / self.data.audio.class_index_csv)
                self._state.update(classes=names, mids=mids)
        return self._state["classes"]

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes or len(self.classes)

    def resolve_split(self, split: str) -> list[str]:
        """ESC-50: ``train`` = every fold but ``data.fold``, ``val``/``test`` = ``fold<k>`` (or the configured
        names); ``fold<k>`` and ``all`` pass through. AudioSet: segment CSV names."""
        if self.layout != "esc50":
            return super().resolve_split(split)
        configured = {
            "train": self.data.train_splits,
            "val": [self.data.val_split],
            "test": [self.data.test_split],
        }
        if split in configured and configured[split] and all(configured[split]):
            return list(configured[split])
        if split in configured:
            k = self.data.fold
            if not 1 <= k <= 5:
                raise ValueError(
                    f"ESC-50 under {self.data.root}: set data.fold to the held-out fold 1..5 "
                    "(data.fold=0 runs all five folds through `mdm finetune`)"
                )
            return [f"fold{j}" for j in range(1, 6) if j != k] if split == "train" else [f"fold{k}"]
        return [split]

    def _records(self, specs: list[str], problems: Problems) -> list[ClipRecord]:
        root = Path(self.data.root)
        audio = self.data.audio
        if self.layout == "esc50":
            folds: set[int] | None = None if specs == ["all"] else set()
            for s in specs if folds is not None else []:
                if not (s.startswith("fold") and s[4:].isdigit()):
                    raise ValueError(f"ESC-50 split {s!r}: expected fold1..fold5 or all")
                folds.add(int(s[4:]))  # type: ignore[union-attr]
            return read_esc50(root, audio.audio_dir, problems, folds)[0]
        mids = self._state.get("mids") or read_class_index(root / audio.class_index_csv)[0]
        return [
            r for s in specs for r in read_segments(root / f"{s}.csv", mids, root / audio.audio_dir, problems)
        ]

    def build_model(self, backbone: nn.Module) -> AudioClassificationModel:
        return AudioClassificationModel(
            backbone,
            self.num_classes,
            self.multilabel,
            self.cfg.pool,
            self.cfg.head_init_scale,
            self.cfg.label_smoothing,
        )

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None = None) -> ClipDataset:
        self.data.audio.frontend.validate()
        specs = self.resolve_split(split)
        problems = Problems(
            f"audio_classification {'+'.join(specs)} under {self.data.root}", self.data.on_error
        )
        records = self._records(specs, problems)
        problems.report()
        if not records:
            raise ValueError(
                f"audio_classification split {split!r} ({', '.join(specs)}) under {self.data.root} has no clip"
            )
        ds = ClipDataset(records, self.num_classes, self.multilabel, self.data.audio, self.is_train(split))
        ds.problems = problems  # type: ignore[attr-defined]
        return ds

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        a = self.data.audio
        return ClipCollate(
            a.frontend.pad_value, self.num_classes, a.mixup, a.mixup_prob, self.cfg.label_smoothing
        )(samples)

    def _scores(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
        rows = []
        for batch, out in run_inference(model, loader):
            rows += zip(batch["key"], out["logits"].float().cpu().tolist())
        return gather_records(rows)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        scores = self._scores(model, loader)
        items = [r for r in loader.dataset.items if r.key in scores]  # type: ignore[attr-defined]
        if not items:
            return {"acc": 0.0, "mAP": 0.0, "num_clips": 0.0}
        s = torch.tensor([scores[r.key] for r in items])  # (N, C)
        C = s.shape[1]
        if self.multilabel:
            targets = torch.zeros(len(items), C)
            for i, r in enumerate(items):
                targets[i, list(r.target)] = 1.0  # type: ignore[arg-type]
            acc = 100.0 * float(targets[torch.arange(len(items)), s.argmax(1)].mean())  # top-1 is a positive
        else:
            labels = torch.tensor([int(r.target) for r in items])  # type: ignore[arg-type]
            targets = F.one_hot(labels, C).float()
            acc = 100.0 * float((s.argmax(1) == labels).float().mean())
        mAP, _ = mean_average_precision(s, targets)
        return {"acc": acc, "mAP": 100.0 * mAP, "num_clips": float(len(items))}

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Single-label: ``{"audio", "label", "top5"}``; multi-label: ``{"audio", "labels" (p > 0.5), "top5"}``."""
        scores = self._scores(model, loader)
        names = self.classes
        rows = []
        for r in loader.dataset.items:  # type: ignore[attr-defined]
            if r.key not in scores:
                continue
            s = torch.tensor(scores[r.key])
            top = s.topk(min(5, len(s))).indices.tolist()
            row: dict[str, Any] = {"audio": r.path, "top5": [names[i] for i in top]}
            if self.multilabel:
                row["labels"] = [names[i] for i in torch.nonzero(s.sigmoid() > 0.5).flatten().tolist()]
            else:
                row["label"] = names[top[0]]
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------- folds
def wants_cross_validation(cfg: Any) -> bool:
    """An ``audio_classification`` run on ESC-50 with ``data.fold: 0``."""
    if cfg.task.name != "audio_classification" or cfg.data.fold != 0:
        return False
    return detect_layout(Path(cfg.data.root), cfg.data.audio) == "esc50"


def run_cross_validation(
    cfg: Any, run_one: Callable[[Any, str | None], dict[str, float]], metrics_json: str | None = None
) -> dict[str, float]:
    """Runs ``run_one`` on folds 1..5 (``<out_dir>/fold<k>``), then reports per-fold and mean metrics.

    A fold whose ``model/config.json`` already holds metrics is not trained again, so an interrupted
    cross-validation resumes where it stopped. Returns ``{}`` when a fold did not finish.
    """
    from mdm.distributed.ops import rank

    base = Path(cfg.train.out_dir)
    per_fold: dict[int, dict[str, float]] = {}
    for k in range(1, 6):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold = k
        fold_cfg.train.out_dir = str(base / f"fold{k}")
        saved = Path(fold_cfg.train.out_dir) / "model" / "config.json"
        if saved.is_file() and json.loads(saved.read_text()).get("metrics"):
            per_fold[k] = json.loads(saved.read_text())["metrics"]
            log.info("fold %d: already trained (%s)", k, saved)
            continue
        metrics = run_one(fold_cfg, None)
        if not metrics:
            return {}
        per_fold[k] = metrics
    result: dict[str, float] = {}
    for name in ("acc", "mAP"):
        values = [per_fold[k][name] for k in sorted(per_fold) if name in per_fold[k]]
        result.update({f"fold{k}_{name}": per_fold[k][name] for k in sorted(per_fold) if name in per_fold[k]})
        if values:
            result[name] = sum(values) / len(values)
    if rank() == 0:
        base.mkdir(parents=True, exist_ok=True)
        (base / "cv_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if metrics_json:
            Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
            Path(metrics_json).write_text(json.dumps(result, indent=2) + "\n")
        folds = "  ".join(f"fold{k}={per_fold[k].get('acc', 0.0):.2f}" for k in sorted(per_fold))
        print(
            f"audio_classification 5-fold CV: acc={result.get('acc', 0.0):.2f}  mAP={result.get('mAP', 0.0):.2f}  ({folds})"
        )
    return result
