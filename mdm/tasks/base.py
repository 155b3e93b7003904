"""The contract between a fine-tuning recipe and the training engine.

A recipe is a :class:`Task` registered in :data:`TASKS`. The engine (``mdm finetune``) does::

    task = build_task(cfg.task, cfg.data)                  # reads label vocabularies from data.root
    model = task.build_model(backbone)                     # a TaskModel: .backbone + head
    train = task.build_dataset("train", text_tokenizer)    # map-style, records checked up front
    loader = DataLoader(train, batch_size=..., collate_fn=task.collate, ...)
    out = model(batch)                                     # {"loss", "<task>_loss", ...}
    metrics = task.evaluate(model, val_loader)             # {"vqa_acc": ..., ...}
    rows = task.predict(model, test_loader)                # [{"question_id": ..., "answer": ...}, ...]
    save_task_model(out_dir, model, task)                  # for `mdm evaluate` / `mdm predict`

``evaluate`` / ``predict`` run on every rank of a distributed job with a distributed sampler; results
are gathered (duplicates from sampler padding removed) and every rank returns the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mdm.distributed.ops import all_gather_object
from mdm.registry import Registry
from mdm.tasks.common import TextTokenizer, collate
from mdm.tasks.config import TaskConfig, TaskDataConfig

log = logging.getLogger(__name__)

#: Task name → :class:`Task` subclass.
TASKS: Registry = Registry("task")


def summarise(
    x: torch.Tensor, pool: str, n_vision: int, text_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-modality summaries of a backbone output ``[CLS, patches | text]`` for a task head.

    Args:
        x: (B, n_vision + T, D) backbone output; ``n_vision`` = 1 + patches, or 0 for text alone.
        pool: ``cls`` (vision [CLS] ``x[:, 0]``, text [bos] ``x[:, n_vision]``) or ``mean`` (mean of the
            patch tokens; mean of the real text tokens).
        n_vision: how many leading positions are vision tokens.
        text_padding_mask: (B, T) bool, True at padding (None: no padding).

    Returns:
        (vision (B, D) or None without image, text (B, D) or None without text).
    """
    T = x.shape[1] - n_vision
    vision = text = None
    if pool == "cls":
        vision = x[:, 0] if n_vision else None
        text = x[:, n_vision] if T else None
    elif pool == "mean":
        vision = x[:, 1:n_vision].mean(1) if n_vision else None
        if T:
            words = x[:, n_vision:]
            keep = (
                torch.ones(words.shape[:2], dtype=words.dtype, device=words.device)
                if text_padding_mask is None
                else (~text_padding_mask).to(words.dtype)
            ).unsqueeze(-1)  # (B, T, 1)
            text = (words * keep).sum(1) / keep.sum(1).clamp(min=1.0)
    else:
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    return vision, text


def trunc_normal_init(module: nn.Module) -> None:
    """unilm ``_init_weights`` for new heads: Linear ~ N(0, 0.02) truncated at ±0.02, bias 0; LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TaskModel(nn.Module):
    """A backbone plus a task head. Subclasses set :attr:`HEAD_PREFIXES` (their new parameters).

    ``forward(batch)`` returns the training losses; ``infer(batch)`` the outputs evaluation needs.

    Args:
        backbone: a :class:`~mdm.models.MultiwayTransformer`.
    """

    #: Names of the parameters a task adds (unilm's names, so that export maps them 1:1).
    HEAD_PREFIXES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def num_layers(self) -> int:
        """Depth of the backbone (for layer-wise lr decay)."""
        return self.backbone.num_layers

    def head_parameter_names(self) -> list[str]:
        """Names of the task's own parameters (candidates for a head lr multiplier)."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.HEAD_PREFIXES)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Backbone exemptions (prefixed) plus the task's own (e.g. ``logit_scale``)."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def unwrap(model: nn.Module) -> nn.Module:
    """The TaskModel inside a DDP / DeepSpeed wrapper."""
    while not isinstance(model, TaskModel) and hasattr(model, "module"):
        model = model.module
    return model


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Moves the tensors of a batch to ``device``."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_inference(model: nn.Module, loader: Iterable[dict[str, Any]]) -> Iterator[tuple[dict, dict]]:
    """Yields ``(batch, outputs)`` of ``model.infer`` over ``loader`` in eval mode, no grad."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, device)
                yield batch, model.infer(batch)
    finally:
        model.train(was_training)


def gather_records(records: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Merges ``(key, value)`` rows from all ranks into one dict (sampler duplicates collapse by key)."""
    merged: dict[Any, Any] = {}
    for part in all_gather_object(records):
        merged.update(part)
    return merged


class Task:
    """A fine-tuning recipe. Subclasses implement the abstract methods and register in :data:`TASKS`.

    Args:
        cfg: the ``task:`` config section.
        data: the ``data:`` config section.
        state: what :meth:`state` returned when the model was saved (label vocabularies); ``None`` reads
            them from ``data.root``.
    """

    #: Metric names returned by :meth:`evaluate`.
    METRICS: ClassVar[tuple[str, ...]] = ()
    #: The metric that selects the best checkpoint (higher is better).
    PRIMARY_METRIC: ClassVar[str] = ""
    #: Default ``data`` split fields for this task.
    DEFAULT_SPLITS: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: TaskConfig, data: TaskDataConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self._state = dict(state) if state else {}

    # -- splits ------------------------------------------------------------------------------
    def resolve_split(self, split: str) -> list[str]:
        """``train``/``val``/``test`` → the configured published split names; others pass through."""
        d = self.DEFAULT_SPLITS
        if split == "train":
            return list(self.data.train_splits or d["train_splits"])
        if split == "val":
            return [self.data.val_split or d["val_split"]]
        if split == "test":
            return [self.data.test_split or d["test_split"]]
        return [split]

    def is_train(self, split: str) -> bool:
        return split == "train"

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-serialisable facts the model depends on (answer / class vocabularies)."""
        return dict(self._state)

    # -- engine contract ---------------------------------------------------------------------
    def build_model(self, backbone: nn.Module) -> TaskModel:  # pragma: no cover - abstract
        """The task model around ``backbone``."""
        raise NotImplementedError

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None) -> torch.utils.data.Dataset:
        """A map-style dataset of ``split`` (records and image files are checked here)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch dict from dataset items (keys of docs/ARCHITECTURE.md plus task keys)."""
        return collate(samples)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics of ``model`` on the loader's split (names in :attr:`METRICS`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per-record predictions in the task's submission format."""
        raise NotImplementedError  # pragma: no cover - abstract


def build_task(cfg: TaskConfig, data: TaskDataConfig, state: dict[str, Any] | None = None) -> Task:
    """The registered task named ``cfg.name``."""
    import mdm.tasks  # noqa: F401  (registers the tasks)

    return TASKS.get(cfg.name)(cfg, data, state)
