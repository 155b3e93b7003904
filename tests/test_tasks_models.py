"""Task heads (unilm parameter names, pooling positions), losses against hand formulas, retrieval recall."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdm.models import create_model
from mdm.tasks.classification import ClassificationModel
from mdm.tasks.nlvr2 import NLVR2Model
from mdm.tasks.retrieval import ContrastiveLoss, RetrievalModel, retrieval_recalls
from mdm.tasks.vqav2 import VQAModel, vqa_score


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny():
    torch.manual_seed(0)
    return create_model("beit3_tiny", depth=2, embed_dim=32, num_heads=2, ffn_dim=64, img_size=32)


class FakeBackbone(nn.Module):
    """Returns a fixed (B, N, D) tensor and records what it was called with."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.cfg = type("C", (), {"embed_dim": out.shape[-1]})()
        self.calls: list[dict] = []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, **kw):
        self.calls.append(kw)
        return self.out + self.w

    def no_weight_decay(self):
        return set()


def test_unilm_head_names_and_shapes():
    D = 32
    vqa = {
        n: tuple(p.shape) for n, p in VQAModel(tiny(), 7).named_parameters() if not n.startswith("backbone.")
    }
    assert vqa == {
        "pooler.norm.weight": (D,),
        "pooler.norm.bias": (D,),
        "pooler.dense.weight": (D, D),
        "pooler.dense.bias": (D,),
        "head.0.weight": (2 * D, D),
        "head.0.bias": (2 * D,),
        "head.1.weight": (2 * D,),
        "head.1.bias": (2 * D,),
        "head.3.weight": (7, 2 * D),
        "head.3.bias": (7,),
    }
    nlvr = NLVR2Model(tiny(), init_scale=0.001)
    names = sorted(n for n in nlvr.state_dict() if n.startswith("head."))
    assert names == sorted(
        f"head.{m}.{p}" for m in ("norm1", "dense1", "norm2", "dense2") for p in ("weight", "bias")
    )
    assert nlvr.head.dense1.weight.shape == (2 * D, 4 * D) and nlvr.head.dense2.weight.shape == (2, 2 * D)
    assert nlvr.head.dense1.weight.abs().max() <= 0.02 * 0.001 + 1e-12  # trunc-normal(±0.02) × 0.001
    ret = RetrievalModel(tiny())
    assert sorted(ret.head_parameter_names()) == ["language_head.weight", "logit_scale", "vision_head.weight"]
    assert (
        ret.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and "logit_scale" in ret.no_weight_decay()
    )
    cls = ClassificationModel(tiny(), 5)
    assert sorted(cls.head_parameter_names()) == [
        "fc_norm.bias",
        "fc_norm.weight",
        "head.bias",
        "head.weight",
    ]
    assert "backbone.vision_pos_embed.weight" in cls.no_weight_decay()


def test_vqa_pools_the_vision_cls_and_uses_bce_times_classes():
    B, N, D, C = 3, 6, 8, 5
    out = torch.randn(B, N, D)
    model = VQAModel(FakeBackbone(out), C)
    batch = {
        "image": torch.zeros(B, 3, 32, 32),
        "text": torch.zeros(B, 2, dtype=torch.long),
        "text_padding_mask": torch.zeros(B, 2, dtype=torch.bool),
        "targets": torch.rand(B, C),
    }
    logits = model.logits(batch)
    assert torch.allclose(logits, model.head(torch.tanh(model.pooler.dense(model.pooler.norm(out[:, 0])))))
    t, z = batch["targets"], logits
    bce = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z))).mean() * C
    assert model(batch)["vqa_loss"].item() == pytest.approx(bce.item(), rel=1e-5)


def test_vqa_score_is_the_soft_target_of_the_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0]])
    assert vqa_score(logits, targets).item() == pytest.approx((0.6 + 0.3) / 2 * 100)


def test_nlvr2_concatenates_cls_and_text_start_of_both_pairs():
    B, P, T, D = 2, 4, 3, 8
    out = torch.randn(2 * B, 1 + P + T, D)
    model = NLVR2Model(FakeBackbone(out))
    text = torch.randint(3, 50, (B, T))
    batch = {
        "image": torch.zeros(B, 3, 32, 32),
        "image2": torch.ones(B, 3, 32, 32),
        "text": text,
        "text_padding_mask": torch.zeros(B, T, dtype=torch.bool),
        "labels": torch.tensor([0, 1]),
    }
    logits = model.logits(batch)
    call = model.backbone.calls[-1]
    assert torch.equal(call["image"][B:], batch["image2"]) and torch.equal(call["text"][B:], text)
    pair = torch.cat([out[:, 0], out[:, 1 + P]], -1)  # vision [CLS] and text [bos] at n_vision = 1 + P
    assert torch.allclose(logits, model.head(torch.cat([pair[:B], pair[B:]], -1)))
    assert model(batch)["nlvr2_loss"].item() == pytest.approx(F.cross_entropy(logits, batch["labels"]).item())


def test_pool_mean_averages_patches_and_real_text_tokens_only():
    """``task.pool=mean``: VQA pools the mean of (mean patch, mean real word), NLVR2 concatenates the two
    means of each pair, retrieval encodes mean patch / mean real word; padding never counts."""
    B, P, T, D = 2, 4, 3, 8
    pad = torch.tensor([[False, False, True], [False, False, False]])
    real = (~pad).float()

    def means(out):  # independent: loops over tokens
        vis = torch.stack([sum(out[b, 1 + i] for i in range(P)) / P for b in range(out.shape[0])])
        rows = []
        for b in range(out.shape[0]):
            r = real[b % B]
            rows.append(sum(out[b, 1 + P + j] * r[j] for j in range(T)) / r.sum())
        return vis, torch.stack(rows)

    out = torch.randn(B, 1 + P + T, D)
    batch = {
        "image": torch.zeros(B, 3, 32, 32),
        "text": torch.zeros(B, T, dtype=torch.long),
        "text_padding_mask": pad,
    }
    vqa = VQAModel(FakeBackbone(out), 5, pool="mean")
    vis, words = means(out)
    assert torch.allclose(vqa.logits(batch), vqa.head(vqa.pooler((vis + words) / 2)), atol=1e-6)
    out2 = torch.randn(2 * B, 1 + P + T, D)
    nlvr = NLVR2Model(FakeBackbone(out2), pool="mean")
    vis, words = means(out2)
    pair = torch.cat([vis, words], -1)
    logits = nlvr.logits({**batch, "image2": torch.zeros(B, 3, 32, 32)})
    assert torch.allclose(logits, nlvr.head(torch.cat([pair[:B], pair[B:]], -1)), atol=1e-6)
    # a padded position does not matter; a real one does
    before = vqa.logits(batch)
    vqa.backbone.out = out.clone()
    vqa.backbone.out[0, 1 + P + 2] += 100.0 * torch.randn(D)  # row 0 is padded at text position 2
    assert torch.allclose(vqa.logits(batch), before, atol=1e-6)
    vqa.backbone.out[0, 1 + P + 1] += 100.0 * torch.randn(D)
    assert not torch.allclose(vqa.logits(batch), before, atol=1e-3)
    ret = RetrievalModel(tiny(), pool="mean")
    text = torch.randint(3, 50, (B, T))
    with torch.no_grad():
        x = ret.backbone(text=text, text_padding_mask=pad)
        want = F.normalize(ret.language_head(torch.stack([x[0, :2].mean(0), x[1].mean(0)])), dim=-1)
        img = torch.rand(B, 3, 32, 32)
        want_img = F.normalize(ret.vision_head(ret.backbone(image=img)[:, 1:].mean(1)), dim=-1)
    assert torch.allclose(ret.encode_text(text, pad), want, atol=1e-6)
    assert torch.allclose(ret.encode_image(img), want_img, atol=1e-6)
    with pytest.raises(ValueError, match="pool must be"):
        VQAModel(FakeBackbone(out), 5, pool="max").logits(batch)


def test_classification_mean_pools_patches_without_cls():
    out = torch.randn(2, 5, 8)
    model = ClassificationModel(FakeBackbone(out), 3)
    logits = model.logits({"image": torch.zeros(2, 3, 32, 32)})
    assert torch.allclose(logits, model.head(model.fc_norm(out[:, 1:].mean(1))))


def test_contrastive_loss_matches_the_hand_formula():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    scale = torch.tensor(10.0)
    s = scale * img @ txt.t()
    i2t = [-(s[i, i] - torch.logsumexp(s[i], 0)) for i in range(4)]
    t2i = [-(s[i, i] - torch.logsumexp(s[:, i], 0)) for i in range(4)]
    want = (sum(i2t) / 4 + sum(t2i) / 4) / 2
    assert ContrastiveLoss()(img, txt, scale)["retrieval_loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_retrieval_model_trains_and_encodes_unit_vectors():
    model = RetrievalModel(tiny())
    batch = {
        "image": torch.randn(3, 3, 32, 32),
        "text": torch.randint(3, 100, (3, 5)),
        "text_padding_mask": torch.zeros(3, 5, dtype=torch.bool),
    }
    out = model(batch)
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.vision_head.weight.grad is not None
    feats = model.infer(batch)
    assert torch.allclose(feats["image_feats"].norm(dim=-1), torch.ones(3), atol=1e-5)


def _brute_force_recalls(img, txt, text_image, ks=(1, 5, 10)):
    """Loop implementation of the same rule: a wrong candidate that ties with the ground truth ranks above it."""
    scores = (img @ txt.t()).tolist()
    n_img, n_txt = len(scores), len(scores[0])
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            best = max(scores[i][t] for t in range(n_txt) if text_image[t] == i)
            above = sum(1 for t in range(n_txt) if text_image[t] != i and scores[i][t] >= best)
            hits += above < k
        out[f"tr_r{k}"] = 100 * hits / n_img
        hits = 0
        for t in range(n_txt):
            gt = scores[text_image[t]][t]
            above = sum(1 for i in range(n_img) if i != text_image[t] and scores[i][t] >= gt)
            hits += above < k
        out[f"ir_r{k}"] = 100 * hits / n_txt
    return out


def test_retrieval_recalls_count_ties_against_the_model():
    # all features equal: every candidate ties; with 2 images nothing is retrieved at k=1, all at k=5
    img, txt = torch.ones(2, 4), torch.ones(3, 4)
    r = retrieval_recalls(img, txt, torch.tensor([0, 0, 1]))
    assert (r["tr_r1"], r["ir_r1"], r["tr_r5"], r["ir_r5"]) == (0.0, 0.0, 100.0, 100.0)
    assert r["r_mean"] == pytest.approx((0 + 0 + 100 + 100 + 100 + 100) / 6)


def test_retrieval_recalls_match_brute_force_with_quantised_ties():
    torch.manual_seed(1)
    n_img, caps = 23, 3
    text_image = torch.arange(n_img).repeat_interleave(caps)
    # features on a coarse grid: many exactly equal scores
    img = torch.randint(-1, 2, (n_img, 4)).float()
    txt = img[text_image] + torch.randint(-1, 2, (n_img * caps, 4)).float()
    got = retrieval_recalls(img, txt, text_image, chunk=5)  # chunking must not matter
    want = _brute_force_recalls(img, txt, text_image.tolist())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k


def test_retrieval_head_starts_from_pretraining_itc_heads(tmp_path):
    """``mdm finetune init=DIR`` copies ``heads.itc.*`` into the retrieval projections; a partial set is an
    error naming what is missing; other tasks and directories without ITC heads are left alone."""
    from safetensors.torch import save_file

    from mdm.config import ConfigError
    from mdm.models.io import save_pretrained
    from mdm.train.finetune import load_pretraining_heads

    backbone = tiny()
    save_pretrained(backbone, tmp_path / "m")
    D = backbone.cfg.embed_dim
    itc = {
        "heads.itc.vision_head.weight": torch.randn(D, D),
        "heads.itc.language_head.weight": torch.randn(D, D),
        "heads.itc.logit_scale": torch.tensor(2.5),
        "heads.mlm.decoder.weight": torch.randn(7, D),
    }
    save_file(itc, str(tmp_path / "m" / "heads.safetensors"))
    ret = RetrievalModel(tiny())
    load_pretraining_heads(ret, str(tmp_path / "m"))
    assert torch.equal(ret.vision_head.weight, itc["heads.itc.vision_head.weight"])
    assert torch.equal(ret.language_head.weight, itc["heads.itc.language_head.weight"])
    assert ret.logit_scale.item() == 2.5
    vqa = VQAModel(tiny(), 3)
    before = {k: v.clone() for k, v in vqa.state_dict().items()}
    load_pretraining_heads(vqa, str(tmp_path / "m"))  # VQA has no pretraining head to take
    assert all(torch.equal(before[k], v) for k, v in vqa.state_dict().items())
    fresh = RetrievalModel(tiny())
    w = fresh.vision_head.weight.clone()
    load_pretraining_heads(fresh, "scratch")
    assert torch.equal(fresh.vision_head.weight, w)
    del itc["heads.itc.logit_scale"]
    save_file(itc, str(tmp_path / "m" / "heads.safetensors"))
    with pytest.raises(ConfigError, match="heads.itc.logit_scale"):
        load_pretraining_heads(RetrievalModel(tiny()), str(tmp_path / "m"))
