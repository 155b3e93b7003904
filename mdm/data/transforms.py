"""Two-view image transforms for masked image modeling, driven by an explicit ``random.Random``.

BEiT (``DataAugmentationForBEiT``) crops once and resizes the same box twice: the backbone view
(normalised) and the tokenizer view (values in [0, 1], e.g. 112 px for the DALL-E dVAE, 224 px for
VQ-KD). torchvision's ``RandomResizedCrop.get_params`` draws from the global torch RNG; here every draw
comes from the ``rng`` argument, so a sample's augmentation is a function of its position in the stream
and a resumed run reproduces it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class ViewConfig:
    """Augmentation of pretraining images.

    Attributes:
        crop_scale: RandomResizedCrop area range (BEiT: (0.08, 1); BEiT v2: (0.2, 1)).
        crop_ratio: aspect-ratio range.
        hflip: random horizontal flip.
        mean / std: normalisation of the backbone view.
        tokenizer_size: side of the tokenizer view (0 = the backbone's image size).
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokenizer_size: int = 0


def crop_box(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random):
    """(left, top, right, bottom) of a random resized crop (torchvision's algorithm, our RNG)."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    side = min(w, h)  # fallback: centre square
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def two_views(
    img: Image.Image, size: int, cfg: ViewConfig, rng: random.Random, augment: bool = True
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(backbone view (3, size, size) normalised, tokenizer view in [0, 1], flipped?) of one image.

    With ``augment=False`` the whole image is resized (precomputed codes describe the whole image).
    """
    if augment:
        box = crop_box(img.width, img.height, cfg.crop_scale, cfg.crop_ratio, rng)
        img = img.crop(box)
    flip = augment and cfg.hflip and rng.random() < 0.5
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = to_tensor(img.resize((size, size), Image.Resampling.BICUBIC))
    tsize = cfg.tokenizer_size or size
    tok_view = view if tsize == size else to_tensor(img.resize((tsize, tsize), Image.Resampling.LANCZOS))
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (view - mean) / std, tok_view, flip
