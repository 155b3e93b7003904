"""``mdm import unilm|audiomae|beats <checkpoint> <out_dir>``: a checkpoint of another toolkit → an mdm model
directory.

- ``unilm``: torchscale/unilm BEiT-3 (:mod:`mdm.export.unilm`);
- ``audiomae``: AudioMAE (timm ViT names) → an ``audiomae_*`` Multiway model (:mod:`mdm.export.audiomae`);
- ``beats``: a released BEATs checkpoint (microsoft/unilm ``beats/``) → a model directory of the ``beats``
  family (:mod:`mdm.export.beats`).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm import", description="Import a checkpoint from another toolkit.")
    sub = p.add_subparsers(dest="source", required=True)
    u = sub.add_parser(
        "unilm",
        help="torchscale/unilm BEiT-3 checkpoint (.pth)",
        description="Convert a torchscale/unilm BEiT-3 checkpoint ({'model': ...} or a bare state dict, "
        "keys with or without 'beit3.') into an mdm model directory (model.safetensors + config.json). "
        "The file is read with torch.load(weights_only=True): no code in it runs.",
    )
    u.add_argument("checkpoint", help="the .pth file")
    u.add_argument("out_dir", help="directory to write")
    u.add_argument("--num-heads", type=int, default=None, help="attention heads, for non-standard widths")
    u.add_argument("--img-size", type=int, default=None, help="resize position embeddings to this resolution")
    a = sub.add_parser(
        "audiomae",
        help="AudioMAE checkpoint (.pth, pretrained or fine-tuned)",
        description="Convert an AudioMAE checkpoint ({'model': ...}; timm ViT names) into an mdm audiomae_* "
        "model directory; a fine-tuned head goes to heads.safetensors, the pretraining decoder is dropped. "
        "Read with torch.load(weights_only=True).",
    )
    a.add_argument("checkpoint", help="the .pth file")
    a.add_argument("out_dir", help="directory to write")
    a.add_argument("--num-heads", type=int, default=None, help="attention heads (default: width / 64)")
    b = sub.add_parser(
        "beats",
        help="released BEATs checkpoint (.pt: {'cfg', 'model'})",
        description="Convert a released BEATs checkpoint (pre-trained or AudioSet fine-tuned) into an mdm "
        "model directory loadable by mdm.from_pretrained. Read with torch.load(weights_only=True).",
    )
    b.add_argument("checkpoint", help="the .pt file")
    b.add_argument("out_dir", help="directory to write")
    return p


def _import_audiomae(args: argparse.Namespace) -> int:
    from mdm.export.audiomae import import_audiomae

    try:
        out, info = import_audiomae(args.checkpoint, args.out_dir, num_heads=args.num_heads)
    except (ValueError, FileNotFoundError) as e:
        print(f"mdm import: {e}", file=sys.stderr)
        return 1
    cfg, heads = info["config"], info["heads"]
    kept = f", head {heads} kept in heads.safetensors" if heads else ""
    print(
        f"wrote {out} ({cfg.arch}: depth {cfg.depth}, width {cfg.embed_dim}, {cfg.audio_frames} frames x "
        f"{cfg.audio_mel_bins} mel bins; {len(info['dropped'])} decoder tensors dropped{kept})"
    )
    return 0


def _import_beats(args: argparse.Namespace) -> int:
    from mdm.export.beats import import_beats
    from mdm.models.io import read_meta

    try:
        out = import_beats(args.checkpoint, args.out_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"mdm import: {e}", file=sys.stderr)
        return 1
    m = read_meta(out)["model"]
    head = f", AudioSet predictor with {m['predictor_class']} classes" if m["finetuned_model"] else ""
    print(f"wrote {out} (BEATs: {m['encoder_layers']} layers, width {m['encoder_embed_dim']}{head})")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "audiomae":
        return _import_audiomae(args)
    if args.source == "beats":
        return _import_beats(args)
    from mdm.export.unilm import import_unilm

    try:
        out, rest = import_unilm(
            args.checkpoint, args.out_dir, num_heads=args.num_heads, img_size=args.img_size
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"mdm import: {e}", file=sys.stderr)
        return 1
    from mdm.models import read_model_config

    cfg, _ = read_model_config(out)
    print(
        f"wrote {out} ({cfg.arch}: depth {cfg.depth}, width {cfg.embed_dim}, {cfg.img_size}px"
        f"{f', {len(rest)} head tensors kept in heads.safetensors' if rest else ''})"
    )
    return 0
