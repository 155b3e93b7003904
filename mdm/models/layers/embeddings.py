"""Patch and position embeddings of the Multiway Transformer.

Position tables follow fairseq/torchscale: row ``i + 2`` holds position ``i`` (rows 0 and 1 are never
used). We keep that layout so that unilm checkpoints round-trip exactly. In joint input the text
positions restart at 0 (row 2), as in torchscale's BEiT3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Rows of a position table before the first real position (fairseq's padding offset).
POS_OFFSET = 2


class PatchEmbed(nn.Module):
    """Image → patch tokens, with a [CLS] token and a [MASK] token for masked image modeling.

    Args:
        patch_size: side of a square patch.
        in_chans: input channels.
        dim: output width.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeds ``image`` (B, C, H, W) into (B, 1 + P, D), [CLS] first.

        Args:
            image: pixels, already normalised.
            image_mask: (B, P) bool, True where the patch is replaced by the [MASK] embedding.
        """
        x = self.proj(image).flatten(2).transpose(1, 2)  # (B, P, D)
        if image_mask is not None:
            w = image_mask.unsqueeze(-1).to(x.dtype)  # (B, P, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)


def resize_vision_pos_table(
    table: torch.Tensor, new_grid: int, num_extra: int = POS_OFFSET + 1
) -> torch.Tensor:
    """Bicubically resizes a (num_extra + g*g, D) position table to ``new_grid`` × ``new_grid`` patches.

    The first ``num_extra`` rows (fairseq offset rows and [CLS]) are kept as they are, as unilm's
    ``load_model_and_may_interpolate`` does.
    """
    extra, grid_rows = table[:num_extra], table[num_extra:]
    old_grid = math.isqrt(grid_rows.shape[0])
    if old_grid * old_grid != grid_rows.shape[0]:
        raise ValueError(f"position table has {grid_rows.shape[0]} grid rows, not a square number")
    if old_grid == new_grid:
        return table
    dim = table.shape[1]
    g = grid_rows.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(table.dtype)
    return torch.cat([extra, g], dim=0)


class AudioPatchEmbed(nn.Module):
    """Log-mel spectrogram → patch tokens, with an audio [CLS] and an audio [MASK] token.

    The spectrogram (B, T, F) is a one-channel time × frequency image; a Conv2d with a ``patch_size``
    square kernel and stride cuts it into (T/p) × (F/p) patches, flattened time-major (patch index
    ``t · F/p + f``), as AudioMAE's ``patch_embed.proj`` (Huang et al., 2022) and BEATs'
    ``patch_embedding`` (Chen et al., 2023) do.

    Args:
        patch_size: side of a square patch (16 in AudioMAE and BEATs).
        dim: output width.
    """

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, audio: torch.Tensor, audio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeds ``audio`` (B, T, F) into (B, 1 + P, D), [CLS] first.

        Args:
            audio: normalised log-mel filterbanks; T and F multiples of the patch size.
            audio_mask: (B, P) bool, True where the patch is replaced by the [MASK] embedding.
        """
        x = self.proj(audio.unsqueeze(1)).flatten(2).transpose(1, 2)  # (B, 1, T, F) → (B, P, D)
        if audio_mask is not None:
            w = audio_mask.unsqueeze(-1).to(x.dtype)  # (B, P, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1)


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions of a ``rows × cols`` grid in raster order, (rows·cols, dim).

    The first half of the channels encodes the row (for audio: the time patch), the second the column
    (frequency); each half is ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 10000^(-k / (dim/4))`` (MAE).
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols) each

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega  # (rows·cols, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (rows·cols, dim/2)

    return torch.cat([enc(r), enc(c)], dim=1).float()


def audio_pos_table(time_patches: int, freq_patches: int, dim: int) -> torch.Tensor:
    """The initial audio position table, (1 + time·freq, dim): row 0 ([CLS]) zero, then
    :func:`sincos_2d` over the time × frequency patch grid (time-major, as the patches)."""
    return torch.cat([torch.zeros(1, dim), sincos_2d(time_patches, freq_patches, dim)], dim=0)


def resize_audio_pos_table(table: torch.Tensor, freq_patches: int, time_patches: int) -> torch.Tensor:
    """A (1 + t0·f, D) audio position table for ``time_patches`` time patches.

    Shorter clips take the first rows (the first seconds keep their positions, as AudioMAE crops its
    table for 5-second ESC-50 clips); longer ones interpolate linearly along time. Row 0 ([CLS]) and
    the frequency axis are kept.
    """
    cls, grid = table[:1], table[1:]
    t0 = grid.shape[0] // freq_patches
    if t0 * freq_patches != grid.shape[0]:
        raise ValueError(f"audio position table has {grid.shape[0]} rows, not a multiple of {freq_patches}")
    if time_patches <= t0:
        return table[: 1 + time_patches * freq_patches]
    D = table.shape[1]
    g = grid.reshape(1, t0, freq_patches * D).transpose(1, 2).float()  # (1, f·D, t0)
    g = F.interpolate(g, size=time_patches, mode="linear", align_corners=True)  # (1, f·D, t)
    g = g.transpose(1, 2).reshape(time_patches * freq_patches, D).to(table.dtype)
    return torch.cat([cls, g], dim=0)
