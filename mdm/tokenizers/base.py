"""The one interface of mdm's visual tokenizers.

Every visual tokenizer is an ``nn.Module`` with

- ``encode(images)``: float images in [0, 1], shape (B, C, H, W) with C ∈ {1, 3, 4} → ``LongTensor``
  (B, h, w). The tokenizer applies its own preprocessing (resize to its resolution, DALL-E's
  ``map_pixels`` or a mean/std normalisation) and runs without gradients;
- ``decode(codes)``: images in [0, 1] where the tokenizer can reconstruct pixels (the dVAE);
- ``codebook_size``, ``img_size`` and ``grid_size``;
- ``config_dict()`` / ``from_config(dict)`` so that :mod:`mdm.tokenizers.io` can save and load it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisualTokenizer", "as_rgb", "resize_images"]


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Checks a batch of [0, 1] images and returns it as 3-channel float32.

    Grey-scale (1 channel) is repeated to RGB; RGBA (4 channels) is composited over white.

    Raises:
        ValueError: wrong rank, channel count, dtype or value range (the message says what was expected).
    """
    if images.dim() == 3:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(images.shape)}; use images[None]")
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    images = images.float()
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"expected values in [0, 1], got [{lo:.3g}, {hi:.3g}]: pass unnormalised images, "
            "the tokenizer normalises them itself"
        )
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c == 4:  # straight alpha over a white background
        rgb, alpha = images[:, :3], images[:, 3:]
        return rgb * alpha + (1 - alpha)
    raise ValueError(f"expected 1, 3 or 4 channels, got {c} (shape {tuple(images.shape)})")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes (B, 3, H, W) to (B, 3, size, size) with antialiased bicubic, clamped to [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 1)


class VisualTokenizer(nn.Module):
    """Base class: images in [0, 1] → a grid of discrete codes.

    Subclasses set ``kind``, implement :meth:`preprocess`, :meth:`_encode`, :attr:`codebook_size`,
    :attr:`img_size`, :attr:`grid_size`, :meth:`config_dict` and :meth:`from_config`.
    """

    kind: ClassVar[str] = ""

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes."""
        raise NotImplementedError

    @property
    def img_size(self) -> int:
        """Side of the square input the tokenizer works at; other sizes are resized to it."""
        raise NotImplementedError

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the code grid."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Maps checked, resized [0, 1] RGB images to the network's input range."""
        raise NotImplementedError

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) of preprocessed inputs."""
        raise NotImplementedError

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Checks, converts to RGB, resizes and preprocesses a batch of [0, 1] images."""
        device = next(self.parameters()).device
        images = resize_images(as_rgb(images.to(device)), self.img_size)
        return self.preprocess(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes of a batch of images.

        Args:
            images: float (B, C, H, W) in [0, 1]; C ∈ {1, 3, 4}; any H, W (resized to ``img_size``).

        Returns:
            LongTensor (B, h, w) with values in ``[0, codebook_size)``.
        """
        return self._encode(self.prepare(images)).long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] reconstructed from codes (B, h, w)."""
        raise NotImplementedError(
            f"the {self.kind} tokenizer cannot reconstruct pixels (it has no pixel decoder)"
        )

    @property
    def can_decode(self) -> bool:
        """Whether :meth:`decode` reconstructs pixels."""
        return type(self).decode is not VisualTokenizer.decode

    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable architecture, enough for :meth:`from_config`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> VisualTokenizer:
        """Builds an (untrained) tokenizer from :meth:`config_dict` output."""
        raise NotImplementedError

    def freeze(self) -> VisualTokenizer:
        """Eval mode and no gradients: how a tokenizer is used as a MIM target."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
