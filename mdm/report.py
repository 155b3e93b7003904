"""Small plotting and Markdown helpers for run reports (``mdm demo``): curves from ``metrics.jsonl``.

Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    path: str | Path,
    title: str,
    ylabel: str = "",
    smooth: int = 1,
) -> Path | None:
    """Plots ``keys`` of metric rows against ``step``; returns the PNG path (None if no key has data).

    Args:
        rows: metric rows with a ``step`` field.
        keys: metric names to draw, one line each.
        path: output PNG.
        title / ylabel: labels.
        smooth: moving-average window (1 = raw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    drawn = 0
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if smooth > 1:
            ys = [
                sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1])
                for i in range(len(ys))
            ]
        ax.plot(xs, ys, label=key, linewidth=1.5)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are shown with 2 decimals."""

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as plain aligned text, for the terminal."""
    cells = [list(map(str, header))] + [
        [f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _tile(img: Any, cell: int) -> Any:
    """A float (3, H, W) tensor in [0, 1] or a PIL image as an RGB PIL image of ``cell`` pixels (no smoothing)."""
    import numpy as np
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = (img.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
        img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)


def image_rows(
    rows: Sequence[tuple[str, Sequence[Any]]],
    path: str | Path,
    cell: int = 96,
    pad: int = 4,
    label_width: int = 150,
    captions: Sequence[str] | None = None,
) -> Path:
    """Saves a grid of images, one labelled row per ``(label, images)``; images are float (3, H, W)
    tensors in [0, 1] or PIL images, enlarged to ``cell`` pixels without smoothing.

    Args:
        rows: the rows, top to bottom.
        path: output PNG.
        cell: side of one tile.
        pad: gap between tiles.
        label_width: width of the row-label column.
        captions: optional text under each column (one per column).
    """
    from PIL import Image, ImageDraw

    cols = max(len(images) for _, images in rows)
    cap_h = 14 if captions else 0
    width = label_width + cols * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad + cap_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((pad, y + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(images):
            canvas.paste(_tile(img, cell), (label_width + pad + c * (cell + pad), y))
    for c, text in enumerate(captions or []):
        draw.text((label_width + pad + c * (cell + pad), height - cap_h), text[: cell // 6], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def captioned_images(
    images: Sequence[Any],
    texts: Sequence[Sequence[str]],
    path: str | Path,
    cell: int = 96,
    text_width: int = 420,
    pad: int = 6,
) -> Path:
    """Saves one image per row with its lines of text to the right (e.g. the reference caption and
    generated ones), wrapped to ``text_width`` pixels; images as in :func:`image_rows`.

    Args:
        images: float (3, H, W) tensors in [0, 1] or PIL images.
        texts: per image, the lines to write beside it.
        path: output PNG.
        cell: side of one image.
        text_width: width of the text column.
        pad: margin around and between rows.
    """
    import textwrap

    from PIL import Image, ImageDraw

    line_h, chars = 12, max(20, text_width // 6)
    wrapped = [[w for line in lines for w in textwrap.wrap(line, chars) or [""]] for lines in texts]
    heights = [max(cell, len(lines) * line_h) for lines in wrapped]
    canvas = Image.new("RGB", (cell + text_width + 3 * pad, sum(heights) + pad * (len(heights) + 1)), "white")
    draw, y = ImageDraw.Draw(canvas), pad
    for img, lines, h in zip(images, wrapped, heights):
        canvas.paste(_tile(img, cell), (pad, y))
        for i, line in enumerate(lines):
            draw.text((cell + 2 * pad, y + i * line_h), line, fill=(0, 0, 0))
        y += h + pad
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
