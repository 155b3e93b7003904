"""VLMo's ITM: the hard-negative sampler (positives never drawn, harder negatives drawn more often, the
same distribution as VLMo's zeroed softmax), the 3B fusion batch, the loss against a hand computation,
and the config / ordering rules (ITM reads ITC's similarities of the same step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdm.config import ConfigError, from_dict
from mdm.objectives import ContrastiveSimilarities, ObjectivesConfig, sample_hard_negatives
from mdm.objectives.itm import false_negatives, hard_negative_batch
from tests.test_objectives import B, make_batches, make_model


def test_positives_are_never_drawn_even_when_they_dominate():
    g = torch.Generator().manual_seed(0)
    N, rows, offset = 6, 4, 2  # this rank's pairs are columns 2..5 of the global batch
    sim = torch.randn(rows, N, generator=g)
    positive = torch.arange(rows) + offset
    sim[torch.arange(rows), positive] += 100.0  # VLMo's zeroed softmax would underflow to all zeros here
    drawn = torch.stack([sample_hard_negatives(sim, positive, g) for _ in range(500)])  # (500, rows)
    assert not (drawn == positive).any()
    assert set(drawn.unique().tolist()) == set(range(N))  # every other column does come up


def test_harder_negatives_are_drawn_more_often_in_proportion_to_softmax():
    # one row, four candidates: the positive (column 0) and negatives of similarity 2, 1, 0
    sim = torch.tensor([[5.0, 2.0, 1.0, 0.0]])
    n = 20000
    drawn = sample_hard_negatives(
        sim.expand(n, 4), torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(1)
    )
    freq = torch.bincount(drawn, minlength=4).double() / n
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), 0)  # 0.665, 0.245, 0.090
    # Tolerance: 5 binomial standard deviations, sqrt(p (1 - p) / n) <= 0.0034, so a correct sampler
    # fails with probability < 1e-6 whatever the seed, while a uniform sampler (1/3 each) or one that
    # ignored the similarities' scale misses by > 0.1.
    tol = 5 * math.sqrt(0.25 / n)
    assert freq[0] == 0.0
    assert torch.allclose(freq[1:], expected, atol=tol), (freq, expected)
    assert freq[1] > freq[2] > freq[3]
    # the distribution is VLMo's: softmax over every column, the positive's weight zeroed, renormalised
    vlmo = torch.softmax(sim.double(), 1)[0]
    vlmo[0] = 0
    assert torch.allclose(vlmo[1:] / vlmo.sum(), expected)


def test_sampler_needs_a_negative_and_uses_its_generator_only():
    with pytest.raises(ValueError, match="at least 2 candidates"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), None)
    sim = torch.randn(8, 8)
    pos = torch.arange(8)
    state = torch.get_rng_state()
    a = sample_hard_negatives(sim, pos, torch.Generator().manual_seed(3))
    b = sample_hard_negatives(sim, pos, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_excluded_candidates_are_never_drawn_and_a_fully_excluded_row_falls_back():
    g = torch.Generator().manual_seed(2)
    sim = torch.zeros(3, 5)
    sim[:, 1] = 50.0  # the hardest candidate of every row, excluded in rows 0 and 1
    positive = torch.tensor([0, 2, 4])
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 1] = True
    exclude[2, :4] = True  # row 2: everything but its positive excluded -> its candidates come back
    drawn = torch.stack([sample_hard_negatives(sim, positive, g, exclude) for _ in range(400)])
    assert not (drawn == positive).any()
    assert not (drawn[:, :2] == 1).any()  # never the excluded hard one
    assert set(drawn[:, 0].tolist()) == {2, 3, 4} and set(drawn[:, 1].tolist()) == {0, 3, 4}
    assert (drawn[:, 2] == 1).float().mean() > 0.9  # the fallback row samples by similarity again
    assert not exclude[2, 4]  # the caller's mask is not modified


def test_false_negatives_are_the_same_image_or_the_same_caption():
    ids = torch.tensor([[5, 7, 9, 0], [5, 7, 9, 3], [5, 7, 9, 4], [5, 8, 9, 9]])
    pad = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    image_id = torch.tensor([10, 11, 12, 10])  # pairs 0 and 3 show the same image
    out = false_negatives(image_id[2:], image_id, torch.tensor([2, 3]), ids, pad)  # a rank holding 2, 3
    # pair 2: caption equal to pair 0's at every real position (padding ids differ: still equal);
    # pair 1 differs only at position 3, which is padding in pair 2 but real in pair 1
    assert out.tolist() == [[True, False, True, False], [True, False, False, True]]


def _itc_itm_model():
    model = make_model(["itm", "itc"])  # listed in the wrong order: ITC still runs first
    model.objectives["itm"].generator = torch.Generator().manual_seed(5)
    return model


def test_itm_runs_after_itc_and_matches_a_hand_computation():
    model = _itc_itm_model()
    assert list(model.objectives) == ["itc", "itm"]
    batch = make_batches()["pair"]
    out = model({"pair": batch})
    assert out["itm_count"].item() == 3 * B
    assert out["loss"].item() == pytest.approx(out["itc_loss"].item() + out["itm_loss"].item(), rel=1e-6)

    # the same negatives by hand: ITC's similarities, the sampler with the same seed, one fusion pass each
    itc, head = model.objectives["itc"], model.heads["itm"]
    context: dict = {}
    with torch.no_grad():
        itc(model.backbone, batch, context=context)
        sims = context["itc"]
        pairs = hard_negative_batch(
            batch["image"], batch["text"], batch["text_padding_mask"], sims, itc.cross_rank,
            torch.Generator().manual_seed(5),
        )  # fmt: skip
        assert not (pairs["negative_image"] == torch.arange(B)).any()
        assert not (pairs["negative_text"] == torch.arange(B)).any()
        logits = []
        for i in range(3 * B):  # one pair at a time, with its own padding
            keep = ~pairs["text_padding_mask"][i]
            x = model.backbone(image=pairs["image"][i : i + 1], text=pairs["text"][i : i + 1, keep])
            logits.append(head(x[:, 0]))
        logits = torch.cat(logits)
    labels = torch.tensor([1] * B + [0] * (2 * B))
    assert torch.equal(pairs["labels"], labels)
    # pair b of the second block is text b with the drawn image; of the third, image b with the drawn text
    i = pairs["negative_image"][0]
    assert torch.equal(pairs["image"][B], batch["image"][i]) and torch.equal(
        pairs["text"][B], pairs["text"][0]
    )
    assert out["itm_loss"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_itm_trains_the_fusion_path_and_its_head():
    model = _itc_itm_model().train()
    model({"pair": make_batches()["pair"]})["itm_loss"].backward()
    assert model.heads["itm"].fc.weight.grad.abs().sum() > 0
    assert model.heads["itm"].pooler.dense.weight.grad.abs().sum() > 0
    vl = [p.grad for n, p in model.backbone.named_parameters() if ".ffn.vl." in n]
    assert vl and all(g is not None and g.abs().sum() > 0 for g in vl)  # the top layer's VL-FFN
    names = {k for k in model.state_dict() if k.startswith("heads.itm.")}
    assert names == {
        f"heads.itm.{m}.{p}" for m in ("pooler.norm", "pooler.dense", "fc") for p in ("weight", "bias")
    }


def test_itm_needs_itc_and_a_generator():
    with pytest.raises(ConfigError, match="add itc to the objectives"):
        from_dict(ObjectivesConfig, {"objectives": ["mlm", "itm"]})
    model = make_model(["itc", "itm"])
    with pytest.raises(ValueError, match="no random source"):
        model({"pair": make_batches()["pair"]})
    with pytest.raises(ValueError, match="list itc among the objectives"):
        model.objectives["itm"](model.backbone, make_batches()["pair"], context={})
    sims = ContrastiveSimilarities(torch.zeros(2, 4), torch.zeros(2, 4), offset=2)
    assert sims.positives().tolist() == [2, 3]
