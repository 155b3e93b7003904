"""Masking for masked data modeling: BEiT block-wise image masking and BERT-style text masking.

Block-wise masking follows BEiT (Bao et al., 2022), unilm ``beit/masking_generator.py``: rectangles of
at least ``min_patches`` patches with aspect ratio in [``min_aspect``, 1/``min_aspect``] are added until
``num_masking`` patches are masked (the loop may stop a little short, as the reference does). BEiT v1
masks 75 of 196 patches; BEiT-3 masks 40 % of patches for images and image-text pairs.

Text masking follows BERT: ``ratio`` of the real tokens (never [bos], [eos] or padding) are chosen;
80 % of them become [MASK], 10 % a random id, 10 % stay. Every function takes an explicit
``random.Random`` so that masks are reproducible and resumable; nothing touches the global RNG.
"""

from __future__ import annotations

import math
import random

import torch


class BlockMasking:
    """BEiT block-wise masking on a ``grid`` × ``grid`` patch grid.

    Args:
        grid: patches per side.
        num_masking: target number of masked patches (e.g. 75 of 196, or ``round(0.4 * P)``).
        min_patches: smallest block.
        max_patches: largest block (default: ``num_masking``).
        min_aspect: smallest aspect ratio (the largest is its inverse).
    """

    def __init__(
        self,
        grid: int,
        num_masking: int,
        min_patches: int = 16,
        max_patches: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        self.grid = grid
        self.num_masking = num_masking
        self.min_patches = min(min_patches, num_masking) if num_masking else min_patches
        self.max_patches = num_masking if max_patches is None else max_patches
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

    @classmethod
    def from_ratio(cls, grid: int, ratio: float, min_patches: int = 16) -> BlockMasking:
        """Masks ``round(ratio · grid²)`` patches; ``min_patches`` scales down for small grids."""
        n = round(ratio * grid * grid)
        return cls(grid, n, min_patches=max(1, min(min_patches, n // 3 or 1)))

    def _add_block(self, mask: list[list[bool]], budget: int, rng: random.Random) -> int:
        g = self.grid
        for _ in range(10):
            area = rng.uniform(self.min_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < g and 0 < w < g:
                top, left = rng.randint(0, g - h), rng.randint(0, g - w)
                new = sum(not mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < new <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    return new
        return 0

    def __call__(self, rng: random.Random) -> torch.Tensor:
        """A (grid · grid,) bool mask in raster order, True = masked."""
        mask = [[False] * self.grid for _ in range(self.grid)]
        count = 0
        while count < self.num_masking:
            budget = min(self.num_masking - count, self.max_patches)
            delta = self._add_block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask, dtype=torch.bool).flatten()


def mask_text(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    ratio: float,
    mask_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption of a batch of token ids.

    Args:
        ids: (B, T) long, ``[bos] ... [eos] [pad]...``.
        padding_mask: (B, T) bool, True at padding.
        ratio: fraction of maskable tokens to predict (at least one per row when any is maskable).
        mask_id: id of [MASK].
        vocab_size: random replacements are drawn from [0, vocab_size) minus ``special_ids``.
        special_ids: ids never chosen for prediction nor drawn as replacements.
        rng: the random source.

    Returns:
        (text_input (B, T) long, text_mask (B, T) bool: positions to predict).
    """
    B, T = ids.shape
    out = ids.clone()
    target = torch.zeros(B, T, dtype=torch.bool)
    special = set(special_ids)
    if set(range(vocab_size)) <= special:  # only reached for tiny vocabularies; avoids an endless redraw
        raise ValueError(f"mask_text: no id in [0, {vocab_size}) outside the special ids {sorted(special)}")
    for b in range(B):
        cand = [t for t in range(T) if not padding_mask[b, t] and int(ids[b, t]) not in special]
        if not cand:
            continue
        k = max(1, int(round(ratio * len(cand))))
        for t in rng.sample(cand, min(k, len(cand))):
            target[b, t] = True
            r = rng.random()
            if r < 0.8:
                out[b, t] = mask_id
            elif r < 0.9:
                new = rng.randrange(vocab_size)
                while new in special:
                    new = rng.randrange(vocab_size)
                out[b, t] = new
    return out, target
