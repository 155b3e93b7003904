"""Two-stage retrieval (VLMo): ITM trained beside the contrastive loss, dual-encoder top k re-ranked by
the fusion encoder's ITM score, the ITM head through init, safetensors and unilm export."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from mdm.cli import main as mdm_main
from mdm.models import create_model
from mdm.objectives import itm
from mdm.objectives.contrastive import ContrastiveSimilarities
from mdm.tasks import TaskConfig, TaskDataConfig, build_task
from mdm.tasks.fixtures import HashTokenizer, write_karpathy
from mdm.tasks.retrieval import KS, RetrievalModel, retrieval_recalls
from mdm.tasks.retrieval_rerank import rerank_recalls, reranked_matrix


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str = "vlmo_tiny"):
    torch.manual_seed(0)
    return create_model(arch, depth=2, embed_dim=32, num_heads=2, ffn_dim=64, img_size=32)


def _batch(B: int = 4, g: int = 0):
    gen = torch.Generator().manual_seed(g)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    pad[0, 4:] = True
    return {
        "image": torch.randn(B, 3, 32, 32, generator=gen),
        "text": torch.randint(3, 100, (B, 6), generator=gen),
        "text_padding_mask": pad,
    }


def test_itm_is_trained_beside_the_contrastive_loss():
    """``loss = retrieval_loss + itm_weight * itm_loss``; the ITM head and the fusion pass get gradients."""
    torch.manual_seed(1)
    model = RetrievalModel(tiny(), itm_weight=0.5)
    out = model(_batch())
    assert {"itm_loss", "itm_acc", "retrieval_loss"} <= out.keys()
    assert out["loss"].item() == pytest.approx(out["retrieval_loss"].item() + 0.5 * out["itm_loss"].item())
    out["loss"].backward()
    assert model.itm_head.fc.weight.grad.abs().sum() > 0
    assert model.vision_head.weight.grad.abs().sum() > 0
    plain = RetrievalModel(tiny())
    assert plain.itm_head is None and "itm_loss" not in plain(_batch())


def _oracle_features(n_img: int = 6, per_image: int = 2, seed: int = 0):
    """Features whose ranking puts the ground truth in the top 3 but rarely first."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    text_image = torch.arange(n_img).repeat_interleave(per_image)
    texts = torch.nn.functional.normalize(
        images[text_image] + 1.2 * torch.randn(len(text_image), 8, generator=g), dim=-1
    )
    return images, texts, text_image


def test_oracle_itm_makes_reranked_recall_at_1_perfect_and_k1_changes_nothing():
    images, texts, text_image = _oracle_features()
    dual = retrieval_recalls(images, texts, text_image)
    assert dual["tr_r1"] < 100 and dual["ir_r1"] < 100  # something to improve

    def oracle(pairs):  # a perfect matcher: +5 for a caption of the image, -5 otherwise
        return torch.tensor([5.0 if int(text_image[j]) == i else -5.0 for i, j in pairs])

    n = len(images) + len(texts)
    full = rerank_recalls(images, texts, text_image, oracle, k=n, batch_size=4, ks=KS)
    assert full["rerank_tr_r1"] == 100.0 and full["rerank_ir_r1"] == 100.0
    assert full["rerank_itm_auc"] == 100.0  # the oracle separates every match from every other pair
    one = rerank_recalls(images, texts, text_image, oracle, k=1, batch_size=4, ks=KS)
    assert {k: v for k, v in one.items() if k != "rerank_itm_auc"} == {
        f"rerank_{k}": v for k, v in dual.items()
    }


def test_match_auc_counts_ties_half():
    from mdm.tasks.retrieval_rerank import match_auc

    labels = torch.tensor([True, False, True, False])
    assert match_auc(torch.tensor([3.0, 1.0, 2.0, 0.0]), labels) == 100.0
    assert match_auc(torch.tensor([0.0, 1.0, 0.0, 2.0]), labels) == 0.0
    assert match_auc(torch.ones(4), labels) == 50.0  # a constant head: chance
    assert match_auc(torch.tensor([2.0, 2.0, 1.0, 0.0]), labels) == pytest.approx(100 * (1.5 + 1.0) / 4)


def test_reranking_reorders_the_top_k_only():
    """Whatever the ITM scores (even far below -100), the top k stay above the rest, and the rest keep
    the dual-encoder order."""
    g = torch.Generator().manual_seed(3)
    dual = torch.rand(5, 9, generator=g)
    k = 3
    top = {r: dual[r].topk(k).indices for r in range(5)}
    itm = {r: (torch.randn(k, generator=g) * 500, top[r]) for r in range(5)}
    out = reranked_matrix(dual, {r: (top[r], s) for r, (s, _) in itm.items()})
    for r in range(5):
        inside = torch.zeros(9, dtype=torch.bool)
        inside[top[r]] = True
        assert out[r, inside].min() > out[r, ~inside].max()
        assert torch.equal(out[r, ~inside].argsort(), dual[r, ~inside].argsort())
        assert torch.equal(out[r, top[r]].argsort(), (dual[r, top[r]] + itm[r][0]).argsort())


def test_auto_itm_scale_weighs_the_itm_logit_by_the_pooled_spread_of_the_dual_scores():
    """``rerank_itm_scale="auto"``: ``dual + w * itm`` with one ``w = sqrt(mean var(dual) / mean var(itm))``
    over the queries' top k, so a logit that spreads 20x wider than the similarities no longer decides
    alone; a number is the weight itself (VLMo: 1)."""
    dual = torch.tensor([[0.90, 0.86, 0.80, 0.10], [0.5, 0.4, 0.3, 0.2]])
    cols = torch.tensor([0, 1, 2])
    itm = {0: (cols, torch.tensor([-1.0, 0.0, 1.0])), 1: (cols, torch.tensor([0.0, 0.0, 3.0]))}
    dual_var = (dual[0, cols].double().var() + dual[1, cols].double().var()) / 2
    itm_var = (itm[0][1].double().var() + itm[1][1].double().var()) / 2
    w = float((dual_var / itm_var).sqrt())
    auto = reranked_matrix(dual, itm, "auto")
    for r in (0, 1):
        torch.testing.assert_close(auto[r, cols], dual[r, cols] + w * itm[r][1])
    assert int(auto[0, cols].argmax()) == 1  # a compromise: dual alone picks 0, the logit alone 2
    assert int(reranked_matrix(dual, itm)[0, cols].argmax()) == 2  # weight 1: the logit decides
    flat = {0: (cols, torch.full((3,), 7.0))}  # ITM logits that do not vary: weight 0, the dual order
    assert torch.equal(reranked_matrix(dual, flat, "auto")[0, cols], dual[0, cols])
    torch.testing.assert_close(reranked_matrix(dual, itm, 0.5)[0, cols], dual[0, cols] + 0.5 * itm[0][1])


def test_rerank_split_over_ranks_equals_one_process():
    """Each rank re-ranks a strided share; merged, the metrics equal one process's."""
    images, texts, text_image = _oracle_features(seed=1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(images), len(texts), generator=g)

    def match(pairs):
        return torch.stack([noise[i, j] for i, j in pairs])

    want = rerank_recalls(images, texts, text_image, match, k=4, batch_size=3, ks=KS)
    shares: list = []

    def merge(rows):  # rank 0 runs first and gets its own share; rank 1 then sees both, as a gather
        shares.append(rows)
        return {k: v for part in shares for k, v in part}

    with pytest.raises(KeyError):  # rank 0's share alone lacks rank 1's queries
        rerank_recalls(images, texts, text_image, match, 4, 3, KS, rank=0, world=2, merge=merge)
    got = rerank_recalls(images, texts, text_image, match, 4, 3, KS, rank=1, world=2, merge=merge)
    assert got == want


@pytest.fixture()
def karpathy(tmp_path):
    write_karpathy(tmp_path / "ret", {"train": 6, "val": 5})
    return tmp_path / "ret"


def _evaluate(root, **task_kw):
    task = build_task(
        TaskConfig(name="retrieval", **task_kw), TaskDataConfig(root=str(root), image_size=32, num_workers=0)
    )
    model = task.build_model(tiny())
    ds = task.build_dataset("val", HashTokenizer(100))
    return task.evaluate(model, DataLoader(ds, batch_size=4, collate_fn=task.collate))


def test_evaluate_reports_reranked_recall_beside_the_dual_encoder(karpathy):
    """The real fusion path: rerank keys appear, dual keys are unchanged, k = 1 leaves recall alone, the
    full k gives valid (0..100) recall."""
    dual = _evaluate(karpathy)
    one = _evaluate(karpathy, rerank_k=1, rerank_batch_size=3)
    assert {k: one[k] for k in dual} == dual
    reranked = {k[len("rerank_") :]: v for k, v in one.items() if k.startswith("rerank_")}
    assert 0 <= reranked.pop("itm_auc") <= 100 and reranked == dual
    full = _evaluate(karpathy, rerank_k=100, rerank_batch_size=7)
    assert {f"rerank_{k}" for k in dual} <= full.keys()
    assert all(0 <= v <= 100 for v in full.values())  # AUC included: both classes are in the top k
    assert full["rerank_tr_r10"] == 100.0  # every caption re-ranked: the 10 best of 5 images' captions


def _pretrained_dir(tmp_path, with_itm: bool, partial: bool = False):
    from mdm.models.io import save_pretrained

    backbone = tiny()
    save_pretrained(backbone, tmp_path / "m")
    D = backbone.cfg.embed_dim
    g = torch.Generator().manual_seed(4)
    heads = {
        "heads.itc.vision_head.weight": torch.randn(D, D, generator=g),
        "heads.itc.language_head.weight": torch.randn(D, D, generator=g),
        "heads.itc.logit_scale": torch.tensor(2.5),
    }
    if with_itm:
        for name, p in RetrievalModel(tiny(), itm=True).itm_head.state_dict().items():
            heads[f"heads.itm.{name}"] = torch.randn(p.shape, generator=g)
    if partial:
        del heads["heads.itm.fc.bias"]
    save_file(heads, str(tmp_path / "m" / "heads.safetensors"))
    return tmp_path / "m", heads


def test_itm_head_starts_from_the_pretraining_itm_head(tmp_path):
    from mdm.config import ConfigError
    from mdm.train.finetune import load_pretraining_heads

    path, heads = _pretrained_dir(tmp_path, with_itm=True)
    model = RetrievalModel(tiny(), itm_weight=1.0)
    load_pretraining_heads(model, str(path))
    for name, p in model.itm_head.state_dict().items():
        assert torch.equal(p, heads[f"heads.itm.{name}"])
    assert torch.equal(model.vision_head.weight, heads["heads.itc.vision_head.weight"])

    path, heads = _pretrained_dir(tmp_path / "b", with_itm=False)  # no ITM pretraining: ITC only
    model = RetrievalModel(tiny(), itm_weight=1.0)
    fresh = {k: v.clone() for k, v in model.itm_head.state_dict().items()}
    load_pretraining_heads(model, str(path))
    assert all(torch.equal(fresh[k], v) for k, v in model.itm_head.state_dict().items())
    assert model.logit_scale.item() == 2.5

    path, _ = _pretrained_dir(tmp_path / "c", with_itm=True, partial=True)
    with pytest.raises(ConfigError, match="heads.itm.fc.bias"):
        load_pretraining_heads(RetrievalModel(tiny(), itm_weight=1.0), str(path))


def _finetuned_dir(tmp_path):
    """A fine-tuned retrieval model directory with an ITM head (beit3 layout, so unilm export applies)."""
    from mdm.tasks.io import save_task_model

    task = build_task(TaskConfig(name="retrieval", itm_weight=1.0), TaskDataConfig(image_size=32))
    torch.manual_seed(0)
    model = task.build_model(create_model("beit3_tiny", depth=2, img_size=32, vocab_size=100))
    with torch.no_grad():
        model.itm_head.fc.bias.copy_(torch.tensor([0.25, -0.5]))
    return model, save_task_model(tmp_path / "ft", model, task)


def test_itm_head_survives_safetensors_export(tmp_path):
    from mdm.tasks.io import load_task_model

    model, ft = _finetuned_dir(tmp_path)
    out = tmp_path / "exported"
    assert mdm_main(["export", "--checkpoint", str(ft), "--format", "safetensors", "--out", str(out)]) == 0
    heads = load_file(str(out / "heads.safetensors"))
    want = {f"itm_head.{k}": v for k, v in model.itm_head.state_dict().items()}
    assert want.keys() <= heads.keys() and all(torch.equal(heads[k], v) for k, v in want.items())
    _, loaded, _ = load_task_model(out)
    assert torch.equal(loaded.itm_head.fc.bias, torch.tensor([0.25, -0.5]))
    batch = _batch(2)
    batch["text"] = batch["text"] % 100
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(
            loaded.match_logits(batch["image"], batch["text"], batch["text_padding_mask"]),
            model.match_logits(batch["image"], batch["text"], batch["text_padding_mask"]),
        )


def test_unilm_export_leaves_the_itm_head_out_and_says_so(tmp_path, caplog):
    model, ft = _finetuned_dir(tmp_path)
    out = tmp_path / "u.pth"
    with caplog.at_level(logging.INFO, logger="mdm.export"):
        assert mdm_main(["export", "--checkpoint", str(ft), "--format", "unilm", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)["model"]
    assert not any(k.startswith("itm_head.") for k in sd)
    assert {"vision_head.weight", "language_head.weight", "logit_scale"} <= sd.keys()
    assert torch.equal(sd["logit_scale"], model.logit_scale.detach())
    assert any("not exported to unilm" in r.message and "ITM head" in r.message for r in caplog.records)


def test_mdm_evaluate_reranks_a_saved_model(tmp_path, karpathy):
    """``mdm evaluate --checkpoint DIR task.rerank_k=K`` on a model fine-tuned with ITM."""
    import json

    from mdm.tasks.cli_evaluate import main as evaluate_main
    from mdm.tasks.io import save_task_model

    task = build_task(
        TaskConfig(name="retrieval", itm_weight=1.0), TaskDataConfig(root=str(karpathy), image_size=32)
    )
    ckpt = save_task_model(tmp_path / "m", task.build_model(tiny()), task, text_tokenizer="hash:100")
    out = tmp_path / "metrics.json"
    argv = ["--checkpoint", str(ckpt), "--metrics-json", str(out), "--num-workers", "0"]
    assert evaluate_main([*argv, f"data.root={karpathy}", "task.rerank_k=3"]) == 0
    metrics = json.loads(out.read_text())
    assert {"tr_r1", "r_mean", "rerank_tr_r1", "rerank_ir_r10", "rerank_r_mean"} <= metrics.keys()
    assert evaluate_main([*argv, f"data.root={karpathy}"]) == 0
    assert not any(k.startswith("rerank_") for k in json.loads(out.read_text()))


def test_fusion_matcher_pads_captions_of_different_eval_batches():
    """Evaluation batches trim captions to their own longest one: the matcher must pad them together,
    and padding must not change a pair's ITM score."""
    from mdm.tasks.retrieval_rerank import FusionMatcher, pack_images

    model = RetrievalModel(tiny(), itm=True).eval()
    b = _batch(2)
    b["text"] = b["text"] % 100
    pixels = list(pack_images(b["image"].clamp(-1, 1)))
    short = (b["text"][0, :4], b["text_padding_mask"][0, :4])  # 4 real tokens, trimmed
    long = (b["text"][1], b["text_padding_mask"][1])  # 6 tokens
    matcher = FusionMatcher(model, pixels, [short, long], torch.device("cpu"))
    with torch.no_grad():
        both = matcher([(0, 0), (1, 1)])
        alone = matcher([(0, 0)])
    assert both.shape == (2,) and torch.allclose(both[0], alone[0], atol=1e-5)


def _colour_pairs(gen: torch.Generator, colours: torch.Tensor, B: int = 16):
    """A trivially matchable set: each image is one flat colour (plus noise), its caption the one token
    naming that colour; B different colours per batch, so every drawn negative really is a non-match."""
    c = torch.randperm(colours.shape[0], generator=gen)[:B]
    image = colours[c].expand(B, 3, 32, 32) + 0.1 * torch.randn(B, 3, 32, 32, generator=gen)
    text = torch.stack([torch.full((B,), 1), c + 10, torch.full((B,), 2)], 1)  # [bos] colour [eos]
    return {"image": image, "text": text, "text_padding_mask": torch.zeros(B, 3, dtype=torch.bool)}


@pytest.mark.parametrize("seed", [0, 1])
def test_itm_learns_a_trivial_match_beside_the_contrastive_loss_with_random_negatives(seed):
    """The demo's ITM head stayed on the class prior (loss H(1/3) = 0.636, accuracy 66.7 %, every pair
    "no match"). It does so on this trivial set too with VLMo's hard negatives, trained beside the
    contrastive loss from scratch (300 steps, both seeds: the negatives follow the dual encoder, which
    learns faster than the fusion encoder learns to compare at all). Uniform negatives
    (``itm_negatives="random"``) read on the text [bos] get it off the prior within 200 steps."""
    torch.manual_seed(seed)
    colours = torch.randn(64, 3, 1, 1)
    model = RetrievalModel(tiny(), itm_weight=1.0, itm_negatives="random", itm_pool="text")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(seed)  # the global RNG draws the negatives
    acc, loss = [], []
    for _ in range(200):
        out = model(_colour_pairs(gen, colours))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        acc.append(out["itm_acc"].item())
        loss.append(out["itm_loss"].item())
    assert sum(acc[-25:]) / 25 > 80.0  # the prior is 66.7
    assert sum(loss[-25:]) / 25 < 0.45  # the prior's cross-entropy is 0.636


def test_random_itm_negatives_ignore_the_similarities_and_never_draw_the_positive(monkeypatch):
    """``hard``: a row whose similarities single out one wrong candidate draws it; ``random``: uniform
    over the others, the positive never."""
    torch.manual_seed(0)
    B = 8
    batch = _batch(B)
    sims = torch.full((B, B), -50.0)
    sims[torch.arange(B), (torch.arange(B) + 1) % B] = 50.0  # row i's hardest negative: i + 1
    seen = []

    def recording(*args, **kwargs):
        pairs = itm.hard_negative_batch(*args, **kwargs)
        seen.append(pairs["negative_text"])
        return pairs

    monkeypatch.setattr("mdm.tasks.retrieval.hard_negative_batch", recording)
    drawn = {}
    for mode in ("hard", "random"):
        model = RetrievalModel(tiny(), itm_weight=1.0, itm_negatives=mode)
        seen.clear()
        for _ in range(20):
            model._itm(batch, ContrastiveSimilarities(sims, sims, 0))
        drawn[mode] = torch.stack(seen)  # (20, B)
    nxt = (torch.arange(B) + 1) % B
    assert bool((drawn["hard"] == nxt).all())
    assert not bool((drawn["random"] == torch.arange(B)).any())
    assert (drawn["random"] == nxt).float().mean() < 0.5
    with pytest.raises(ValueError, match="itm_negatives"):
        RetrievalModel(tiny(), itm_weight=1.0, itm_negatives="easy")
    # itm_random_warmup: random for the first 10 training passes, then hard; evaluation does not count
    model = RetrievalModel(tiny(), itm_weight=1.0, itm_random_warmup=10)
    model.eval()
    model._itm(batch, ContrastiveSimilarities(sims, sims, 0))
    assert model.itm_passes == 0
    model.train()
    seen.clear()
    for _ in range(20):
        model._itm(batch, ContrastiveSimilarities(sims, sims, 0))
    warm, after = torch.stack(seen[:10]), torch.stack(seen[10:])
    assert (warm == nxt).float().mean() < 0.5 and bool((after == nxt).all())


def test_itm_never_draws_another_caption_of_the_same_image_or_the_same_caption(monkeypatch):
    """Retrieval batches hold several captions per image: with ``itm_false_negatives="skip"`` (the
    default) a pair of the same ``image_id`` or with the same caption is never an ITM negative, even when
    the similarities single it out; ``keep`` is VLMo's sampler, which draws it."""
    torch.manual_seed(0)
    B = 8
    batch = _batch(B)
    batch["image_id"] = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])  # pairs (0, 1) and (2, 3): one image each
    batch["text"][5] = batch["text"][4]  # pairs 4 and 5: the same caption written for two images
    batch["text_padding_mask"][5] = batch["text_padding_mask"][4]
    partner = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    sims = torch.full((B, B), -50.0)
    sims[torch.arange(B), partner] = 50.0  # each row's hardest candidate is its false negative
    seen = []

    def recording(*args, **kwargs):
        pairs = itm.hard_negative_batch(*args, **kwargs)
        seen.append(torch.stack([pairs["negative_image"], pairs["negative_text"]]))
        return pairs

    monkeypatch.setattr("mdm.tasks.retrieval.hard_negative_batch", recording)
    drawn = {}
    for mode in ("skip", "keep"):
        model = RetrievalModel(tiny(), itm_weight=1.0, itm_false_negatives=mode)
        seen.clear()
        for _ in range(20):
            model._itm(batch, ContrastiveSimilarities(sims, sims, 0))
        drawn[mode] = torch.stack(seen)  # (20, 2, B)
    false = drawn["skip"][:, :, :6] == partner[:6]
    assert not bool(false.any())
    assert bool((drawn["skip"][:, :, 6:] == partner[6:]).all())  # a true hard negative is still drawn
    assert bool((drawn["keep"] == partner).all())
    with pytest.raises(ValueError, match="itm_false_negatives"):
        RetrievalModel(tiny(), itm_weight=1.0, itm_false_negatives="drop")


def test_itm_pool_text_reads_the_text_bos_of_the_fusion_pass():
    model = RetrievalModel(tiny(), itm_weight=1.0, itm_pool="text").eval()
    batch = _batch(3)
    with torch.no_grad():
        x = model.backbone(**batch)  # (B, 1 + P + T, D)
        first_text = x.shape[1] - batch["text"].shape[1]
        want = model.itm_head(x[:, first_text])[:, 1]
        got = model.match_logits(batch["image"], batch["text"], batch["text_padding_mask"])
        image_cls = model.itm_head(x[:, 0])[:, 1]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, image_cls)
    with pytest.raises(ValueError, match="itm_pool"):
        RetrievalModel(tiny(), itm_weight=1.0, itm_pool="mean")
