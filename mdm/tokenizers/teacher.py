"""Pluggable teachers for VQ-KD: a timm model, an mdm backbone, or any callable returning patch features.

BEiT v2 regresses CLIP ViT-B/16 (or DINO) patch features. mdm runs offline, so the teacher is whatever
the user provides: a timm model name with weights from a local file, an mdm model directory, or a
Python callable. Without weights a timm teacher is a frozen random network — a fixed nonlinear patch
feature map, enough for the CPU demo to exercise the whole pipeline (documented in docs/tokenizers.md).

Whatever it is, the teacher sees images resized to its resolution and normalised with its mean/std,
and its features are resampled to the tokenizer's code grid when the two grids differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mdm.tokenizers.base import resize_images
from mdm.tokenizers.config import TeacherConfig

__all__ = ["Teacher", "build_teacher", "to_grid"]

log = logging.getLogger(__name__)


def to_grid(feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch features (B, N, C) with a square N, or (B, h', w', C), → (B, h, w, C) on ``grid``."""
    if feats.dim() == 3:
        side = math.isqrt(feats.shape[1])
        if side * side != feats.shape[1]:
            raise ValueError(
                f"teacher returned {feats.shape[1]} tokens, not a square grid; drop prefix tokens first"
            )
        feats = feats.view(feats.shape[0], side, side, -1)
    if feats.dim() != 4:
        raise ValueError(f"teacher features must be (B, N, C) or (B, h, w, C), got {tuple(feats.shape)}")
    if tuple(feats.shape[1:3]) != tuple(grid):
        x = feats.permute(0, 3, 1, 2)  # (B, C, h', w')
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        feats = x.permute(0, 2, 3, 1)  # (B, h, w, C)
    return feats


class Teacher(nn.Module):
    """A frozen feature extractor: [0, 1] images → patch features on a given grid.

    Args:
        fn: preprocessed images (B, 3, S, S) → features (B, N, C) or (B, h, w, C).
        img_size: side S the teacher expects.
        mean: normalisation mean.
        std: normalisation std.
        module: the ``nn.Module`` behind ``fn`` (kept frozen; saved with the tokenizer when possible).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        img_size: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.fn, self.img_size, self.module = fn, img_size, module
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if module is not None:
            module.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode: a teacher is frozen."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Features (B, h, w, C) of RGB images (B, 3, H, W) in [0, 1]."""
        x = (resize_images(images, self.img_size) - self.mean) / self.std
        return to_grid(self.fn(x).float(), grid)

    @torch.no_grad()
    def feature_dim(self) -> int:
        """Width C of the features, by one forward pass on a blank image."""
        device = self.mean.device
        return int(
            self.forward(torch.zeros(1, 3, self.img_size, self.img_size, device=device), (1, 1)).shape[-1]
        )


def _timm_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    prefix = int(getattr(model, "num_prefix_tokens", 0))

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(x)
        if out.dim() == 4:  # CNN: (B, C, h, w)
            return out.permute(0, 2, 3, 1)
        return out[:, prefix:]  # ViT: (B, N, C) without CLS / register tokens

    return fn


def _build_timm(cfg: TeacherConfig, weights: dict[str, torch.Tensor] | None) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):  # a reproducible random teacher, global RNG untouched
        torch.manual_seed(cfg.seed)
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.kwargs)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing:
            raise ValueError(f"teacher weights for {cfg.name!r} miss {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            log.info(
                "teacher %s: ignored %d unexpected keys (e.g. %s)", cfg.name, len(unexpected), unexpected[:3]
            )
    elif cfg.kind == "timm":
        log.warning(
            "teacher %s has no weights: using a frozen random initialisation (seed %d)", cfg.name, cfg.seed
        )
    return model


def build_teacher(
    cfg: TeacherConfig,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Teacher:
    """Builds the teacher described by ``cfg``.

    Args:
        cfg: teacher section of the config.
        fn: the teacher itself when ``cfg.kind == "none"`` (a callable on preprocessed images).
        weights: state dict for a timm teacher (overrides ``cfg.weights``; used when a saved tokenizer
            directory carries its teacher).
    """
    from mdm.tokenizers.io import read_state_dict

    if cfg.kind == "none" or fn is not None:
        if fn is None:
            raise ValueError("teacher.kind is 'none': pass the teacher callable in Python (fn=...)")
        module = fn if isinstance(fn, nn.Module) else None
        return Teacher(fn, cfg.img_size, cfg.mean, cfg.std, module)
    if cfg.kind == "timm":
        if weights is None and cfg.weights:
            weights = read_state_dict(Path(cfg.weights))
        model = _build_timm(cfg, weights)
        return Teacher(_timm_features(model), cfg.img_size, cfg.mean, cfg.std, model)
    if cfg.kind == "mdm":
        from mdm.models import from_pretrained

        backbone = from_pretrained(cfg.name)
        size = backbone.cfg.img_size
        if size != cfg.img_size:
            log.info("teacher %s works at %d px (teacher.img_size %d ignored)", cfg.name, size, cfg.img_size)
        return Teacher(lambda x: backbone(image=x)[:, 1:], size, cfg.mean, cfg.std, backbone)
    raise ValueError(f"unknown teacher kind {cfg.kind!r} (timm, mdm, none)")
