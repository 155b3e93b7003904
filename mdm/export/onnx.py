"""ONNX export of the image and the text encoder (dual-encoder inference, e.g. retrieval).

Two graphs, each with a dynamic batch axis:

* ``image_encoder.onnx``: ``image`` (B, C, S, S) float → ``features`` (B, 1 + P, D); S is the
  model's ``img_size`` (the position table is not resized inside the graph);
* ``text_encoder.onnx``: ``text`` (B, T) int64, ``text_padding_mask`` (B, T) bool (True = padding) →
  ``features`` (B, T, D); T is dynamic up to ``max_text_positions - 2``.

Exported with the TorchScript-based ``torch.onnx.export(..., dynamo=False)``; onnxruntime (the ``onnx``
extra) reproduces PyTorch within 1e-4 (``tests/test_export_onnx.py``). Joint image-text input is not
exported: its routing depends on the split position, which the dual encoders do not need.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGE_GRAPH = "image_encoder.onnx"
TEXT_GRAPH = "text_encoder.onnx"
OPSET = 17


class ImageEncoder(nn.Module):
    """``image → backbone(image=image)``: the image-only forward as a single-input module."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image=image)  # (B, 1 + P, D)


class TextEncoder(nn.Module):
    """``(text, padding mask) → backbone(text=..., text_padding_mask=...)``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, text: torch.Tensor, text_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(text=text, text_padding_mask=text_padding_mask)  # (B, T, D)


def example_inputs(cfg, batch: int = 2, text_len: int = 8) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs. The text example has padding in one row, so the traced graph keeps the
    padding-mask path (the backbone skips the mask when no position is padded)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    text_len = min(text_len, cfg.max_text_positions - 2)
    text = torch.randint(0, cfg.vocab_size, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[0, text_len // 2 :] = True
    return {"image": (image,), "text": (text, pad)}


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], axes: dict) -> None:
    with warnings.catch_warnings():
        # Python-level shape checks become constants in the trace; they are re-checked by ORT's shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # dynamo=False is deliberate (the TorchScript exporter handles our routing without graph breaks)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=["features"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def export_onnx(model: nn.Module, out_dir: str | Path) -> dict[str, Path]:
    """Writes ``image_encoder.onnx``, ``text_encoder.onnx`` and ``config.json`` into ``out_dir``.

    Args:
        model: a :class:`~mdm.models.MultiwayTransformer` (put in eval mode here).
        out_dir: the directory.

    Returns:
        ``{"image": path, "text": path}``.
    """
    from mdm.config import to_dict
    from mdm.models.io import atomic_write_bytes

    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = example_inputs(model.cfg)
    paths = {"image": out / IMAGE_GRAPH, "text": out / TEXT_GRAPH}
    with torch.no_grad():
        _export(
            ImageEncoder(model),
            ex["image"],
            paths["image"],
            ["image"],
            {"image": {0: "batch"}, "features": {0: "batch"}},
        )
        text_axes = {"text": {0: "batch", 1: "length"}, "text_padding_mask": {0: "batch", 1: "length"}}
        text_axes["features"] = {0: "batch", 1: "length"}
        _export(TextEncoder(model), ex["text"], paths["text"], ["text", "text_padding_mask"], text_axes)
    meta = {
        "format": "mdm-onnx",
        "opset": OPSET,
        "model": to_dict(model.cfg),
        "graphs": {
            "image": {
                "file": IMAGE_GRAPH,
                "inputs": {"image": ["batch", model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size]},
            },
            "text": {
                "file": TEXT_GRAPH,
                "inputs": {"text": ["batch", "length"], "text_padding_mask": ["batch", "length"]},
            },
        },
    }
    atomic_write_bytes(out / "config.json", (json.dumps(meta, indent=2) + "\n").encode())
    return paths
