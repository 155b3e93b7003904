"""NLVR2 fine-tuning (Suhr et al. 2019), read from the files of lil-lab/nlvr, with BEiT-3's head.

Layout under ``data.root`` (the JSON-lines files may also sit in ``data/``)::

    train.json  dev.json  test1.json     one object per line: {"identifier": "train-10171-0-0",
                                         "sentence": ..., "label": "True"|"False", "directory": 99 (train)}
    images/train/<directory>/<identifier minus its last "-k">-img0.png, -img1.png
    dev/<...>-img0.png   test1/<...>-img0.png          (``images/dev``, ``images/test1`` also accepted)

Model (unilm/beit3 ``BEiT3ForVisualReasoning``): the sentence is encoded jointly with each image in one
pass of batch 2B; each pair gives ``[x[:, 0], x[:, n_vision]]`` (vision [CLS], text [bos]) and the two pairs
are concatenated (4D) into ``head``: LayerNorm → Linear(4D, 2D) → LayerNorm → GELU → Linear(2D, 2)
(``head.norm1/dense1/norm2/dense2``; both Linears scaled by ``task.head_init_scale`` after init).
Loss: cross-entropy; metric ``nlvr2_acc`` (×100).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mdm.tasks.base import (
    TASKS,
    Task,
    TaskModel,
    gather_records,
    run_inference,
    summarise,
    trunc_normal_init,
)
from mdm.tasks.common import (
    Problems,
    TextTokenizer,
    build_transform,
    encode_text,
    find_file,
    load_image,
    read_json_lines,
)
from mdm.tasks.config import TaskDataConfig

# Published split → candidate image folders under the root (first existing one wins).
IMAGE_DIRS = {
    "train": ("images/train", "train"),
    "dev": ("dev", "images/dev"),
    "test1": ("test1", "images/test1"),
}
LABELS = {"True": 1, "False": 0, True: 1, False: 0}


@dataclass
class NLVR2Record:
    identifier: str
    sentence: str
    image: str
    image2: str
    label: int


def _label(value: Any) -> int | None:
    """1 for "True"/true, 0 for "False"/false, None otherwise."""
    return LABELS.get(value) if isinstance(value, (str, bool)) else None


def score_nlvr2(
    predictions: Any, rows: list[dict[str, Any]], subset: bool = False, source: str = "<predictions>"
) -> dict[str, float]:
    """Accuracy ×100 of ``[{"identifier", "prediction": "True"|"False"}]`` against the rows of a split file.

    Args:
        predictions: the prediction list.
        rows: the split's JSON-lines objects (``identifier``, ``label``).
        subset: score only rows that have a prediction (default: every row needs one).
        source: name of the predictions, for messages.
    """
    if not isinstance(predictions, list):
        raise ValueError(f"{source}: expected a JSON list of {{'identifier', 'prediction'}} objects")
    pred: dict[str, int] = {}
    for i, p in enumerate(predictions):
        value = _label(p.get("prediction")) if isinstance(p, dict) and "identifier" in p else None
        if value is None:
            raise ValueError(
                f"{source}: record {i} must be {{'identifier': ..., 'prediction': 'True'|'False'}}, got {p!r}"
            )
        pred[str(p["identifier"])] = value
    truth = {str(r["identifier"]): _label(r.get("label")) for r in rows if "identifier" in r}
    unknown = [k for k in pred if k not in truth]
    missing = [k for k in truth if k not in pred]
    if unknown or (missing and not subset):
        raise ValueError(
            f"{source}: {len(missing)} row(s) without a prediction (e.g. {missing[:5]}), "
            f"{len(unknown)} prediction(s) for unknown identifiers (e.g. {unknown[:5]})"
        )
    scored = [k for k in truth if k in pred]
    if not scored:
        raise ValueError(f"{source}: nothing to score")
    correct = sum(pred[k] == truth[k] for k in scored)
    return {"nlvr2_acc": 100.0 * correct / len(scored), "num_examples": float(len(scored))}


def _image_dir(root: Path, split: str) -> Path:
    for d in IMAGE_DIRS.get(split, (split, f"images/{split}")):
        if (root / d).is_dir():
            return root / d
    return root / IMAGE_DIRS.get(split, (split,))[0]


def read_nlvr2_split(root: Path, split: str, problems: Problems) -> list[NLVR2Record]:
    """Records of ``<split>.json``; rows with a missing image or a malformed field go to ``problems``."""
    path = find_file(root, f"{split}.json", ("", "data", "nlvr2/data"))
    folder = _image_dir(root, split)
    records = []
    for line, row in read_json_lines(path):
        where = f"{path.name}:{line}"
        if not {"identifier", "sentence", "label"} <= set(row) or _label(row["label"]) is None:
            problems.add("bad_record", f"{where}: needs 'identifier', 'sentence' and a 'label' True/False")
            continue
        stem = "-".join(str(row["identifier"]).split("-")[:-1])  # drop the sentence index "-k"
        base = folder / str(row["directory"]) if "directory" in row else folder
        pair = [base / f"{stem}-img0.png", base / f"{stem}-img1.png"]
        missing = [str(p) for p in pair if not p.is_file()]
        if missing:
            problems.add("missing_image", f"{where} ({row['identifier']}): image {missing[0]} not found")
            continue
        records.append(
            NLVR2Record(
                str(row["identifier"]), str(row["sentence"]), str(pair[0]), str(pair[1]), LABELS[row["label"]]
            )
        )
    return records


class NLVR2Dataset(Dataset):
    """Items: ``image``, ``image2``, ``text``, ``text_padding_mask``, ``labels`` (0/1), ``identifier``."""

    def __init__(
        self,
        records: list[NLVR2Record],
        tokenizer: TextTokenizer,
        data: TaskDataConfig,
        train: bool,
        problems: Problems,
    ) -> None:
        self.records = records
        self.tokenizer = tokenizer
        self.max_text_len = data.max_text_len
        self.transform = build_transform(data, train)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        text, pad = encode_text(self.tokenizer, r.sentence, self.max_text_len)
        return {
            "image": self.transform(load_image(r.image)),  # the two images are augmented independently
            "image2": self.transform(load_image(r.image2)),
            "text": text,
            "text_padding_mask": pad,
            "labels": r.label,
            "identifier": r.identifier,
        }


class TwoLayerMLP(nn.Module):
    """LayerNorm → Linear → LayerNorm → GELU → Linear (unilm ``TwoLayerMLP`` names)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_in)
        self.dense1 = nn.Linear(dim_in, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.dense2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


class NLVR2Model(TaskModel):
    """Backbone + NLVR2 classifier over the two (image, sentence) pairs.

    Args:
        backbone: the Multiway Transformer.
        init_scale: factor applied to the head's Linear weights and biases after init.
    """

    HEAD_PREFIXES = ("head.",)

    def __init__(self, backbone: nn.Module, init_scale: float = 0.001, pool: str = "cls") -> None:
        super().__init__(backbone)
        self.pool = pool
        D = backbone.cfg.embed_dim
        self.head = TwoLayerMLP(4 * D, 2 * D, 2)
        trunc_normal_init(self.head)
        with torch.no_grad():
            for lin in (self.head.dense1, self.head.dense2):
                lin.weight.mul_(init_scale)
                lin.bias.mul_(init_scale)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 2) logits."""
        B = batch["text"].shape[0]
        image = torch.cat([batch["image"], batch["image2"]])  # (2B, 3, H, W)
        text = torch.cat([batch["text"], batch["text"]])  # (2B, T)
        pad = torch.cat([batch["text_padding_mask"], batch["text_padding_mask"]])
        x = self.backbone(image=image, text=text, text_padding_mask=pad)  # (2B, n_vision + T, D)
        n_vision = x.shape[1] - text.shape[1]
        vision, words = summarise(x, self.pool, n_vision, pad)  # (2B, D) each: [CLS] / [bos] or means
        pair = torch.cat([vision, words], dim=-1)  # (2B, 2D)
        return self.head(torch.cat([pair[:B], pair[B:]], dim=-1))  # (B, 4D) → (B, 2)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch).float()
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean() * 100.0
        return {"loss": loss, "nlvr2_loss": loss, "nlvr2_acc": acc.detach()}

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch)}


@TASKS.register("nlvr2")
class NLVR2Task(Task):
    """NLVR2 recipe."""

    METRICS = ("nlvr2_acc",)
    PRIMARY_METRIC = "nlvr2_acc"
    DEFAULT_SPLITS = {"train_splits": ["train"], "val_split": "dev", "test_split": "test1"}

    def build_model(self, backbone: nn.Module) -> NLVR2Model:
        return NLVR2Model(backbone, self.cfg.head_init_scale, self.cfg.pool)

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None) -> NLVR2Dataset:
        if tokenizer is None:
            raise ValueError("nlvr2 needs a text tokenizer")
        root = Path(self.data.root)
        specs = self.resolve_split(split)
        problems = Problems(f"nlvr2 {'+'.join(specs)} under {root}", self.data.on_error)
        records = [r for spec in specs for r in read_nlvr2_split(root, spec, problems)]
        problems.report()
        if not records:
            raise ValueError(f"nlvr2 split {split!r} ({', '.join(specs)}) under {root} has no usable record")
        return NLVR2Dataset(records, tokenizer, self.data, self.is_train(split), problems)

    def _predicted(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, int]:
        rows = []
        for batch, out in run_inference(model, loader):
            rows += zip(batch["identifier"], out["logits"].argmax(-1).tolist())
        return gather_records(rows)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        pred = self._predicted(model, loader)
        records = [r for r in loader.dataset.records if r.identifier in pred]  # type: ignore[attr-defined]
        correct = sum(pred[r.identifier] == r.label for r in records)
        return {"nlvr2_acc": 100.0 * correct / max(len(records), 1)}

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """``[{"identifier": str, "prediction": "True"|"False"}, ...]`` (lil-lab/nlvr's evaluation input)."""
        pred = self._predicted(model, loader)
        order = [r.identifier for r in loader.dataset.records]  # type: ignore[attr-defined]
        return [
            {"identifier": i, "prediction": "True" if pred[i] == 1 else "False"} for i in order if i in pred
        ]
