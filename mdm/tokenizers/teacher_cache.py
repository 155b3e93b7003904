"""Teacher features computed once per training image, so VQ-KD training does not run the teacher every step.

A pretrained teacher (DINOv2 ViT-S/14 at 224 px) costs far more than a tiny tokenizer's step on a CPU.
With ``teacher.cache: true`` the training images are loaded whole (resized to the tokenizer's
``img_size``, no random crop), the teacher runs once over them — and once over their mirror images when
``data.flip`` is on, so a flipped training image gets the features of the flipped image, not mirrored
features — and every step draws (images, features) from memory. Random resized crops would need the
teacher on every new crop, so a cached run refuses ``data.crop_scale`` other than ``[1, 1]``.

``teacher.cache_file`` keeps the features on disk (safetensors) under a key hashed from the teacher
description, the code grid and the image bytes; a later run with the same images and teacher reads
them instead of running the teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from mdm.config import to_dict
from mdm.models.io import save_safetensors_atomic
from mdm.tokenizers.config import TokenizerTrainConfig
from mdm.tokenizers.data import load_images
from mdm.tokenizers.teacher import Teacher

__all__ = ["CachedTargets", "teacher_features", "cached_targets"]

log = logging.getLogger(__name__)
CACHE_FIELDS = (
    "cache",
    "cache_file",
    "cache_max_images",
    "batch_size",
)  # teacher settings that do not change the features


@torch.no_grad()
def teacher_features(
    teacher: Teacher, images: torch.Tensor, grid: tuple[int, int], batch_size: int = 32
) -> torch.Tensor:
    """Teacher features (N, h, w, C) on ``grid`` of images (N, 3, H, W) in [0, 1], in batches."""
    out = [teacher(images[i : i + batch_size], grid) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


class CachedTargets:
    """Endless training batches ``(images (B, 3, S, S), features (B, h, w, C))`` from memory.

    Each epoch is a fresh permutation of the images drawn from ``generator``; with ``flipped`` given,
    each image is mirrored with probability 1/2 and paired with the features of the mirror image.

    Args:
        images: (N, 3, S, S) in [0, 1].
        features: (N, h, w, C) teacher features of ``images``.
        flipped: (N, h, w, C) teacher features of the mirrored images, or None (no flips).
        batch_size: images per batch.
        generator: source of all randomness.
    """

    def __init__(
        self,
        images: torch.Tensor,
        features: torch.Tensor,
        flipped: torch.Tensor | None,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        if images.shape[0] != features.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {features.shape[0]} feature maps")
        self.images, self.features, self.flipped = images, features, flipped
        self.batch_size, self.g = batch_size, generator
        self._order: list[int] = []

    def __iter__(self) -> CachedTargets:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._order) < self.batch_size:
            self._order += torch.randperm(self.images.shape[0], generator=self.g).tolist()
        idx = torch.tensor(self._order[: self.batch_size])
        del self._order[: self.batch_size]
        images, feats = self.images[idx], self.features[idx]
        if self.flipped is not None:
            flip = torch.rand(len(idx), generator=self.g) < 0.5  # (B,)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            feats = torch.where(flip.view(-1, 1, 1, 1), self.flipped[idx], feats)
        return images, feats


def _cache_key(cfg: TokenizerTrainConfig, grid: tuple[int, int], images: torch.Tensor) -> str:
    teacher = {k: v for k, v in to_dict(cfg.teacher).items() if k not in CACHE_FIELDS}
    h = hashlib.sha256(json.dumps({"teacher": teacher, "grid": list(grid)}, sort_keys=True).encode())
    h.update(images.mul(255).round().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_targets(
    cfg: TokenizerTrainConfig,
    teacher: Teacher,
    img_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
) -> CachedTargets:
    """Loads the training images, computes (or reads) their teacher features, returns the batch stream.

    Args:
        cfg: the training config (``data``, ``teacher``, ``optim.batch_size``, ``seed``).
        teacher: the frozen teacher.
        img_size: the tokenizer's input side; images are resized whole to it.
        grid: the tokenizer's code grid.
        generator: randomness of the batches.
    """
    if tuple(cfg.data.crop_scale) != (1.0, 1.0):
        raise ValueError(
            f"teacher.cache needs data.crop_scale [1, 1] (got {list(cfg.data.crop_scale)}): the features are "
            "computed once per whole image, a random crop would need the teacher again"
        )
    limit = cfg.data.num_images if cfg.data.source == "demo" else 1 << 62
    if cfg.teacher.cache_max_images > 0:
        limit = min(limit, cfg.teacher.cache_max_images)
    images = load_images(cfg.data, img_size, limit, seed=cfg.seed)  # (N, 3, S, S)
    key = _cache_key(cfg, grid, images)
    path = Path(cfg.teacher.cache_file) if cfg.teacher.cache_file else None
    stored = _read(path, key, cfg.data.flip) if path is not None else None
    if stored is not None:
        feats, flipped = stored
        log.info("teacher features of %d images read from %s", images.shape[0], path)
    else:
        feats = teacher_features(teacher, images, grid, cfg.teacher.batch_size)
        flipped = None
        if cfg.data.flip:
            flipped = teacher_features(teacher, images.flip(-1), grid, cfg.teacher.batch_size)
        log.info(
            "teacher features of %d images computed%s", images.shape[0], " (and mirrored)" * cfg.data.flip
        )
        if path is not None:
            _write(path, key, feats, flipped)
    return CachedTargets(images, feats, flipped if cfg.data.flip else None, cfg.optim.batch_size, generator)


def _read(path: Path, key: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            log.info("%s holds features of other images or another teacher; recomputing", path)
            return None
    tensors = load_file(str(path))
    if flip and "flipped" not in tensors:
        return None
    return tensors["features"], tensors.get("flipped")


def _write(path: Path, key: str, feats: torch.Tensor, flipped: torch.Tensor | None) -> None:
    tensors = {"features": feats} if flipped is None else {"features": feats, "flipped": flipped}
    save_safetensors_atomic(tensors, path, metadata={"key": key})
