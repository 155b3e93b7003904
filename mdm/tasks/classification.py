"""Image classification from ImageNet-style class folders, with BEiT-3's classification head.

Layout: ``root/<split>/<class name>/<image file>`` (``train``, ``val``). Class indices follow the sorted
folder names of the first training split (torchvision ``ImageFolder`` / unilm ``_find_classes``); a folder
of an evaluation split that is not a training class is skipped and counted.

Model (unilm/beit3 ``BEiT3ForImageClassification``): image-only pass, mean of the patch tokens (CLS
excluded) → ``fc_norm`` (LayerNorm) → ``head`` (Linear(D, C), scaled by ``task.head_init_scale`` after
init). Loss: cross-entropy with optional label smoothing. Metrics ``top1`` / ``top5`` (×100). Mixup/CutMix
of the ImageNet recipe are not part of this recipe.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mdm.tasks.base import TASKS, Task, TaskModel, gather_records, run_inference, trunc_normal_init
from mdm.tasks.common import Problems, TextTokenizer, build_transform, load_image
from mdm.tasks.config import TaskDataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_classes(folder: Path) -> list[str]:
    """Sorted sub-folder names of ``folder``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: class folder directory not found")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder}: no class sub-folders")
    return classes


def read_image_folder(folder: Path, class_index: dict[str, int], problems: Problems) -> list[tuple[str, int]]:
    """(path, label) for every image file under ``folder/<class>/`` (sorted, recursive)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: split directory not found")
    items = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in class_index:
            problems.add("unknown_class", f"{d}: class {d.name!r} is not a training class")
            continue
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((str(f), class_index[d.name]))
    return items


class ImageFolderDataset(Dataset):
    """Items: ``image``, ``labels`` (class index), ``path``."""

    def __init__(
        self, items: list[tuple[str, int]], data: TaskDataConfig, train: bool, problems: Problems
    ) -> None:
        self.items = items
        self.transform = build_transform(data, train)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.items[i]
        return {"image": self.transform(load_image(path)), "labels": label, "path": path}


class ClassificationModel(TaskModel):
    """Backbone + mean-pooled patch tokens → LayerNorm → Linear.

    Args:
        backbone: the Multiway Transformer.
        num_classes: number of classes.
        init_scale: factor applied to the head's weights and bias after init.
        label_smoothing: cross-entropy label smoothing.
    """

    HEAD_PREFIXES = ("fc_norm.", "head.")

    def __init__(
        self, backbone: nn.Module, num_classes: int, init_scale: float = 0.001, label_smoothing: float = 0.0
    ):
        super().__init__(backbone)
        D = backbone.cfg.embed_dim
        self.fc_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, num_classes)
        self.label_smoothing = label_smoothing
        trunc_normal_init(self.fc_norm)
        trunc_normal_init(self.head)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        x = self.backbone(image=batch["image"])  # (B, 1 + P, D)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch).float()
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean() * 100.0
        return {"loss": loss, "cls_loss": loss, "top1": acc.detach()}

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"logits": self.logits(batch)}


@TASKS.register("classification")
class ClassificationTask(Task):
    """Image classification recipe (ImageNet-1k style)."""

    METRICS = ("top1", "top5")
    PRIMARY_METRIC = "top1"
    DEFAULT_SPLITS = {"train_splits": ["train"], "val_split": "val", "test_split": "val"}

    @property
    def classes(self) -> list[str]:
        """Class names (label index → folder name)."""
        if "classes" not in self._state:
            first = self.resolve_split("train")[0]
            self._state["classes"] = list_classes(Path(self.data.root) / first)
        return self._state["classes"]

    def build_model(self, backbone: nn.Module) -> ClassificationModel:
        n = self.cfg.num_classes or len(self.classes)
        return ClassificationModel(backbone, n, self.cfg.head_init_scale, self.cfg.label_smoothing)

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None = None) -> ImageFolderDataset:
        root = Path(self.data.root)
        specs = self.resolve_split(split)
        problems = Problems(f"classification {'+'.join(specs)} under {root}", self.data.on_error)
        index = {c: i for i, c in enumerate(self.classes)}
        items = [it for spec in specs for it in read_image_folder(root / spec, index, problems)]
        problems.report()
        if not items:
            raise ValueError(f"classification split {split!r} ({', '.join(specs)}) under {root} has no image")
        return ImageFolderDataset(items, self.data, self.is_train(split), problems)

    def _topk(self, model: nn.Module, loader: Iterable[dict[str, Any]], k: int) -> dict[str, list[int]]:
        rows = []
        for batch, out in run_inference(model, loader):
            top = out["logits"].topk(min(k, out["logits"].shape[1]), dim=1).indices
            rows += zip(batch["path"], top.tolist())
        return gather_records(rows)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        top = self._topk(model, loader, 5)
        items = [(p, y) for p, y in loader.dataset.items if p in top]  # type: ignore[attr-defined]
        n = max(len(items), 1)
        return {
            "top1": 100.0 * sum(top[p][0] == y for p, y in items) / n,
            "top5": 100.0 * sum(y in top[p][:5] for p, y in items) / n,
        }

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """``[{"image": path, "label": class, "top5": [classes]}, ...]``."""
        top = self._topk(model, loader, 5)
        names = self.classes
        paths = [p for p, _ in loader.dataset.items if p in top]  # type: ignore[attr-defined]
        return [{"image": p, "label": names[top[p][0]], "top5": [names[i] for i in top[p]]} for p in paths]
