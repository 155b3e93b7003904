"""Visual-token targets from the frozen tokenizer (BEiT: dVAE codes; BEiT v2 / BEiT-3: VQ-KD codes).

The tokenizer is never part of the trained model: the engine keeps it out of the optimizer and out of
DDP/ZeRO wrapping, in eval mode, and calls :func:`fill_visual_tokens` on each batch before the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch


class VisualTokenizer(Protocol):
    """What :func:`fill_visual_tokens` needs from a tokenizer."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) tokenizer view → (B, gh, gw) long codes."""
        ...


def fill_visual_tokens(
    batch: Mapping[str, Any], tokenizer: VisualTokenizer, num_patches: int | None = None
) -> dict[str, Any]:
    """A copy of ``batch`` with ``image_tokens`` (B, P) long computed by the frozen ``tokenizer``.

    Batches that already carry ``image_tokens`` (precomputed in the shards) are returned unchanged (as
    a copy). The tokenizer sees ``tokenizer_image`` when present (its own view of the same crop), else
    ``image``. Runs under ``torch.no_grad()``, so no graph reaches the tokenizer.

    Args:
        batch: one image or pair batch.
        tokenizer: anything with ``encode(images) -> (B, gh, gw)`` long.
        num_patches: P of the backbone; defaults to ``batch["image_mask"].shape[1]`` when present.

    Raises:
        KeyError: the batch has no image.
        ValueError: the code grid does not have P cells or the codes are not integers.
    """
    out = dict(batch)
    if out.get("image_tokens") is not None:
        return out
    key = "tokenizer_image" if out.get("tokenizer_image") is not None else "image"
    if out.get(key) is None:
        raise KeyError(
            f"fill_visual_tokens: batch has neither 'tokenizer_image' nor 'image' (keys: {sorted(out)})"
        )
    images = out[key]
    with torch.no_grad():
        codes = tokenizer.encode(images)
    if codes.ndim != 3 or codes.shape[0] != images.shape[0]:
        raise ValueError(
            f"fill_visual_tokens: tokenizer.encode(batch[{key!r}]) returned shape {tuple(codes.shape)}, "
            f"expected (B={images.shape[0]}, h, w)"
        )
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"fill_visual_tokens: tokenizer codes must be integers, got {codes.dtype}")
    B, h, w = codes.shape
    if num_patches is None and out.get("image_mask") is not None:
        num_patches = int(out["image_mask"].shape[1])
    if num_patches is not None and h * w != num_patches:
        raise ValueError(
            f"fill_visual_tokens: the tokenizer gives a {h}x{w} code grid ({h * w} codes) for batch[{key!r}] "
            f"of size {tuple(images.shape[-2:])}, but the backbone has {num_patches} patches; the tokenizer "
            "view must map to the same patch grid (e.g. 112 px for the dVAE, 224 px for VQ-KD at 224/16)"
        )
    out["image_tokens"] = codes.reshape(B, h * w).long()  # (B, P), raster order like the patch embedding
    return out
