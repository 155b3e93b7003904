"""AdamW parameter groups (weight-decay exemptions, layer-wise lr decay, head lr multiplier, frozen
parameters) and the learning-rate schedule.

Layer-wise decay follows BEiT / unilm ``optim_factory``: with L layers, embeddings get layer id 0, layer
``i`` gets ``i + 1``, everything after the last layer (final norm, heads) ``L + 1``; the lr scale is
``layer_decay ** (L + 1 - layer_id)``. VLMo's stage-wise schedule is expressed with ``trainable`` /
``frozen`` name patterns.

``freeze_backbone_steps`` is LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"): for the first N steps only the head (``head_prefixes``) moves, then
everything. The backbone's groups carry ``hold_steps`` and get lr 0 before it
(:func:`mdm.distributed.strategy.group_lr`), so the freeze is a function of the step alone: a resumed run
freezes and thaws where an uninterrupted one does, under every strategy (the parameters stay in the
optimizer and their gradients are still computed, so AdamW's moments run on; lr 0 also stops weight
decay).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

_EMBED_RE = re.compile(
    r"^(backbone\.)?(text_embed|vision_embed|vision_pos_embed|text_pos_embed|audio_embed|audio_pos_embed)\b"
)
_LAYER_RE = re.compile(r"^(backbone\.)?layers\.(\d+)\.")
# BEATs (mdm.models.beats, the release's names): the stem before the stack, and encoder.layers.N
_BEATS_EMBED_RE = re.compile(
    r"^(backbone\.)?(patch_embedding|layer_norm|post_extract_proj|encoder\.pos_conv|encoder\.layer_norm)\."
)
_BEATS_LAYER_RE = re.compile(r"^(backbone\.)?encoder\.layers\.(\d+)\.")


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    Attributes:
        lr: peak learning rate.
        min_lr: final learning rate of the cosine schedule.
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms, tokens, positions).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup from 0.
        schedule: decay after warmup.
        layer_decay: layer-wise lr decay factor (1.0 = off).
        head_lr_mult: lr multiplier for parameters whose name starts with one of ``head_prefixes``.
        head_prefixes: name prefixes of task heads.
        clip_grad: max global gradient norm (0 = off).
        trainable: regexes; when non-empty, only matching parameters train (e.g. VLMo's text stage).
        frozen: regexes of parameters that do not train.
        freeze_backbone_steps: LP-FT: parameters outside ``head_prefixes`` get lr 0 for this many
            steps (the schedule runs on; they then follow it). 0 = off.
    """

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    layer_decay: float = 1.0
    head_lr_mult: float = 1.0
    head_prefixes: list[str] = field(default_factory=list)
    clip_grad: float = 3.0
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    freeze_backbone_steps: int = 0


def layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter for layer-wise lr decay (0 = embeddings, L + 1 = after the stack)."""
    if _EMBED_RE.match(name) or _BEATS_EMBED_RE.match(name):
        return 0
    m = _LAYER_RE.match(name) or _BEATS_LAYER_RE.match(name)
    if m:
        return int(m.group(2)) + 1
    return num_layers + 1


def apply_trainable(model: nn.Module, cfg: OptimConfig) -> list[str]:
    """Sets ``requires_grad`` from ``cfg.trainable`` / ``cfg.frozen``; returns the frozen names."""
    keep = [re.compile(p) for p in cfg.trainable]
    drop = [re.compile(p) for p in cfg.frozen]
    frozen = []
    for name, p in model.named_parameters():
        train = (not keep or any(r.search(name) for r in keep)) and not any(r.search(name) for r in drop)
        if not train:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _no_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def param_groups(model: nn.Module, cfg: OptimConfig, num_layers: int) -> list[dict]:
    """AdamW parameter groups with ``lr_scale`` and ``weight_decay`` per group.

    Args:
        model: the module handed to the optimizer (its trainable parameters).
        cfg: optimizer config.
        num_layers: depth of the backbone, for layer-wise decay.
    """
    skip = _no_decay_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = cfg.layer_decay ** (num_layers + 1 - layer_id(name, num_layers))
        head = any(name.startswith(h) for h in cfg.head_prefixes)
        if head:
            scale *= cfg.head_lr_mult
        wd = 0.0 if no_decay else cfg.weight_decay
        hold = 0 if head else cfg.freeze_backbone_steps
        g = groups.setdefault(
            (scale, wd, hold),
            {"params": [], "names": [], "lr_scale": scale, "weight_decay": wd, "hold_steps": hold},
        )
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters (check optim.trainable / optim.frozen)")
    if cfg.freeze_backbone_steps > 0 and all(g["hold_steps"] > 0 for g in groups.values()):
        raise ValueError(
            "optim.freeze_backbone_steps > 0 but no parameter matches optim.head_prefixes "
            f"{cfg.head_prefixes}: nothing would train during the freeze"
        )
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, num_layers: int) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over :func:`param_groups` (names are kept out of the optimizer state)."""
    groups = param_groups(model, cfg, num_layers)
    for g in groups:
        g.pop("names")
        g["lr"] = 0.0 if g["hold_steps"] > 0 else cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup then cosine/linear/constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - t)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))
