"""``mdm tokenizer show``: one PNG with the originals, the reconstructions (dVAE) and the code maps.

Rows, top to bottom: the input images at the tokenizer's resolution; the dVAE's reconstructions from
the codes (tokenizers that cannot decode pixels skip this row); the code grid, each code drawn in a
fixed colour (the same code has the same colour in every image and every run).
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from mdm.tokenizers.base import VisualTokenizer, as_rgb, resize_images

__all__ = ["code_colours", "show_image"]


def code_colours(codebook_size: int) -> np.ndarray:
    """(K, 3) uint8 colours: hues along the golden angle, three lightness levels."""
    k = np.arange(codebook_size)
    hues = (k * 0.6180339887) % 1.0
    light = (0.35, 0.55, 0.75)
    rgb = [colorsys.hls_to_rgb(h, light[i % 3], 0.85) for i, h in enumerate(hues)]
    return (np.asarray(rgb) * 255).round().astype(np.uint8)


def _tile(images: torch.Tensor, cell: int) -> list[Image.Image]:
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a).resize((cell, cell), Image.Resampling.NEAREST) for a in arr]


@torch.no_grad()
def show_image(tok: VisualTokenizer, images: torch.Tensor, cell: int = 128, pad: int = 4) -> Image.Image:
    """A grid picture of ``images`` (float (B, C, H, W) in [0, 1]) as seen by ``tok``."""
    images = resize_images(as_rgb(images.to(next(tok.parameters()).device)), tok.img_size)
    codes = tok.encode(images)  # (B, h, w)
    rows: list[tuple[str, list[Image.Image]]] = [("input", _tile(images, cell))]
    if tok.can_decode:
        rows.append(("reconstruction", _tile(tok.decode(codes), cell)))
    palette = code_colours(tok.codebook_size)
    maps = [
        Image.fromarray(palette[c.cpu().numpy()]).resize((cell, cell), Image.Resampling.NEAREST)
        for c in codes
    ]
    rows.append((f"codes ({tok.codebook_size})", maps))
    label_w = 110
    width = label_w + len(images) * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, tiles) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, tile in enumerate(tiles):
            canvas.paste(tile, (label_w + pad + c * (cell + pad), y))
    return canvas
