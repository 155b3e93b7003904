"""Objectives against hand computations: masked CE (MIM, MLM, MVLM), BEiT v2's [CLS] head, MAE, and
which experts each pass trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdm.models.config import make_config
from mdm.objectives import (
    ClsMaskedImageModeling,
    MaskedAutoencoder,
    ObjectivesConfig,
    VisionBlock,
    build_pretrain_model,
    masked_cross_entropy,
    normalize_patches,
    patchify,
)
from mdm.objectives.cls_pt import default_early_layer

V = 64  # codebook size of the tests
B, P, T = 3, 16, 10  # vlmo_tiny: 64 px / 16 → 4x4 patches


def make_batches(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, 64, 64, generator=g)
    image_mask = torch.rand(B, P, generator=g) < 0.4
    image_mask[:, 0] = True  # at least one masked patch per image
    tokens = torch.randint(0, V, (B, P), generator=g)
    text = torch.randint(4, 1024, (B, T), generator=g)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 7:] = True
    pad[1, 9:] = True
    text_mask = (torch.rand(B, T, generator=g) < 0.4) & ~pad
    text_mask[:, 1] = True
    text_input = text.masked_fill(text_mask, 3)
    img = dict(image=image, image_mask=image_mask, image_tokens=tokens)
    txt = dict(text=text, text_input=text_input, text_mask=text_mask, text_padding_mask=pad)
    return {"image": img, "text": txt, "pair": {**img, **txt}}


def make_model(objectives: list[str], **kw):
    torch.manual_seed(0)
    cfg = make_config("vlmo_tiny", depth=2)
    oc = ObjectivesConfig(objectives=objectives, codebook_size=V, **kw)
    return build_pretrain_model(cfg, oc).eval()


def manual_ce(logits_all: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, int]:
    """Loops over every position: -log softmax at the label where mask is True."""
    terms, hits = [], 0
    logp = torch.log_softmax(logits_all.double(), dim=-1)
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                terms.append(-logp[b, i, labels[b, i]].item())
                hits += int(logits_all[b, i].argmax().item() == labels[b, i].item())
    return sum(terms) / len(terms), hits / len(terms), len(terms)


# --------------------------------------------------------------------------- masked cross-entropy
def test_masked_cross_entropy_matches_formula_and_handles_no_masked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    logits[0, 0] = 10.0  # make at least one prediction right
    loss, acc, count = masked_cross_entropy(logits, labels)
    expected = -torch.log_softmax(logits, -1)[torch.arange(7), labels].mean()
    assert torch.allclose(loss, expected)
    assert acc.item() == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert count.item() == 7

    head = torch.nn.Linear(4, 5)
    loss, acc, count = masked_cross_entropy(head(torch.zeros(0, 4)), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and acc.item() == 0.0 and count.item() == 0
    loss.backward()  # still connected: every head parameter gets a (zero) gradient
    assert head.weight.grad is not None and head.weight.grad.abs().sum() == 0


# --------------------------------------------------------------------------- MIM
def test_mim_is_cross_entropy_over_masked_patches_only():
    model = make_model(["mim"])
    batch = make_batches()["image"]
    out = model({"image": batch})
    with torch.no_grad():
        x = model.backbone(image=batch["image"], image_mask=batch["image_mask"])  # (B, 1+P, D)
        logits = x[:, 1:] @ model.heads["mim"].proj.weight.T + model.heads["mim"].proj.bias  # (B, P, V)
    loss, acc, n = manual_ce(logits, batch["image_tokens"], batch["image_mask"])
    assert out["mim_loss"].item() == pytest.approx(loss, rel=1e-5)
    assert out["mim_acc"].item() == pytest.approx(acc)
    assert out["mim_count"].item() == n == int(batch["image_mask"].sum())
    assert out["loss"].item() == pytest.approx(out["mim_loss"].item())

    # Labels of unmasked patches do not matter; labels of masked ones do.
    other = dict(batch, image_tokens=batch["image_tokens"].clone())
    other["image_tokens"][~batch["image_mask"]] = (other["image_tokens"][~batch["image_mask"]] + 7) % V
    assert model({"image": other})["mim_loss"].item() == out["mim_loss"].item()
    other["image_tokens"][0, 0] = (other["image_tokens"][0, 0] + 1) % V  # patch 0 is masked
    assert model({"image": other})["mim_loss"].item() != out["mim_loss"].item()


def test_mim_reports_missing_visual_tokens_and_bad_shapes():
    model = make_model(["mim"])
    batch = make_batches()["image"]
    with pytest.raises(KeyError, match="image_tokens.*fill_visual_tokens"):
        model({"image": {k: v for k, v in batch.items() if k != "image_tokens"}})
    with pytest.raises(ValueError, match=r"image_mask.*\(3, 16\)"):
        model({"image": dict(batch, image_mask=batch["image_mask"][:, :8])})


# --------------------------------------------------------------------------- MLM
def test_mlm_is_cross_entropy_over_masked_tokens_never_padding():
    model = make_model(["mlm"])
    batch = make_batches()["text"]
    out = model({"text": batch})
    head = model.heads["mlm"]
    with torch.no_grad():
        x = model.backbone(
            text=batch["text_input"], text_padding_mask=batch["text_padding_mask"]
        )  # (B, T, D)
        h = F.layer_norm(
            F.gelu(x @ head.dense.weight.T + head.dense.bias),
            (x.shape[-1],),
            head.norm.weight,
            head.norm.bias,
            1e-12,
        )
        logits = h @ head.decoder.weight.T + head.bias  # (B, T, vocab)
    loss, acc, n = manual_ce(logits, batch["text"], batch["text_mask"])
    assert out["mlm_loss"].item() == pytest.approx(loss, rel=1e-5)
    assert out["mlm_acc"].item() == pytest.approx(acc)
    assert out["mlm_count"].item() == n

    # A mask bit on a padded position is ignored; unmasked labels do not matter.
    other = dict(batch, text_mask=batch["text_mask"].clone(), text=batch["text"].clone())
    other["text_mask"][0, 8] = True  # padding
    other["text"][~batch["text_mask"]] = 5
    again = model({"text": other})
    assert again["mlm_loss"].item() == out["mlm_loss"].item()
    assert again["mlm_count"].item() == n


def test_mlm_tied_head_uses_the_text_embedding():
    model = make_model(["mlm"], mlm_tie_embedding=True)
    head = model.heads["mlm"]
    assert head.decoder is None
    assert not any("decoder" in k for k in model.state_dict())
    batch = make_batches()["text"]
    model({"text": batch})["loss"].backward()
    unused_row = sorted(set(range(4, 1024)) - set(batch["text_input"].flatten().tolist()))[0]
    # Only the tied decoder reaches an embedding row that is not in the input.
    assert model.backbone.text_embed.weight.grad[unused_row].abs().sum() > 0


# --------------------------------------------------------------------------- MVLM
def test_mvlm_joint_pass_predicts_both_sides():
    model = make_model(["mvlm"])
    batch = make_batches()["pair"]
    out = model({"pair": batch})
    with torch.no_grad():
        x = model.backbone(
            image=batch["image"],
            text=batch["text_input"],
            text_padding_mask=batch["text_padding_mask"],
            image_mask=batch["image_mask"],
        )  # (B, 1+P+T, D)
        img_logits = model.heads["mim"](x[:, 1 : 1 + P])
        txt_logits = model.heads["mlm"](x[:, 1 + P :])
    il, ia, ni = manual_ce(img_logits, batch["image_tokens"], batch["image_mask"])
    tl, ta, nt = manual_ce(txt_logits, batch["text"], batch["text_mask"])
    assert out["mvlm_image_loss"].item() == pytest.approx(il, rel=1e-5)
    assert out["mvlm_text_loss"].item() == pytest.approx(tl, rel=1e-5)
    assert (out["mvlm_image_acc"].item(), out["mvlm_text_acc"].item()) == pytest.approx((ia, ta))
    assert (out["mvlm_image_count"].item(), out["mvlm_text_count"].item()) == (ni, nt)
    assert out["loss"].item() == pytest.approx(il + tl, rel=1e-5)


def test_mvlm_shares_heads_with_mim_and_mlm():
    model = make_model(["mim", "mlm", "mvlm"])
    assert model.objectives["mvlm"].image_head is model.heads["mim"] is model.objectives["mim"].head
    assert model.objectives["mvlm"].text_head is model.heads["mlm"] is model.objectives["mlm"].head
    # Each head appears once in the state dict.
    assert (
        sum(
            k.endswith("proj.weight") and "layers" not in k and "backbone" not in k
            for k in model.state_dict()
        )
        == 1
    )


# --------------------------------------------------------------------------- expert routing
def _grads(model, pattern: str) -> list[bool]:
    return [
        p.grad is not None and p.grad.abs().sum().item() > 0
        for n, p in model.named_parameters()
        if pattern in n
    ]


@pytest.mark.parametrize(
    "stream,expect",
    [
        # (text-only MLM) vision experts and the VL-FFN are never touched
        ("text", {"ffn.vision": False, "ffn.text": True, "ffn.vl": False}),
        ("image", {"ffn.vision": True, "ffn.text": False, "ffn.vl": False}),
    ],
)
def test_single_modality_passes_train_only_their_experts(stream, expect):
    model = make_model(["mim", "mlm"]).train()
    model({stream: make_batches()[stream]})["loss"].backward()
    for pattern, trained in expect.items():
        flags = _grads(model, pattern)
        assert flags and all(f == trained for f in flags), pattern


def test_mvlm_uses_vl_ffn_in_top_layer_and_modality_ffns_below():
    model = make_model(["mvlm"]).train()
    assert model.backbone.cfg.vl_ffn_layers == 1
    model({"pair": make_batches()["pair"]})["loss"].backward()
    assert all(_grads(model, "layers.1.ffn.vl."))
    assert not any(_grads(model, "layers.1.ffn.vision.")) and not any(_grads(model, "layers.1.ffn.text."))
    assert all(_grads(model, "layers.0.ffn.vision.")) and all(_grads(model, "layers.0.ffn.text."))


# --------------------------------------------------------------------------- BEiT v2 [CLS] head
def test_vision_block_matches_timm_block():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    ours = VisionBlock(32, 4, 128, qkv_bias=True, norm_eps=1e-5, layer_scale_init=0.1).eval()
    ref = timm_vit.Block(
        32, 4, mlp_ratio=4.0, qkv_bias=True, init_values=0.1, norm_layer=torch.nn.LayerNorm
    ).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    names = {
        "norm1": "attn_norm", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj", "ls1.gamma": "gamma_attn",
        "norm2": "ffn.norm", "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2", "ls2.gamma": "gamma_ffn",
    }  # fmt: skip
    mine = ours.state_dict()
    sd = {}
    for k in ref.state_dict():
        stem = next(s for s in names if k == s or k.startswith(s + "."))
        sd[k] = mine[names[stem] + k[len(stem) :]]
    ref.load_state_dict(sd)
    x = torch.randn(2, 9, 32)
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_cls_mim_adds_a_second_ce_on_cls_plus_early_patches():
    model = make_model(["cls_mim"], cls_pt_early_layer=1)
    obj: ClsMaskedImageModeling = model.objectives["cls_mim"]
    batch = make_batches()["image"]
    out = model({"image": batch})
    assert set(out) >= {"mim_loss", "mim_acc", "mim_count", "cls_mim_loss", "cls_mim_acc", "cls_mim_count"}
    assert out["loss"].item() == pytest.approx(out["mim_loss"].item() + out["cls_mim_loss"].item(), rel=1e-6)

    # Main path identical to the plain MIM objective with the same weights.
    plain = make_model(["mim"])
    plain.backbone.load_state_dict(model.backbone.state_dict())
    plain.heads.load_state_dict(model.heads.state_dict())
    assert plain({"image": batch})["mim_loss"].item() == pytest.approx(out["mim_loss"].item(), rel=1e-6)

    with torch.no_grad():
        _, hidden = model.backbone.forward_features(
            image=batch["image"], image_mask=batch["image_mask"], return_hidden=True
        )
        h = torch.cat([hidden[1][:, :1], hidden[0][:, 1:]], dim=1)  # last CLS ‖ layer-1 patches
        for block in obj.blocks:
            h = block(h)
        norm = model.backbone.norm.vision  # the shared final norm, vision expert
        h = F.layer_norm(h, (h.shape[-1],), norm.weight, norm.bias, norm.eps)
        logits = model.heads["mim"](h[:, 1:])
    loss, acc, n = manual_ce(logits, batch["image_tokens"], batch["image_mask"])
    assert out["cls_mim_loss"].item() == pytest.approx(loss, rel=1e-5)
    assert out["cls_mim_acc"].item() == pytest.approx(acc) and out["cls_mim_count"].item() == n

    # The extra blocks are pretraining machinery: not in the exported backbone.
    exported = model.pretrained_backbone_state_dict()
    assert exported.keys() == model.backbone.state_dict().keys()
    assert not any("cls" in k and "token" not in k for k in exported)
    assert any(k.startswith("objectives.cls_mim.blocks.") for k in model.state_dict())


def test_cls_mim_options_and_validation():
    model = make_model(["cls_mim"], cls_pt_shared_head=False, cls_pt_layers=1)
    obj = model.objectives["cls_mim"]
    assert obj.cls_head is not model.heads["mim"] and len(obj.blocks) == 1
    assert any(k.startswith("objectives.cls_mim.cls_head.") for k in model.state_dict())
    out = model({"image": make_batches()["image"]})
    out["loss"].backward()
    assert obj.cls_head.proj.weight.grad is not None and obj.norm.weight.grad is not None
    with pytest.raises(ValueError, match="early_layer 2"):
        make_model(["cls_mim"], cls_pt_early_layer=2)  # depth 2: must be < 2
    assert model.objectives["cls_mim"].early_layer == 1  # default for depth 2: depth - 3, at least 1
    assert (default_early_layer(12), default_early_layer(24)) == (9, 21)  # BEiT v2 base / large


# --------------------------------------------------------------------------- MAE
def mae_model(**kw):
    return make_model(["mae"], mae_decoder_dim=32, mae_decoder_depth=1, mae_decoder_heads=4, **kw)


def test_patchify_uses_the_patch_embedding_order():
    image = torch.randn(2, 3, 64, 64)
    patches = patchify(image, 16)  # (2, 16, 768)
    ref = F.unfold(image, kernel_size=16, stride=16).transpose(1, 2)  # (2, 16, 3·16·16), channel-major
    ref = ref.reshape(2, 16, 3, 16, 16).permute(0, 1, 3, 4, 2).reshape(2, 16, 768)
    assert torch.equal(patches, ref)


def test_normalize_patches_per_patch_mean_and_unbiased_variance():
    t = torch.randn(2, 5, 48) * 3 + 1
    n = normalize_patches(t)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 5), atol=1e-5)
    expected = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=True, keepdim=True) + 1e-6)
    assert torch.allclose(n, expected, atol=1e-6)


def test_mae_encodes_visible_patches_only_and_computes_normalised_pixel_loss():
    model = mae_model()
    mae: MaskedAutoencoder = model.objectives["mae"]
    g = torch.Generator().manual_seed(3)
    image = torch.randn(B, 3, 64, 64, generator=g)
    noise = torch.rand(B, P, generator=g)
    seen = {}
    model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("latent", o.detach()))
    mae.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("pred", o.detach()))
    out = model({"image": {"image": image, "mae_noise": noise}})
    K = int(P * 0.25)
    assert seen["latent"].shape == (B, 1 + K, 128)
    assert out["mae_count"].item() == B * (P - K)
    assert "mae_acc" not in out

    keep = noise.argsort(1)[:, :K]
    removed = torch.ones(B, P, dtype=torch.bool).scatter(1, keep, False)
    target = (
        F.unfold(image, 16, stride=16)
        .transpose(1, 2)
        .reshape(B, P, 3, 16, 16)
        .permute(0, 1, 3, 4, 2)
        .reshape(B, P, -1)
    )
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((seen["pred"] - target) ** 2).mean(-1)  # (B, P)
    assert out["mae_loss"].item() == pytest.approx(per_patch[removed].mean().item(), rel=1e-5)

    # Pixels of removed patches never reach the encoder.
    first = seen["latent"].clone()
    corrupted = image.clone()
    b, p = removed.nonzero()[0].tolist()
    corrupted[b, :, (p // 4) * 16 : (p // 4 + 1) * 16, (p % 4) * 16 : (p % 4 + 1) * 16] += torch.randn(
        3, 16, 16
    )
    out2 = model({"image": {"image": corrupted, "mae_noise": noise}})
    assert torch.equal(seen["latent"], first)
    assert out2["mae_loss"].item() != out["mae_loss"].item()  # but the target changed


def test_mae_visible_set_sources():
    model = mae_model(mae_norm_pix_loss=False)
    mae: MaskedAutoencoder = model.objectives["mae"]
    image = torch.randn(B, 3, 64, 64)
    vis = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4], [12, 13, 14, 15]])
    assert torch.equal(mae.visible_index({"visible_index": vis}, B, P, image.device), vis)
    mask = torch.ones(B, P, dtype=torch.bool).scatter(1, vis, False)
    assert torch.equal(mae.visible_index({"image_mask": mask}, B, P, image.device), vis)
    with pytest.raises(ValueError, match="same number"):
        mae.visible_index(
            {"image_mask": mask.clone().index_fill_(1, torch.tensor([0]), False)}, B, P, image.device
        )
    with pytest.raises(ValueError, match="generator"):
        model({"image": {"image": image}})
    mae.generator = torch.Generator().manual_seed(5)
    first = mae.visible_index({}, B, P, image.device)
    mae.generator = torch.Generator().manual_seed(5)
    assert torch.equal(mae.visible_index({"image_mask": mask}, B, P, image.device), first)  # noise beats mask
    assert first.shape == (B, 4)
    # Without normalisation the target is the raw pixels.
    out = model({"image": {"image": image, "visible_index": vis}})
    assert out["mae_count"].item() == B * 12 and out["mae_loss"].item() > 0.5


# --------------------------------------------------------------------------- VLMo's ITC
def test_itc_is_symmetric_infonce_over_single_modality_first_tokens():
    model = make_model(["itc"])
    batch = make_batches()["pair"]
    out = model({"pair": batch})
    head = model.heads["itc"]
    with torch.no_grad():
        # uncorrupted inputs, one modality per pass (dual encoder)
        v = model.backbone(image=batch["image"])[:, 0]
        t = model.backbone(text=batch["text"], text_padding_mask=batch["text_padding_mask"])[:, 0]
        v = head.vision_head(v).double()
        t = head.language_head(t).double()
        v, t = v / v.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        s = head.logit_scale.exp().double()
    terms, hits = [], 0
    for i in range(B):  # image i against every text, text i against every image
        row = torch.stack([s * (v[i] @ t[j]) for j in range(B)])
        col = torch.stack([s * (v[j] @ t[i]) for j in range(B)])
        terms += [-(row[i] - torch.logsumexp(row, 0)).item(), -(col[i] - torch.logsumexp(col, 0)).item()]
        hits += int(row.argmax() == i) + int(col.argmax() == i)
    assert out["itc_loss"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert out["itc_acc"].item() == pytest.approx(hits / (2 * B))
    assert out["itc_count"].item() == B
    # the corrupted views (MVLM's) are not what ITC reads
    assert model({"pair": {**batch, "text_input": batch["text"] * 0}})["itc_loss"].item() == pytest.approx(
        out["itc_loss"].item(), rel=1e-6
    )


def test_itc_training_aligns_pairs_and_its_head_has_retrieval_names():
    model = make_model(["itc"]).train()
    batch = make_batches(seed=1)["pair"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        out = model({"pair": batch})
        first = first if first is not None else out["itc_loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["itc_loss"].item() < 0.5 * first and out["itc_acc"].item() == 1.0
    names = {k for k in model.state_dict() if k.startswith("heads.itc.")}
    assert names == {
        "heads.itc.vision_head.weight",
        "heads.itc.language_head.weight",
        "heads.itc.logit_scale",
    }
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        model({"pair": {**batch, "image": batch["image"][:2]}})
