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
