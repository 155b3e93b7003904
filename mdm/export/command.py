"""``mdm export --checkpoint C --format {safetensors,unilm,timm,onnx} --out O``.

``C`` is anything :func:`mdm.export.source.load_export_source` reads: an mdm model directory, a training
or fine-tuned task checkpoint (any strategy), a run directory, or a unilm ``.pth``. Formats:

* ``safetensors``: an mdm model directory (``model.safetensors`` + ``config.json``, task heads in
  ``heads.safetensors``) that ``mdm.models.from_pretrained(O)`` loads;
* ``unilm``: the official BEiT-3 ``{"model": ...}`` file with ``beit3.`` keys and unilm's head names;
* ``timm``: the vision tower for ``timm.create_model`` (see :mod:`mdm.export.timm`);
* ``onnx``: image and text encoder graphs (see :mod:`mdm.export.onnx`).

Formats that cannot represent the model refuse with a message saying why (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mdm.export.source import ExportSource, load_export_source

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "unilm", "timm", "onnx")
#: Parameter prefixes of mdm's pretraining model outside the backbone (MIM/MLM heads, objective blocks).
PRETRAIN_PREFIXES = ("heads.", "objectives.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdm export",
        description="Write an mdm checkpoint in another format. --checkpoint takes an mdm model directory, a "
        "training or fine-tuned checkpoint directory (runs/x/checkpoints/step-N, any strategy), a run "
        "directory (its newest checkpoint) or a unilm .pth file.",
    )
    p.add_argument("--checkpoint", required=True, help="what to export")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument(
        "--out", required=True, help="output directory (unilm: the .pth file, or a directory to put it in)"
    )
    p.add_argument("--backbone-only", action="store_true", help="drop task/objective heads")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of a non-standard-width .pth")
    return p


def _export_safetensors(src: ExportSource, out: Path) -> str:
    from mdm.models.io import save_pretrained, save_safetensors_atomic

    model = src.build_model()
    extra = {"source": {"format": src.kind, "path": src.path}}
    if src.kind == "model-dir":  # keep what else config.json holds (a fine-tuned model's task, labels...)
        extra = {
            **{k: v for k, v in src.meta.items() if k not in ("format", "format_version", "model")},
            **extra,
        }
    save_pretrained(model, out, extra=extra, state_dict=src.backbone)
    if src.heads:
        save_safetensors_atomic(src.heads, out / "heads.safetensors")
    heads = f", {len(src.heads)} head tensors in heads.safetensors" if src.heads else ""
    return f"wrote {out} (mdm model directory: {src.cfg.arch}{heads})"


def _export_unilm(src: ExportSource, out: Path) -> str:
    from mdm.export.unilm import (
        NOT_IN_UNILM,
        check_unilm_layout,
        export_unilm,
        unilm_model_name,
        unilm_variant,
    )

    check_unilm_layout(src.cfg)
    # PretrainModel's own machinery (mdm.objectives.model) has no place in a unilm task checkpoint
    internal = sorted(k for k in src.heads if k.startswith(PRETRAIN_PREFIXES))
    if internal:
        log.info(
            "not exported to unilm (pretraining heads/objectives): %d tensors, e.g. %s",
            len(internal),
            internal[:3],
        )
        src.heads = {k: v for k, v in src.heads.items() if not k.startswith(PRETRAIN_PREFIXES)}
    for prefix, what in NOT_IN_UNILM.items():
        left_out = sorted(k for k in src.heads if k.startswith(prefix))
        if left_out:
            log.info("not exported to unilm: %s, %d tensors (%s*)", what, len(left_out), prefix)
            src.heads = {k: v for k, v in src.heads.items() if not k.startswith(prefix)}
    if out.suffix not in (".pth", ".pt"):
        out = out / f"{unilm_model_name(src.cfg, unilm_variant(src.heads))}.pth"
    path, variant = export_unilm(src.cfg, src.backbone, src.heads, out)
    task = f"unilm model {unilm_model_name(src.cfg, variant)}" if variant else "backbone (no task head)"
    return f"wrote {path} ({task}; load with unilm/beit3 --finetune {path.name})"


def _export_timm(src: ExportSource, out: Path) -> str:
    from mdm.export.timm import export_timm

    path, arch, args = export_timm(src.cfg, src.backbone, src.heads, out)
    shown = {k: args[k] for k in ("img_size", "embed_dim", "depth", "num_heads", "num_classes")}
    return (
        f"wrote {path}: timm.create_model('{arch}', checkpoint_path='{path}/model.safetensors', "
        f"**config['model_args'])  # {shown}; or timm.create_model('local-dir:{path}', pretrained=True)"
    )


def _export_onnx(src: ExportSource, out: Path) -> str:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise ValueError("the onnx format needs the 'onnx' extra: pip install 'mdm-toolkit[onnx]'") from None
    from mdm.export.onnx import export_onnx

    paths = export_onnx(src.build_model(), out)
    return f"wrote {paths['image']} and {paths['text']}"


_EXPORTERS = {
    "safetensors": _export_safetensors,
    "unilm": _export_unilm,
    "timm": _export_timm,
    "onnx": _export_onnx,
}


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    backbone_only: bool = False,
    num_heads: int | None = None,
) -> str:
    """Library form of the command; returns the one-line summary it prints.

    Raises:
        FileNotFoundError / ValueError: unreadable input, or a model the format cannot represent.
    """
    if fmt not in _EXPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = load_export_source(checkpoint, num_heads=num_heads)
    if backbone_only:
        src.heads = {}
    log.info("exporting %s (%s, %s) as %s", src.path, src.kind, src.cfg.arch, fmt)
    return _EXPORTERS[fmt](src, Path(out))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        msg = export_checkpoint(args.checkpoint, args.format, args.out, args.backbone_only, args.num_heads)
    except (FileNotFoundError, ValueError) as e:
        print(f"mdm export: {e}", file=sys.stderr)
        return 1
    print(msg)
    return 0
