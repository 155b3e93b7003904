"""What ``mdm export --checkpoint C`` reads: one loader for every kind of checkpoint mdm produces.

``C`` may be

* an mdm model directory (``config.json`` + ``model.safetensors``, optionally ``heads.safetensors``) as
  written by ``save_pretrained``, ``mdm import`` or ``mdm checkpoint consolidate``;
* a training checkpoint directory (``runs/x/checkpoints/step-N`` with ``meta.json``) of any strategy —
  single process, DDP or DeepSpeed ZeRO 0–3 — read with :mod:`mdm.train.consolidate`'s loader; this
  covers fine-tuned task checkpoints, whose state dict is ``backbone.*`` plus the task head;
* a run directory (``runs/x``): its newest complete checkpoint;
* a unilm/torchscale BEiT-3 ``.pth`` file (converted in memory, as ``mdm import unilm`` does).

Everything becomes an :class:`ExportSource`: the backbone's :class:`ModelConfig`, its mdm-named weights,
and the non-backbone tensors (task or objective heads) under their own names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdm.models.config import ModelConfig

log = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"


@dataclass
class ExportSource:
    """A loaded checkpoint, ready for an exporter.

    Attributes:
        cfg: the backbone architecture.
        backbone: mdm-named backbone weights (keys of :class:`~mdm.models.MultiwayTransformer`).
        heads: every other tensor (task heads, ``logit_scale``...), names as in the task model.
        path: where it was read from.
        kind: ``model-dir``, ``training-checkpoint`` or ``unilm``.
        meta: metadata found beside the weights (``meta.json`` / ``config.json``).
    """

    cfg: ModelConfig
    backbone: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    path: str = ""
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def build_model(self):
        """The backbone as a :class:`~mdm.models.MultiwayTransformer` in eval mode, weights loaded strictly.

        Built on the meta device and given the loaded tensors (``assign=True``): no time is spent on a
        random init that would be overwritten (~20 s for beit3_base on a CPU).
        """
        from mdm.models.multiway import MultiwayTransformer

        with torch.device("meta"):
            model = MultiwayTransformer(self.cfg)
        try:
            model.load_state_dict(self.backbone, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{self.path}: backbone weights do not match its config: {e}") from None
        return model.eval()


def load_export_source(path: str | Path, num_heads: int | None = None) -> ExportSource:
    """Reads any checkpoint mdm knows (see the module docstring).

    Args:
        path: the checkpoint.
        num_heads: attention heads of a unilm ``.pth`` with a non-standard width.

    Raises:
        FileNotFoundError: nothing at ``path``, or a directory that is none of the known kinds.
        ValueError: a recognised checkpoint whose contents are inconsistent.
    """
    p = Path(path)
    if p.is_file():
        return _from_unilm(p, num_heads)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return _from_model_dir(p)
    if (p / "meta.json").is_file():
        return _from_training_checkpoint(p)
    if (p / "checkpoints").is_dir():
        from mdm.train.checkpoint import latest_checkpoint

        newest = latest_checkpoint(p / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"{p}/checkpoints: no complete checkpoint (none has meta.json)")
        log.info("using the newest checkpoint of run %s: %s", p, newest.name)
        return _from_training_checkpoint(newest)
    raise FileNotFoundError(
        f"{p}: not an mdm model directory (config.json + model.safetensors), a training checkpoint "
        "(meta.json), a run directory (checkpoints/) or a unilm .pth file"
    )


def _from_model_dir(p: Path) -> ExportSource:
    from safetensors.torch import load_file

    from mdm.models.io import read_model_config

    cfg, meta = read_model_config(p)
    backbone = load_file(str(p / "model.safetensors"))
    heads = load_file(str(p / HEADS_FILE)) if (p / HEADS_FILE).is_file() else {}
    return ExportSource(cfg, backbone, heads, str(p), "model-dir", meta)


def _from_training_checkpoint(p: Path) -> ExportSource:
    from mdm.config import from_dict
    from mdm.train.consolidate import load_training_state_dict, split_backbone

    meta_path = p / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        model_section = meta["config"]["model"]
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON: {e}") from None
    except (KeyError, TypeError):
        raise ValueError(f"{meta_path}: the saved config has no 'model' section") from None
    cfg = from_dict(ModelConfig, model_section, source=str(meta_path), prefix="model.")
    backbone, heads = split_backbone(load_training_state_dict(p))
    if not backbone:
        raise ValueError(f"{p}: no 'backbone.*' weights in the checkpoint")
    return ExportSource(cfg, backbone, heads, str(p), "training-checkpoint", meta)


def _from_unilm(p: Path, num_heads: int | None) -> ExportSource:
    from mdm.export.unilm import infer_config, load_unilm_checkpoint, unilm_to_mdm

    backbone, heads = unilm_to_mdm(load_unilm_checkpoint(p), str(p))
    cfg = infer_config(backbone, num_heads, str(p))
    return ExportSource(
        cfg, backbone, heads, str(p), "unilm", {"source": {"format": "unilm", "path": str(p)}}
    )
