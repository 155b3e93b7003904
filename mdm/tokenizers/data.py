"""Images for the tokenizer commands: reading files and WebDataset shards, the demo images, batches.

Every image becomes RGB: grey-scale and palette images are converted, RGBA/LA are composited over
white, 16-bit images are rescaled; an unreadable file raises :class:`ImageReadError` naming it.
Shards follow the plain WebDataset convention: a tar whose members ``<key>.<ext>`` are grouped by key
(the member path up to the first dot of its base name), e.g. ``000042.jpg``, ``000042.txt``,
``000042.tok.npy``; they are read through :mod:`mdm.data.shard_reader` (local paths or any URL
webdataset opens).
"""

from __future__ import annotations

import glob
import io
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mdm.tokenizers.config import ImageDataConfig

__all__ = [
    "IMAGE_EXTS",
    "ImageReadError",
    "decode_image",
    "to_tensor",
    "list_image_files",
    "list_shards",
    "iter_shard",
    "image_member",
    "demo_images",
    "iter_images",
    "load_images",
    "BatchStream",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


class ImageReadError(ValueError):
    """An image file or shard member could not be decoded; the message names it."""


def decode_image(data: bytes | Path, name: str | None = None) -> Image.Image:
    """Decodes an image file (path or bytes) to RGB.

    Args:
        data: the file or its bytes.
        name: what to call it in errors (default: the path).
    """
    name = name or str(data if isinstance(data, Path) else "<bytes>")
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for corrupt or unsupported files
        raise ImageReadError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(p, recursive=True)) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise FileNotFoundError(f"{p}: no file matches")
        out += [Path(m) for m in matches]
    return out


def list_image_files(paths: list[str]) -> list[Path]:
    """Image files named by ``paths`` (files, folders searched recursively, glob patterns), sorted."""
    files: list[Path] = []
    for p in _expand(paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower().lstrip(".") in IMAGE_EXTS)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def list_shards(paths: list[str]) -> list[str]:
    """Tar shards named by ``paths``: local files, folders of ``*.tar`` and globs (sorted), or URLs
    webdataset opens (``https://``, ``pipe:CMD``, ...), all with brace patterns.
    """
    from mdm.data.shard_reader import expand_shards

    return expand_shards(paths, "--shards")


def iter_shard(path: str | Path) -> Iterator[dict[str, bytes | str]]:
    """Samples of a tar shard (a path or URL): ``{"__key__": key, ext: bytes, ...}`` in file order.

    Raises:
        ImageReadError: the shard cannot be read to its end (the message names it and why).
    """
    from mdm.data.shard_reader import ShardReadError, iter_tar_samples

    try:
        for _, sample in iter_tar_samples(path):
            yield sample
    except ShardReadError as e:
        raise ImageReadError(f"not a readable tar shard: {e}") from None


def image_member(sample: dict[str, bytes | str]) -> str | None:
    """The extension of the sample's image member, if any."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


def _fallback_scene(rng: random.Random, size: int) -> Image.Image:
    """Coloured ellipses and rectangles on a light background (used when mdm.data.demo is absent)."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randint(0, size * 2 // 3), rng.randint(0, size * 2 // 3)
        s = rng.randint(size // 8, size // 3)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + s, y0 + s), fill=colour)
    return img


def demo_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic demo images (mdm's rendered shape scenes; a built-in fallback otherwise)."""
    try:
        from mdm.data.demo.scenes import make_scenes, render
    except ImportError:
        rng = random.Random(f"mdm-tokenizer-demo:{seed}")
        return [_fallback_scene(rng, size) for _ in range(n)]
    return [render(scene, size=size) for scene in make_scenes(n, seed, tag="tokenizer")]


def iter_images(cfg: ImageDataConfig, seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    """One pass over the configured images as (name, RGB image)."""
    if cfg.source == "demo":
        for i, img in enumerate(demo_images(cfg.num_images, cfg.demo_size, seed)):
            yield f"demo/{i:06d}", img
    elif cfg.source == "folder":
        for path in list_image_files(cfg.paths):
            yield str(path), decode_image(path)
    elif cfg.source == "shards":
        for shard in list_shards(cfg.paths):
            for sample in iter_shard(shard):
                ext = image_member(sample)
                if ext is not None:
                    name = f"{shard}:{sample['__key__']}.{ext}"
                    yield name, decode_image(sample[ext], name)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown image source {cfg.source!r} (demo, folder, shards)")


def load_images(cfg: ImageDataConfig, size: int, limit: int, seed: int = 0) -> torch.Tensor:
    """Up to ``limit`` images resized (whole, no crop) to ``size``: float (N, 3, size, size) in [0, 1]."""
    out = []
    for _, img in iter_images(cfg, seed):
        out.append(to_tensor(img.resize((size, size), Image.Resampling.BICUBIC)))
        if len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no images found in {cfg.source} {cfg.paths}")
    return torch.stack(out)


def _crop_box(w: int, h: int, scale: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """A random box of area fraction in ``scale`` and aspect ratio in [3/4, 4/3] (falls back to the whole image)."""
    for _ in range(10):
        area = w * h * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
        log_r = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g))
        cw, ch = round((area * np.exp(log_r)) ** 0.5), round((area / np.exp(log_r)) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            x = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            y = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            return x, y, x + cw, y + ch
    return 0, 0, w, h


class BatchStream:
    """Endless batches (B, 3, size, size) in [0, 1] of randomly cropped and flipped training images.

    Demo images are kept in memory; files and shards are streamed through a shuffle buffer and read
    again each epoch. All randomness comes from ``generator``.
    """

    def __init__(
        self, cfg: ImageDataConfig, size: int, batch_size: int, generator: torch.Generator, seed: int = 0
    ):
        self.cfg, self.size, self.batch_size, self.g, self.seed = cfg, size, batch_size, generator, seed
        self._cache = [img for _, img in iter_images(cfg, seed)] if cfg.source == "demo" else None
        self._it = self._images()

    def _images(self) -> Iterator[Image.Image]:
        while True:
            if self._cache is not None:
                for i in torch.randperm(len(self._cache), generator=self.g).tolist():
                    yield self._cache[i]
                continue
            buffer: list[Image.Image] = []
            count = 0
            for _, img in iter_images(self.cfg, self.seed):
                count += 1
                buffer.append(img)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(int(torch.randint(0, len(buffer), (1,), generator=self.g)))
            if count == 0:
                raise ValueError(f"no images found in {self.cfg.source} {self.cfg.paths}")
            for i in torch.randperm(len(buffer), generator=self.g).tolist():
                yield buffer[i]

    def _augment(self, img: Image.Image) -> torch.Tensor:
        box = _crop_box(img.width, img.height, self.cfg.crop_scale, self.g)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.cfg.flip and float(torch.rand(1, generator=self.g)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        return torch.stack([self._augment(next(self._it)) for _ in range(self.batch_size)])
