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
    a copy). Otherwise the tokenizer encodes ``tokenizer_image``, its own [0, 1] view of the same crop
    (never the normalised backbone view ``image``), under ``torch.no_grad()``, so no graph reaches it.

    Args:
        batch: one image or pair batch.
        tokenizer: anything with ``encode(images) -> (B, gh, gw)`` long, e.g. a
            :class:`mdm.tokenizers.base.VisualTokenizer`.
        num_patches: P of the backbone; defaults to ``batch["image_mask"].shape[1]`` when present.

    Raises:
        KeyError: the batch has neither ``image_tokens`` nor ``tokenizer_image``.
        ValueError: the code grid does not have P cells or the codes are not integers.
    """
    out = dict(batch)
    if out.get("image_tokens") is not None:
        return out
    if out.get("tokenizer_image") is None:
        raise KeyError(
            "fill_visual_tokens: batch has neither 'image_tokens' nor 'tokenizer_image' (the [0, 1] tokenizer "
            f"view); keys: {sorted(out)}"
        )
    images = out["tokenizer_image"]
    with torch.no_grad():
        codes = tokenizer.encode(images)
    if codes.ndim != 3 or codes.shape[0] != images.shape[0]:
        raise ValueError(
            f"fill_visual_tokens: tokenizer.encode(batch['tokenizer_image']) returned shape {tuple(codes.shape)}, "
            f"expected (B={images.shape[0]}, h, w)"
        )
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"fill_visual_tokens: tokenizer codes must be integers, got {codes.dtype}")
    B, h, w = codes.shape
    if num_patches is None and out.get("image_mask") is not None:
        num_patches = int(out["image_mask"].shape[1])
    if num_patches is not None and h * w != num_patches:
        raise ValueError(
            f"fill_visual_tokens: the tokenizer gives a {h}x{w} code grid ({h * w} codes) for "
            f"batch['tokenizer_image'] of size {tuple(images.shape[-2:])}, but the backbone has {num_patches} "
            "patches; the tokenizer must map to the backbone's patch grid (e.g. the dVAE at 112 px, VQ-KD at "
            "224 px for a 224/16 backbone)"
        )
    out["image_tokens"] = codes.reshape(B, h * w).long()  # (B, P), raster order like the patch embedding
    return out
