"""Captioning: caption masking, the masked-token loss, and decoding (cached == full forward, greedy, beam
search options) on tiny random models of both layouts."""

from __future__ import annotations

import math

import pytest
import torch

from mdm.models import create_model
from mdm.tasks.caption_search import SearchConfig, _banned, beam_search, greedy_search
from mdm.tasks.caption_step import CachedScorer, FullScorer
from mdm.tasks.captioning import CaptioningModel
from mdm.tasks.captioning_data import IGNORE, mask_caption

V, IMG, BOS, EOS, MASK = 50, 32, 0, 2, 49
ARCHS = ["beit3_tiny", "vlmo_tiny"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str) -> CaptioningModel:
    torch.manual_seed(0)
    cfg = {"depth": 2, "embed_dim": 32, "num_heads": 4, "ffn_dim": 64, "img_size": IMG, "vocab_size": V}
    if arch.startswith("vlmo"):
        cfg["vl_ffn_layers"] = 1  # the top layer routes joint input (image and text) to the VL-FFN
    model = CaptioningModel(create_model(arch, **cfg))
    with torch.no_grad():  # non-trivial norms and biases, and a head sharp enough to make choices
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        model.mlm_head.weight.mul_(20.0)
    return model.eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def test_mask_caption_counts_and_positions():
    text = torch.tensor([BOS, 5, 6, 7, 8, 9, EOS, 1, 1])
    pad = torch.tensor([False] * 7 + [True] * 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        inp, lab = mask_caption(text, pad, 0.6, MASK, g)
        chosen = lab != IGNORE
        assert int(chosen.sum()) == min(int(7 * 0.6 + 0.5), 6)  # 4 of positions 1..6
        assert not chosen[0] and not chosen[7:].any()
        assert torch.equal(lab[chosen], text[chosen]) and torch.equal(inp[~chosen], text[~chosen])
    short = torch.tensor([BOS, EOS, 1])
    _, lab = mask_caption(short, torch.tensor([False, False, True]), 0.01, MASK, g)
    assert (lab != IGNORE).tolist() == [False, True, False]  # at least one: the [eos]


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_is_finite_and_only_masked_positions_count(arch):
    model = tiny(arch).train()
    text = torch.tensor([[BOS, 5, MASK, 7, EOS], [BOS, MASK, EOS, 1, 1]])
    labels = torch.full_like(text, IGNORE)
    labels[0, 2], labels[1, 1] = 6, 9
    batch = {"image": images(), "text": text, "text_padding_mask": text == 1, "mlm_labels": labels}
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert model.mlm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_step_logits_equal_full_forward(arch):
    model = tiny(arch)
    img = images()
    full = FullScorer(model.backbone, model.mlm_head, img, MASK)
    cached = CachedScorer(model.backbone, model.mlm_head, img, MASK)
    tokens = torch.full((2, 1), BOS)
    for t in range(6):  # a forced sequence, so both see the same prefixes
        a, b = full.step(tokens), cached.step(tokens)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        tokens = torch.cat([tokens, torch.tensor([[3 + t], [10 + t]])], 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_uncached(arch, beam):
    model = tiny(arch)
    search = SearchConfig(beam_size=beam, max_len=8, length_penalty=0.6)
    ids_c, sc_c = model.generate(images(), BOS, EOS, MASK, search, use_cache=True)
    ids_f, sc_f = model.generate(images(), BOS, EOS, MASK, search, use_cache=False)
    assert ids_c == ids_f
    assert all(len(s) > 1 for s in ids_c)
    for a, b in zip(sc_c, sc_f):
        assert abs(a - b) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_of_one_is_greedy(arch):
    model = tiny(arch)
    # length_penalty 0: a beam of one keeps the greedy hypothesis (with α > 0 a longer one may win)
    greedy = model.generate(images(), BOS, EOS, MASK, SearchConfig(beam_size=1, max_len=8))
    scorer = CachedScorer(model.backbone, model.mlm_head, images(), MASK)
    beam = beam_search(scorer, 2, BOS, EOS, SearchConfig(beam_size=1, max_len=8, length_penalty=0.0))
    assert beam[0] == greedy[0]
    for a, b in zip(beam[1], greedy[1]):
        assert abs(a - b) <= 1e-5


class TableScorer:
    """A fake scorer: next-token logits from a function of the prefix (rows are independent)."""

    def __init__(self, fn):
        self.fn = fn

    def reorder(self, index):
        pass

    def step(self, tokens):
        return torch.stack([self.fn(row) for row in tokens.tolist()])


def test_no_repeat_ngram_is_respected():
    assert _banned([5, 6, 7, 5, 6], 3) == {7} and _banned([5, 6], 3) == set() and _banned([4, 4], 1) == {4}
    loop = lambda row: torch.nn.functional.one_hot(torch.tensor(3 + len(row) % 2), 8).float() * 5  # noqa: E731
    for beam in (1, 2):
        search = SearchConfig(beam_size=beam, max_len=8, no_repeat_ngram_size=2, length_penalty=0.0)
        decode = greedy_search if beam == 1 else beam_search
        ids, _ = decode(TableScorer(loop), 1, BOS, EOS, search)
        seq = ids[0]
        grams = [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]
        assert len(grams) == len(set(grams)), seq
        free, _ = decode(
            TableScorer(loop), 1, BOS, EOS, SearchConfig(beam_size=beam, max_len=8, length_penalty=0.0)
        )
        assert free[0][:4] == [4, 3, 4, 3]  # without the ban the loop repeats


def _short_or_long(row):
    """After [bos]: [eos] at once with p=0.4, or word 3 (p=0.6) followed by words with p≈1, then [eos]."""
    logits = torch.full((8,), -30.0)
    if len(row) == 1:
        logits[EOS], logits[3] = math.log(0.4), math.log(0.6)
    elif len(row) < 5:
        logits[4] = 0.0
    else:
        logits[EOS] = 0.0
    return logits


def _beam(fn, **kw):
    return beam_search(TableScorer(fn), 1, BOS, EOS, SearchConfig(beam_size=2, max_len=8, **kw))


def _eos_first(row):
    """As :func:`_short_or_long`, but [eos] is the likelier first token."""
    if len(row) > 1:
        return _short_or_long(row)
    return torch.tensor([-30.0, -30.0, 0.0, -1.0, -30.0, -30.0, -30.0, -30.0])


def test_length_penalty():
    long_score = math.log(0.6)  # [3, 4, 4, 4, eos]: the likelier caption, 5 tokens
    ids, scores = _beam(_short_or_long, length_penalty=0.0)
    assert ids[0] == [3, 4, 4, 4, EOS] and scores[0] == pytest.approx(long_score, abs=1e-4)
    ids, scores = _beam(_short_or_long, length_penalty=1.0)  # normalised by length: still the long one
    assert ids[0] == [3, 4, 4, 4, EOS] and scores[0] == pytest.approx(long_score / 5, abs=1e-4)
    # α < 0 punishes length: log(0.4) / 1 beats log(0.6) · 5³
    ids, scores = _beam(_short_or_long, length_penalty=-3.0)
    assert ids[0] == [EOS] and scores[0] == pytest.approx(math.log(0.4), abs=1e-4)
    # α > 0 favours length: [eos] first (p≈0.73) wins unnormalised, the long caption (p≈0.27) with α = 2
    assert _beam(_eos_first, length_penalty=0.0)[0][0] == [EOS]
    assert _beam(_eos_first, length_penalty=2.0)[0][0] == [3, 4, 4, 4, EOS]


def test_min_len():
    assert greedy_search(TableScorer(_eos_first), 1, BOS, EOS, SearchConfig(max_len=8))[0][0] == [EOS]
    ids, _ = greedy_search(TableScorer(_eos_first), 1, BOS, EOS, SearchConfig(max_len=8, min_len=1))
    assert ids[0] == [3, 4, 4, 4, EOS]
    ids, _ = _beam(_eos_first, length_penalty=0.0, min_len=2)
    assert ids[0] == [3, 4, 4, 4, EOS]
