"""``mdm launch --dry-run``: what a run will need, computed from its config without any GPU.

The model is built on the ``meta`` device (no memory, no init cost) to count parameters per expert; the
work per micro-batch is derived from the config (streams and objectives for ``mdm pretrain``, the task
for ``mdm finetune``); memory per rank comes from :mod:`mdm.launch.memory`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdm.launch.memory import (
    EncoderPass,
    StateBytes,
    backbone_parameter_table,
    encoder_pass,
    pass_activation_bytes,
    zero_state_bytes,
)
from mdm.launch.streams import pretrain_passes, task_head_parameters, task_passes
from mdm.models.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything the dry run reports.

    Attributes:
        command: ``pretrain`` or ``finetune``.
        config_path: the config file.
        model: the backbone config.
        nodes: machines. gpus_per_node: processes per machine.
        precision: ``bf16`` / ``fp16`` / ``fp32``. zero_stage: the configured ZeRO stage.
        table: backbone parameters by (component, expert).
        extra_params: trainable parameters outside the backbone (heads, objective machinery) by name.
        frozen_params: frozen parameters (visual tokenizer), replicated on every rank.
        passes: encoder passes of one micro-batch on one rank.
        micro_batch: samples per micro-batch per rank, by stream.
        grad_accum: micro-batches per optimizer step.
        steps: optimizer steps (None when given in epochs of an unknown dataset size).
        notes: where numbers came from and what was assumed.
    """

    command: str
    config_path: str
    model: ModelConfig
    nodes: int
    gpus_per_node: int
    precision: str
    zero_stage: int
    table: dict[tuple[str, str], int]
    extra_params: dict[str, int]
    frozen_params: int
    passes: list[EncoderPass]
    micro_batch: dict[str, int]
    grad_accum: int
    steps: int | None
    epochs: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def trainable(self) -> int:
        return sum(self.table.values()) + sum(self.extra_params.values())

    @property
    def global_batch(self) -> dict[str, int]:
        return {k: v * self.grad_accum * self.world_size for k, v in self.micro_batch.items()}

    @property
    def bytes_per_elem(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def states(self) -> list[StateBytes]:
        return [zero_state_bytes(self.trainable, self.world_size, self.precision, s) for s in range(4)]

    def activations(self, checkpointing: bool) -> float:
        """Peak activation bytes per rank: passes of one micro-batch are held together until backward
        (every objective's loss is summed before one backward call)."""
        return sum(pass_activation_bytes(p, self.bytes_per_elem, checkpointing) for p in self.passes)

    def frozen_bytes(self) -> float:
        return self.frozen_params * self.bytes_per_elem

    def step_flops(self) -> float:
        """Model FLOPs (forward + backward) of one optimizer step over all ranks."""
        from mdm.train.flops import encoder_forward_flops

        per_micro = 0.0
        for p in self.passes:
            width_cfg = ModelConfig(embed_dim=p.dim, ffn_dim=p.ffn_dim, depth=p.layers, num_heads=1)
            per_micro += 3.0 * p.batch * encoder_forward_flops(width_cfg, p.tokens)
        return per_micro * self.grad_accum * self.world_size


def _read_config(command: str, path: str, overrides: list[str]) -> Any:
    from mdm.config import load_config

    if command == "finetune":
        from mdm.tasks.config import FinetuneConfig

        return load_config(FinetuneConfig, path, overrides)
    return _read_pretrain_config(path, overrides)


def _read_pretrain_config(path: str, overrides: list[str]) -> Any:
    """The pretraining config; its ``data`` section is kept as a plain mapping if its schema (in
    ``mdm.data``) is not importable, so the dry run does not depend on the data pipeline."""
    from mdm.config.core import _deep_merge, from_dict, parse_overrides, read_yaml
    from mdm.train.pretrain import PretrainConfig

    try:
        from mdm.train.pretrain import load_pretrain_config

        return load_pretrain_config(path, overrides)
    except ImportError:
        raw = _deep_merge(read_yaml(path), parse_overrides(overrides))
        data = raw.pop("data", {}) or {}
        cfg = from_dict(PretrainConfig, raw, source=str(path))
        cfg.data = data
        return cfg


def detect_command(path: str) -> str:
    """``finetune`` when the config has a ``task:`` section, else ``pretrain``."""
    from mdm.config.core import read_yaml

    return "finetune" if "task" in read_yaml(path) else "pretrain"


def _meta_parameters(module_fn) -> torch.nn.Module:
    with torch.device("meta"):
        return module_fn()


def _pretrain_extra_params(cfg) -> dict[str, int]:
    """Trainable parameters of the pretraining heads and objective machinery, by module name."""
    from mdm.objectives import build_pretrain_model

    model = _meta_parameters(lambda: build_pretrain_model(cfg.model, cfg.objectives))
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            continue
        key = ".".join(name.split(".")[:2])  # heads.mim, objectives.cls_mim...
        out[key] = out.get(key, 0) + p.numel()
    return out


def _frozen_tokenizer_params(path: str) -> int:
    """Parameters stored in a saved tokenizer directory (read from safetensors headers only)."""
    d = Path(path)
    if not path or not d.is_dir():
        return 0
    from safetensors import safe_open

    total = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for s in st.get_slice(k).get_shape():
                    n *= s
                total += n
    return total


def build_plan(
    config_path: str,
    nodes: int,
    gpus_per_node: int,
    command: str | None = None,
    overrides: list[str] | None = None,
    batch: dict[str, int] | None = None,
) -> Plan:
    """Reads the config and computes the :class:`Plan`.

    Args:
        config_path: a pretraining or fine-tuning YAML.
        nodes: machines. gpus_per_node: processes per machine.
        command: ``pretrain`` / ``finetune``; detected from the config when None.
        overrides: dotted ``key=value`` config overrides.
        batch: micro-batch per stream overriding the config (``{"image": 64, ...}``).
    """
    from mdm.models import build_model

    command = command or detect_command(config_path)
    cfg = _read_config(command, config_path, overrides or [])
    backbone = _meta_parameters(lambda: build_model(cfg.model))
    notes: list[str] = []
    if command == "pretrain":
        passes, micro = pretrain_passes(cfg, batch or {}, notes)
        extra = _pretrain_extra_params(cfg)
        frozen = _frozen_tokenizer_params(cfg.visual_tokenizer)
        if cfg.visual_tokenizer and not frozen:
            notes.append(
                f"visual tokenizer {cfg.visual_tokenizer} not found here: its weights are not counted"
            )
        steps, epochs = cfg.train.steps, 0.0
    else:
        passes, micro = task_passes(cfg, batch or {}, notes)
        extra, frozen = task_head_parameters(cfg), 0
        steps, epochs = (None, cfg.epochs) if cfg.epochs > 0 else (cfg.train.steps, 0.0)
    return Plan(
        command=command, config_path=str(config_path), model=cfg.model, nodes=nodes,
        gpus_per_node=gpus_per_node, precision=cfg.distributed.precision,
        zero_stage=cfg.distributed.zero_stage, table=backbone_parameter_table(backbone), extra_params=extra,
        frozen_params=frozen, passes=passes, micro_batch=micro, grad_accum=cfg.train.grad_accum,
        steps=steps, epochs=epochs, notes=notes,
    )  # fmt: skip


__all__ = ["Plan", "build_plan", "detect_command", "encoder_pass"]
