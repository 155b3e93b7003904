"""VQAv2 fine-tuning: BEiT-3's VQA head and loss (unilm/beit3 ``BEiT3ForVisualQuestionAnswering``).

The joint image+question sequence is encoded; the **vision [CLS]** output ``x[:, 0]`` goes through a pooler
(LayerNorm → Linear(D, D) → tanh, ``pooler.norm`` / ``pooler.dense``) and an MLP ``head`` (Linear(D, 2D) →
LayerNorm → GELU → Linear(2D, #answers), ``head.0..3``). Loss: binary cross-entropy with logits against the
soft targets, mean over entries × #answers (ViLT convention). Validation reports

* ``vqa_score`` — ViLT/unilm's training-time score: the soft target of the arg-max answer, mean × 100
  over the evaluated questions (unilm's validation split also drops questions without an in-vocabulary
  answer, which raises its score a little);
* ``vqa_acc`` — the official VQA accuracy (:mod:`mdm.tasks.vqa_eval`) of the arg-max answer strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.tasks.base import (
    TASKS,
    Task,
    TaskModel,
    gather_records,
    run_inference,
    summarise,
    trunc_normal_init,
)
from mdm.tasks.common import Problems, TextTokenizer
from mdm.tasks.vqa_eval import evaluate_vqa
from mdm.tasks.vqav2_data import VQADataset, build_answer_vocab, read_vqa_split


class Pooler(nn.Module):
    """LayerNorm → Linear(D, D) → tanh on one token (unilm ``Pooler``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, D)."""
        return torch.tanh(self.dense(self.norm(x)))


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ViLT's VQA score ×100: mean soft target of the arg-max answer."""
    picked = targets.gather(1, logits.argmax(dim=1, keepdim=True))  # (B, 1)
    return picked.mean() * 100.0


class VQAModel(TaskModel):
    """Backbone + VQA pooler and classifier over the answer vocabulary.

    Args:
        backbone: the Multiway Transformer.
        num_answers: size of the answer vocabulary (3129 on VQAv2).
    """

    HEAD_PREFIXES = ("pooler.", "head.")

    def __init__(self, backbone: nn.Module, num_answers: int, pool: str = "cls") -> None:
        super().__init__(backbone)
        self.pool = pool
        D = backbone.cfg.embed_dim
        self.pooler = Pooler(D)
        self.head = nn.Sequential(
            nn.Linear(D, 2 * D), nn.LayerNorm(2 * D), nn.GELU(), nn.Linear(2 * D, num_answers)
        )
        trunc_normal_init(self.pooler)
        trunc_normal_init(self.head)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, num_answers) answer logits."""
        x = self.backbone(
            image=batch["image"], text=batch["text"], text_padding_mask=batch["text_padding_mask"]
        )
        if self.pool == "cls":
            return self.head(self.pooler(x[:, 0]))  # vision [CLS] of the joint sequence
        vision, text = summarise(
            x, self.pool, x.shape[1] - batch["text"].shape[1], batch["text_padding_mask"]
        )
        return self.head(self.pooler((vision + text) / 2))  # the mean of the two modalities' mean tokens

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training losses: ``loss`` = ``vqa_loss``, plus ``vqa_score`` of the batch."""
        logits = self.logits(batch).float()
        targets = batch["targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        return {"loss": loss, "vqa_loss": loss, "vqa_score": vqa_score(logits.detach(), targets)}

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch)}


@TASKS.register("vqav2")
class VQAv2Task(Task):
    """VQAv2 recipe: readers of the published files, answer vocabulary, head, metrics, EvalAI output."""

    METRICS = ("vqa_acc", "vqa_score")
    PRIMARY_METRIC = "vqa_acc"
    DEFAULT_SPLITS = {
        "train_splits": ["train2014", "val2014:trainable"],
        "val_split": "val2014:rest",
        "test_split": "test-dev2015",
    }

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary (label index → answer string)."""
        if "answers" not in self._state:
            self._state["answers"] = build_answer_vocab(Path(self.data.root), self.data.answer_min_count)
        return self._state["answers"]

    def build_model(self, backbone: nn.Module) -> VQAModel:
        return VQAModel(backbone, len(self.answers), self.cfg.pool)

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None) -> VQADataset:
        if tokenizer is None:
            raise ValueError("vqav2 needs a text tokenizer")
        root = Path(self.data.root)
        specs = self.resolve_split(split)
        problems = Problems(f"vqav2 {'+'.join(specs)} under {root}", self.data.on_error)
        to_label = {a: i for i, a in enumerate(self.answers)}
        records = []
        for spec in specs:
            records += read_vqa_split(root, spec, self.data, to_label, self.is_train(split), problems)
        problems.report()
        if not records:
            raise ValueError(
                f"vqav2 split {split!r} ({', '.join(specs)}) under {root} has no usable question"
            )
        return VQADataset(records, len(self.answers), tokenizer, self.data, self.is_train(split), problems)

    def _predicted_labels(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[int, int]:
        rows = []
        for batch, out in run_inference(model, loader):
            rows += zip(batch["question_id"].tolist(), out["logits"].argmax(-1).tolist())
        return gather_records(rows)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        ds: VQADataset = loader.dataset  # type: ignore[attr-defined]
        if not ds.annotated:
            raise ValueError("this VQAv2 split has no annotations; use predict")
        pred = self._predicted_labels(model, loader)
        records = [r for r in ds.records if r.question_id in pred]
        score = 0.0
        for r in records:
            label = pred[r.question_id]
            score += r.scores[r.labels.index(label)] if label in r.labels else 0.0
        annotations = [
            {
                "question_id": r.question_id,
                "answer_type": r.answer_type,
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(r.answers or ())],
            }
            for r in records
        ]
        answers = [{"question_id": q, "answer": self.answers[label]} for q, label in pred.items()]
        out = evaluate_vqa(answers, annotations, subset=True, source="vqav2 evaluation")
        out["vqa_score"] = 100.0 * score / max(len(records), 1)
        return out

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The EvalAI submission: ``[{"question_id": int, "answer": str}, ...]`` in dataset order."""
        pred = self._predicted_labels(model, loader)
        order = [r.question_id for r in loader.dataset.records]  # type: ignore[attr-defined]
        return [{"question_id": q, "answer": self.answers[pred[q]]} for q in order if q in pred]
