"""Masking: BEiT block-wise masking against a port of the reference algorithm, BERT MLM statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mdm.data.masking import BlockMasking, mask_text
from mdm.data.streams import random_masking


class ReferenceBlockMasking:
    """The block-wise masking loop of unilm ``beit/masking_generator.py`` (BEiT v1/v2), re-written from
    its description with a NumPy mask and an explicit ``random.Random`` in place of the global one."""

    def __init__(self, size, num_masking, min_num=16, max_num=None, min_aspect=0.3):
        self.h = self.w = size
        self.num_masking, self.min_num = num_masking, min_num
        self.max_num = num_masking if max_num is None else max_num
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _mask(self, mask, max_patches, rng):
        delta = 0
        for _ in range(10):
            area = rng.uniform(self.min_num, max_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < self.w and h < self.h:
                top, left = rng.randint(0, self.h - h), rng.randint(0, self.w - w)
                already = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - already <= max_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self, rng):
        mask = np.zeros((self.h, self.w), dtype=np.int64)
        count = 0
        while count < self.num_masking:
            delta = self._mask(mask, min(self.num_masking - count, self.max_num), rng)
            if delta == 0:
                break
            count += delta
        return mask


@pytest.mark.parametrize("grid,num", [(14, 75), (14, 78), (7, 20)])
def test_block_masking_equals_reference_draw_for_draw(grid, num):
    ours = BlockMasking(grid, num)
    ref = ReferenceBlockMasking(grid, num, min_num=ours.min_patches)
    for seed in range(300):
        a = ours(random.Random(seed))
        b = torch.from_numpy(ref(random.Random(seed))).bool().flatten()
        assert torch.equal(a, b), f"seed {seed}"


def test_block_masking_statistics_beit_v1():
    """BEiT v1: 75 of 196 patches. Reference: mean ~74.5, never above 75, exactly 75 in ~2/3 of draws."""
    gen, rng = BlockMasking(14, 75), random.Random(0)
    counts = np.array([int(gen(rng).sum()) for _ in range(3000)])
    assert counts.max() <= 75
    assert 74.0 < counts.mean() < 75.0
    assert 0.5 < (counts == 75).mean() < 0.85
    assert counts.min() >= 75 - 16  # the loop only stops early when no block of >= min size fits


def test_block_masking_blocks_are_large():
    """Every block has a drawn area >= min_patches (16); rounding h, w can bring it down to 12, never less."""
    gen, rng = BlockMasking(14, 75), random.Random(1)
    sizes = []
    for _ in range(2000):
        empty = [[False] * 14 for _ in range(14)]
        sizes.append(gen._add_block(empty, 75, rng))
    assert min(sizes) >= 12 and max(sizes) <= 75
    assert np.mean(sizes) > 30  # areas uniform in [16, 75]


def test_from_ratio_beit3_forty_percent_and_small_grids():
    gen = BlockMasking.from_ratio(14, 0.4)
    assert gen.num_masking == round(0.4 * 196) and gen.min_patches == 16
    rng = random.Random(3)
    counts = [int(gen(rng).sum()) for _ in range(300)]
    assert max(counts) <= gen.num_masking and np.mean(counts) > 0.95 * gen.num_masking
    small = BlockMasking.from_ratio(4, 0.4)  # 16 patches: min block scaled down, still masks ~6
    counts = [int(small(rng).sum()) for _ in range(300)]
    assert max(counts) <= 6 and np.mean(counts) > 4


def test_masking_uses_only_the_given_rng():
    state, tstate = random.getstate(), torch.get_rng_state()
    a = BlockMasking(14, 75)(random.Random(5))
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), tstate)
    assert torch.equal(a, BlockMasking(14, 75)(random.Random(5)))
    assert not torch.equal(a, BlockMasking(14, 75)(random.Random(6)))


def test_random_masking_exact_count():
    rng = random.Random(0)
    for _ in range(50):
        assert int(random_masking(196, 0.75, rng).sum()) == 147


BOS, PAD, EOS, MASK, VOCAB = 0, 1, 2, 99, 100


def _batch(rng, B=400, T=24):
    ids = torch.full((B, T), PAD)
    for b in range(B):
        n = rng.randint(0, T - 2)
        ids[b, : n + 2] = torch.tensor([BOS] + [rng.randrange(3, MASK) for _ in range(n)] + [EOS])
    return ids, ids.eq(PAD)


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_mlm_masking_bert_statistics(ratio):
    ids, pad = _batch(random.Random(0))
    special = (BOS, PAD, EOS, MASK)
    text_input, text_mask = mask_text(ids, pad, ratio, MASK, MASK, special, random.Random(1))
    assert not text_mask[ids.lt(3)].any()  # never bos / eos / pad
    assert torch.equal(text_input[~text_mask], ids[~text_mask])  # unselected tokens untouched
    real = (~pad & ids.ge(3)).sum(1)
    expected = torch.where(
        real > 0, (real.float() * ratio).round().clamp(min=1), torch.zeros_like(real.float())
    )
    assert torch.equal(text_mask.sum(1).float(), expected)
    sel_in, sel_orig = text_input[text_mask], ids[text_mask]
    n = sel_in.numel()
    as_mask = sel_in.eq(MASK).float().mean()
    kept = sel_in.eq(sel_orig).float().mean()
    assert abs(as_mask - 0.8) < 0.04
    assert abs(kept - 0.1) < 0.04 + 1 / 96  # 10 % kept (+ random draws that hit the original id)
    assert n > 500
    assert not any(int(i) in special for i in sel_in[sel_in.ne(MASK)])  # random ids are real pieces


def test_mlm_masking_reproducible_and_guarded():
    ids, pad = _batch(random.Random(0), B=8)
    a = mask_text(ids, pad, 0.15, MASK, MASK, (BOS, PAD, EOS, MASK), random.Random(7))
    b = mask_text(ids, pad, 0.15, MASK, MASK, (BOS, PAD, EOS, MASK), random.Random(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="no id"):
        mask_text(ids, pad, 0.15, 3, 3, (0, 1, 2, 3), random.Random(0))
