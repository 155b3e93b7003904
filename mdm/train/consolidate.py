"""``mdm checkpoint consolidate CKPT OUT``: a training checkpoint → a single-file mdm model directory.

Works for every strategy: ZeRO-2/3 partitions are merged with DeepSpeed's ``zero_to_fp32`` reader in one
process (no GPU, no process group); single-process and DDP checkpoints are read from ``state.pt``. Only
the backbone (``backbone.*``) is kept — objective heads, decoders and task heads are training machinery —
unless ``--keep-heads`` is given, in which case they go to ``heads.safetensors`` beside the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from mdm.config import from_dict
from mdm.models.config import ModelConfig

log = logging.getLogger(__name__)
BACKBONE = "backbone."


def load_training_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a training checkpoint directory."""
    if (ckpt / "deepspeed").is_dir():
        from mdm.distributed.deepspeed import consolidate_zero_checkpoint

        return consolidate_zero_checkpoint(str(ckpt))
    state_file = ckpt / "state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt}: neither state.pt nor a deepspeed/ directory: not an mdm checkpoint")
    return torch.load(state_file, map_location="cpu", weights_only=False)["model"]


def split_backbone(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone weights without the prefix, everything else)."""
    backbone = {k[len(BACKBONE) :]: v for k, v in sd.items() if k.startswith(BACKBONE)}
    rest = {k: v for k, v in sd.items() if not k.startswith(BACKBONE)}
    return backbone, rest


def consolidate(ckpt: str | Path, out_dir: str | Path, keep_heads: bool = False) -> Path:
    """Writes ``out_dir`` (model.safetensors + config.json) from training checkpoint ``ckpt``."""
    from mdm.models.io import save_pretrained, save_safetensors_atomic
    from mdm.models.multiway import MultiwayTransformer

    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no meta.json (incomplete or not an mdm checkpoint)")
    meta = json.loads(meta_path.read_text())
    try:
        model_cfg = from_dict(ModelConfig, meta["config"]["model"], source=str(meta_path), prefix="model.")
    except KeyError:
        raise ValueError(f"{meta_path}: the saved config has no 'model' section") from None
    backbone, rest = split_backbone(load_training_state_dict(ckpt))
    if not backbone:
        raise ValueError(f"{ckpt}: no '{BACKBONE}*' weights in the checkpoint")
    model = MultiwayTransformer(model_cfg)
    model.load_state_dict(backbone, strict=True)
    out = save_pretrained(
        model,
        out_dir,
        extra={"source": {"format": "mdm-checkpoint", "path": str(ckpt), "step": meta.get("step")}},
    )
    if keep_heads and rest:
        save_safetensors_atomic(rest, Path(out) / "heads.safetensors")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mdm checkpoint", description="Work with training checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="merge a (ZeRO-sharded) checkpoint into one mdm model directory")
    c.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step-00001000")
    c.add_argument("out_dir")
    c.add_argument(
        "--keep-heads", action="store_true", help="also write non-backbone weights to heads.safetensors"
    )
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out_dir, args.keep_heads)
    except (FileNotFoundError, ValueError) as e:
        print(f"mdm checkpoint: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
