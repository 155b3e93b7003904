"""The Multiway Transformer backbone: presets, routing, training features and the timm-style API.

Parameter counts of ``beit3_*`` are torchscale's (reference notes §1.2: base 221.0M backbone / 85.9M on
the vision path; large 672.7M / 303.6M). ``vlmo_*`` counts are checked against a closed-form count.
"""

from __future__ import annotations

import pytest
import timm.optim
import torch

import mdm
from mdm.cli import main as mdm_main
from mdm.models import ModelConfig, create_model, list_models, save_pretrained
from mdm.models.layers.embeddings import resize_vision_pos_table


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str = "beit3_tiny", **kw) -> mdm.models.MultiwayTransformer:
    torch.manual_seed(0)
    return create_model(name, **{"depth": 2, "embed_dim": 64, "ffn_dim": 128, "img_size": 32, **kw})


def batch(B: int = 2, T: int = 7, img: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[-1, T - 2 :] = True
    return {
        "image": torch.randn(B, 3, img, img, generator=g),
        "text": torch.randint(0, 1000, (B, T), generator=g),
        "text_padding_mask": pad,
    }


def grads(model: torch.nn.Module, **inputs) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def touched(g: dict[str, torch.Tensor | None], part: str) -> bool:
    """Whether any parameter whose name contains ``part`` received a nonzero gradient."""
    found = [v for n, v in g.items() if part in n]
    assert found, f"no parameter named like {part!r}"
    return any(v is not None and v.abs().sum() > 0 for v in found)


# ------------------------------------------------------------------------------------------ presets


def test_list_models_and_create_model():
    names = list_models()
    for size in ("tiny", "base", "large", "giant"):
        assert f"beit3_{size}" in names and f"vlmo_{size}" in names
    model = create_model("vlmo_tiny", depth=2)
    assert isinstance(model.cfg, ModelConfig) and model.num_layers == 2 and model.cfg.arch == "vlmo_tiny"
    with pytest.raises(KeyError, match="beit3_base"):
        create_model("beit3_bsae")
    with pytest.raises(TypeError, match="depth"):
        create_model("vlmo_tiny", deptj=3)


@pytest.mark.parametrize(
    "name, total, vision_path",
    [("beit3_base", 221.0, 85.9), ("beit3_large", 672.7, 303.6)],
)
def test_beit3_parameter_counts_match_torchscale(name, total, vision_path):
    with torch.device("meta"):
        model = create_model(name)
    params = dict(model.named_parameters())
    assert round(sum(p.numel() for p in params.values()) / 1e6, 1) == total
    vision = sum(p.numel() for n, p in params.items() if ".text." not in n and not n.startswith("text_"))
    assert round(vision / 1e6, 1) == vision_path


def test_vlmo_base_parameter_count_closed_form():
    with torch.device("meta"):
        model = create_model("vlmo_base")
    D, F, L, V, P, T, vl = 768, 3072, 12, 64010, 196, 1024, 2
    embed = V * D + 2 * D + D * 3 * 16 * 16 + D + (P + 3) * D + T * D
    attn = 2 * D + 3 * D * D + 3 * D + D * D + D  # shared norm, qkv, out_proj
    expert = 2 * D + D * F + F + F * D + D  # norm, fc1, fc2
    layers = L * (2 * D + attn + 2 * expert) + vl * expert  # layer scales, V/L experts, VL experts on top
    expected = embed + layers + 2 * 2 * D  # final multiway norm
    assert sum(p.numel() for p in model.parameters()) == expected


# ------------------------------------------------------------------------------------------ routing


def test_vl_ffn_only_for_joint_input_in_top_layers():
    model = tiny("vlmo_tiny", depth=3, vl_ffn_layers=1)
    assert model.layers[2].ffn.vl is not None and model.layers[1].ffn.vl is None
    x = batch()
    g = grads(model, **x)
    assert touched(g, "layers.2.ffn.vl.")
    assert not touched(g, "layers.2.ffn.vision.") and not touched(g, "layers.2.ffn.text.")
    assert touched(g, "layers.1.ffn.vision.") and touched(g, "layers.1.ffn.text.")
    g = grads(model, image=x["image"])
    assert not touched(g, "ffn.vl.") and not touched(g, "ffn.text.") and not touched(g, "text_embed")
    assert touched(g, "layers.2.ffn.vision.")
    g = grads(model, text=x["text"], text_padding_mask=x["text_padding_mask"])
    assert not touched(g, "ffn.vl.") and not touched(g, "ffn.vision.") and not touched(g, "vision_embed")
    assert touched(g, "layers.2.ffn.text.")


def test_shared_versus_multiway_attention_parameters():
    shared, multiway = dict(tiny("vlmo_tiny").named_parameters()), dict(tiny("beit3_tiny").named_parameters())
    assert "layers.0.attn.qkv.weight" in shared and "layers.0.attn_norm.weight" in shared
    assert not any(".attn.qkv.vision" in n or ".attn.inner_norm" in n for n in shared)
    for e in ("vision", "text"):
        for part in ("attn.qkv", "attn.out_proj", "attn.inner_norm", "attn_norm"):
            assert f"layers.0.{part}.{e}.weight" in multiway
    assert "layers.0.attn.qkv.weight" not in multiway
    # a multiway model's image-only pass leaves the text attention untouched; joint input uses both
    model = tiny("beit3_tiny")
    x = batch()
    g = grads(model, image=x["image"])
    assert touched(g, "attn.qkv.vision") and not touched(g, "attn.qkv.text")
    g = grads(model, **x)
    assert touched(g, "attn.qkv.vision") and touched(g, "attn.qkv.text")


@pytest.mark.parametrize("name", ["beit3_tiny", "vlmo_tiny"])
def test_block_on_a_tensor_equals_block_on_modality_parts(name):
    """A layer called on the joined (B, N, D) sequence (the public form) and on the per-modality parts
    the encoder keeps between layers gives the same result, for joint and single-modality input."""
    model = tiny(name, vl_ffn_layers=1 if name.startswith("vlmo") else 0).eval()
    x = torch.randn(2, 5 + 7, 64)
    for layer in model.layers:
        for n_vision in (5, 12, 0):
            joined = layer(x, n_vision, None)
            parts = [x[:, :n_vision], x[:, n_vision:]]
            parts = [p for p in parts if p.shape[1] > 0]
            split = layer([p.contiguous() for p in parts], n_vision, None)
            assert isinstance(joined, torch.Tensor) and isinstance(split, list) and len(split) == len(parts)
            torch.testing.assert_close(torch.cat(split, dim=1), joined, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ training features


def test_drop_path_deterministic_in_eval_stochastic_in_training():
    model = tiny("vlmo_tiny", drop_path_rate=0.5)
    x = batch(B=8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**x), model(**x))
    model.train()
    torch.manual_seed(1)
    a = model(**x)
    b = model(**x)
    assert not torch.allclose(a, b)
    torch.manual_seed(1)
    assert torch.equal(model(**x), a)  # seeded: reproducible
    no_drop = tiny("vlmo_tiny", drop_path_rate=0.0).train()
    assert torch.equal(no_drop(**x), no_drop(**x))


@pytest.mark.parametrize("name", ["beit3_tiny", "vlmo_tiny"])
def test_grad_checkpointing_gives_identical_outputs_and_grads(name):
    model = tiny(name).train()
    x = batch()
    ref_out = model(**x)
    ref = grads(model, **x)
    model.set_grad_checkpointing(True)
    assert torch.equal(model(**x), ref_out)
    got = grads(model, **x)
    for n in ref:
        assert (ref[n] is None) == (got[n] is None), n
        if ref[n] is not None:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6, msg=n)


def test_another_image_size_interpolates_positions():
    model = tiny("beit3_tiny").eval()  # built for 32 px (2x2 patches)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(image=image)
    assert out.shape == (2, 1 + 16, 64)
    big = tiny("beit3_tiny", img_size=64).eval()
    sd = model.state_dict()
    sd["vision_pos_embed.weight"] = resize_vision_pos_table(sd["vision_pos_embed.weight"], 4)
    big.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(big(image=image), out, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        model(image=torch.randn(1, 3, 32, 48))


def test_timm_layer_decay_uses_group_matcher_and_no_weight_decay():
    model = tiny("beit3_tiny", depth=3)
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale, decay = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[id(p)], decay[id(p)] = group["lr_scale"], group["weight_decay"]
    params = dict(model.named_parameters())
    assert all(id(p) in scale for p in params.values())
    L = 3
    # timm (bare backbone, no head): stem d^L, layer i d^(L-1-i); the final norm joins the last layer
    for n, p in params.items():
        if n.startswith("layers."):
            want = 0.5 ** (L - 1 - int(n.split(".")[1]))
        elif n.startswith("norm."):
            want = 1.0
        else:
            want = 0.5**L
        assert scale[id(p)] == pytest.approx(want), n
    for n in model.no_weight_decay():
        assert decay[id(params[n])] == 0.0, n
    assert decay[id(params["layers.0.attn.qkv.vision.weight"])] == 0.05
    assert decay[id(params["layers.0.attn.qkv.vision.bias"])] == 0.0


# ------------------------------------------------------------------------------------------ inputs


def test_attn_mask_shapes():
    model = tiny("beit3_tiny").eval()
    x = batch(B=2)
    n_img = 1 + 4
    N = n_img + x["text"].shape[1]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    per_sample = torch.stack([causal, torch.ones(N, N, dtype=torch.bool)])  # (B, N, N)
    with torch.no_grad():
        both = model(**x, attn_mask=per_sample)
        first = model(**{k: v[:1] for k, v in x.items()}, attn_mask=causal)
        second = model(**{k: v[1:] for k, v in x.items()})
        torch.testing.assert_close(both[:1], first, rtol=0, atol=1e-5)
        keep = torch.cat([torch.ones(n_img, dtype=torch.bool), ~x["text_padding_mask"][1]])
        torch.testing.assert_close(both[1:, keep], second[:, keep], rtol=0, atol=1e-5)
        assert not torch.allclose(both[:1], model(**{k: v[:1] for k, v in x.items()}))
    with pytest.raises(ValueError, match="attn_mask"):
        model(**x, attn_mask=torch.ones(N - 1, N - 1, dtype=torch.bool))


def test_padding_ids_do_not_leak():
    model = tiny("vlmo_tiny").eval()
    x = batch()
    pad = x["text_padding_mask"]
    other_ids = x["text"].masked_fill(pad, 3)
    with torch.no_grad():
        a = model(image=x["image"], text=x["text"], text_padding_mask=pad)
        b = model(image=x["image"], text=other_ids, text_padding_mask=pad)
    keep = torch.cat([torch.ones(2, 5, dtype=torch.bool), ~pad], dim=1)
    torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-6)


def test_fully_masked_image_ignores_pixels():
    model = tiny("beit3_tiny").eval()
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        a = model(image=torch.randn(2, 3, 32, 32), image_mask=mask)
        b = model(image=torch.randn(2, 3, 32, 32), image_mask=mask)
        c = model(image=torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c)


def test_text_longer_than_positions_is_a_clear_error():
    model = tiny("vlmo_tiny", max_text_positions=10)  # 8 usable positions
    model(text=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text length 9 exceeds the position table \(8\)"):
        model(text=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="image, a text, or both"):
        model()


# ------------------------------------------------------------------------------------------ io and CLI


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny("vlmo_tiny", drop_path_rate=0.1).eval()
    save_pretrained(model, tmp_path / "m")
    loaded = mdm.from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg == model.cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = batch()
    with torch.no_grad():
        assert torch.equal(loaded(**x), model(**x))
    assert mdm.from_pretrained(tmp_path / "m", grad_checkpointing=True).grad_checkpointing


def test_mdm_info_and_help(capsys):
    assert mdm_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "import" in out
    assert mdm_main(["info"]) == 0
    assert set(list_models()) <= set(capsys.readouterr().out.split())
    assert mdm_main(["info", "beit3_base"]) == 0
    out = capsys.readouterr().out
    total = float(out.split("total")[1].split()[0])
    assert "multiway attention" in out and round(total, 1) == 221.0
    assert mdm_main(["info", "vlmo_base"]) == 0
    assert "shared attention, VL-FFN in top 2 layers" in capsys.readouterr().out
