"""The audio expert of the Multiway Transformer: presets, routing, padding, positions, timm-style API."""

from __future__ import annotations

from functools import partial

import pytest
import timm.optim
import torch

from mdm.models import create_model, from_pretrained, list_models, save_pretrained
from mdm.models.layers.embeddings import resize_audio_pos_table


def tiny_audio(name: str = "vlmo_tiny_audio", **kw):
    torch.manual_seed(0)
    return create_model(name, **{"depth": 2, "embed_dim": 64, "ffn_dim": 128, "audio_frames": 64, **kw})


def fbank(B: int = 2, T: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, 128, generator=torch.Generator().manual_seed(seed))


def grads(model, **inputs) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def touched(g, part: str) -> bool:
    found = [v for n, v in g.items() if part in n]
    assert found, f"no parameter named like {part!r}"
    return any(v is not None and v.abs().sum() > 0 for v in found)


def test_presets_and_defaults_unchanged():
    names = list_models()
    for n in (
        "audiomae_tiny",
        "audiomae_base",
        "audiomae_large",
        "beats_base",
        "vlmo_tiny_audio",
        "vlmo_base_audio",
    ):
        assert n in names
    plain = create_model("vlmo_tiny", depth=1)
    assert not any("audio" in k for k in plain.state_dict()), "audio is off by default"
    assert plain.cfg.modalities == ["vision", "text"]
    with torch.device("meta"):
        mae = create_model("audiomae_base")
    assert mae.cfg.audio_grid() == (64, 8) and mae.cfg.audio_num_patches == 512
    assert not hasattr(mae, "vision_embed") and not hasattr(mae, "text_embed")
    assert {k.split(".")[3] for k in mae.state_dict() if ".ffn." in k} == {"audio"}


def test_audiomae_base_has_timm_vit_b_parameters():
    """audiomae_base = timm's ViT-B with in_chans=1 on 1024×128, minus the (fixed) position table, plus
    the audio [MASK] token (AudioMAE's encoder never needs one)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        ref = VisionTransformer(
            img_size=(1024, 128), patch_size=16, in_chans=1, embed_dim=768, depth=12, num_heads=12,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0,
        )  # fmt: skip
        ours = create_model("audiomae_base")
    n_ref = sum(p.numel() for p in ref.parameters()) - ref.pos_embed.numel() + 768
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert dict(ours.named_buffers())["audio_pos_embed"].shape == (513, 768)
    with torch.device("meta"):
        beats = create_model("beats_base")
    assert beats.cfg.depth == 12 and beats.cfg.num_heads == 12 and beats.cfg.ffn_dim == 3072
    assert "audio_pos_embed" in dict(beats.named_parameters())  # learned positions


def test_audio_and_audio_text_shapes_and_routing():
    model = tiny_audio().train()
    P = 4 * 8
    a = fbank()
    assert model(audio=a).shape == (2, 1 + P, 64)
    g = grads(model, audio=a)
    assert touched(g, "ffn.audio") and not touched(g, "ffn.vision") and not touched(g, "ffn.text")
    assert not touched(g, "vision_embed") and touched(g, "audio_embed")
    text = torch.randint(0, 100, (2, 5))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    assert model(audio=a, text=text, text_padding_mask=pad).shape == (2, 1 + P + 5, 64)
    g = grads(model, audio=a, text=text, text_padding_mask=pad)
    # lower layer: audio and text experts; top layer (vl_ffn_layers=1): the VL-FFN fuses both
    assert touched(g, "layers.0.ffn.audio") and touched(g, "layers.0.ffn.text")
    assert touched(g, "layers.1.ffn.vl") and not touched(g, "layers.1.ffn.audio")
    with pytest.raises(ValueError, match="not both"):
        model(image=torch.randn(2, 3, 64, 64), audio=a)
    with pytest.raises(ValueError, match="128"):
        model(audio=torch.randn(2, 64, 64))
    with pytest.raises(ValueError, match="no audio expert"):
        tiny_audio("vlmo_tiny", audio_frames=1024).layers[0].ffn.expert("audio", False)


def test_mask_token_and_visible_index():
    model = tiny_audio("audiomae_tiny").eval()
    a = fbank()
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        full, masked = model(audio=a), model(audio=a, audio_mask=mask)
        vis = (~mask).nonzero()[:, 1].view(2, -1)  # (B, 16)
        kept = model(audio=a, audio_visible_index=vis)
    assert kept.shape == (2, 17, 64)
    assert not torch.allclose(full, masked)
    # the [MASK] embedding replaces exactly the masked patches: a model whose mask token equals the
    # patch embedding of a zero patch is unchanged on zero inputs
    z = torch.zeros(1, 64, 128)
    with torch.no_grad():
        model.audio_embed.mask_token.copy_(model.audio_embed.proj.bias.view(1, 1, -1))
        torch.testing.assert_close(model(audio=z, audio_mask=mask[:1]), model(audio=z), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["vlmo_tiny_audio", "beit3_tiny"])
def test_padded_clips_match_unpadded(arch):
    """A 48-frame clip padded to 96 frames (with audio_padding_mask) gives the same features at its real
    patches as the clip alone, audio-only and with text; in the BEiT-3 layout audio has its own
    attention and norm copies. (Exact while the padded length is within the position table, which is
    cropped, not interpolated, there.)"""
    kw = {"modalities": ["vision", "text", "audio"]} if arch == "beit3_tiny" else {}
    model = tiny_audio(arch, audio_frames=128, **kw).eval()
    if arch == "beit3_tiny":
        assert "layers.0.attn.qkv.audio.weight" in model.state_dict()
    clip = fbank(1, 48, seed=1)
    other = fbank(1, 96, seed=2)
    batch = torch.cat([torch.cat([clip, torch.zeros(1, 48, 128)], 1), other])  # (2, 96, 128)
    pad = torch.zeros(2, 96, dtype=torch.bool)
    pad[0, 48:] = True
    text = torch.randint(0, 100, (2, 4))
    with torch.no_grad():
        alone = model(audio=clip)  # (1, 1 + 24, D)
        padded = model(audio=batch, audio_padding_mask=pad)  # (2, 1 + 48, D)
        torch.testing.assert_close(padded[:1, : 1 + 24], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(padded[1:], model(audio=other), rtol=0, atol=1e-5)
        joint_alone = model(audio=clip, text=text[:1])
        joint = model(audio=batch, audio_padding_mask=pad, text=text)
        torch.testing.assert_close(joint[:1, :25], joint_alone[:, :25], rtol=0, atol=1e-5)
        torch.testing.assert_close(joint[:1, 49:], joint_alone[:, 25:], rtol=0, atol=1e-5)
        # the mask matters: without it the padded frames change the real patches
        assert not torch.allclose(model(audio=batch)[:1, :25], alone, atol=1e-3)


def test_positions_crop_and_interpolate_along_time():
    model = tiny_audio("audiomae_tiny").eval()  # table for 64 frames = 4 × 8 patches
    table = model.audio_pos_embed
    short = resize_audio_pos_table(table, 8, 2)
    torch.testing.assert_close(short, table[: 1 + 16])
    long = resize_audio_pos_table(table, 8, 7)
    assert long.shape == (1 + 56, 64)
    grid, lgrid = table[1:].view(4, 8, 64), long[1:].view(7, 8, 64)
    torch.testing.assert_close(lgrid[0], grid[0])
    torch.testing.assert_close(lgrid[-1], grid[-1])
    torch.testing.assert_close(lgrid[2], grid[1])  # new t maps to old t·3/6 (end points aligned)
    torch.testing.assert_close(lgrid[1], (grid[0] + grid[1]) / 2)
    with torch.no_grad():
        assert model(audio=fbank(1, 112)).shape == (1, 1 + 56, 64)
        assert model(audio=fbank(1, 32)).shape == (1, 1 + 16, 64)


def test_save_load_round_trip_and_grad_checkpointing(tmp_path):
    model = tiny_audio().eval()
    a = fbank()
    save_pretrained(model, tmp_path / "m")
    back = from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(audio=a), model(audio=a), rtol=0, atol=0)
    model.train()
    text = torch.randint(0, 100, (2, 3))
    ref = grads(model, audio=a, text=text)
    model.set_grad_checkpointing(True)
    got = grads(model, audio=a, text=text)
    for n, g in ref.items():
        if g is not None:
            torch.testing.assert_close(got[n], g, rtol=0, atol=1e-6, msg=n)


def test_layer_decay_and_weight_decay_cover_audio_parameters():
    model = tiny_audio("beats_tiny", depth=3)
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale, decay = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[id(p)], decay[id(p)] = group["lr_scale"], group["weight_decay"]
    params = dict(model.named_parameters())
    for n in ("audio_embed.proj.weight", "audio_embed.cls_token", "audio_pos_embed"):
        assert scale[id(params[n])] == pytest.approx(0.5**3), n
    nwd = model.no_weight_decay()
    assert {"audio_embed.cls_token", "audio_embed.mask_token", "audio_pos_embed"} <= nwd <= set(params)
    for n in nwd:
        assert decay[id(params[n])] == 0.0, n
    assert decay[id(params["layers.0.ffn.audio.fc1.weight"])] == 0.05


def test_audio_patch_projection_starts_xavier_uniform():
    """As AudioMAE (MAE ``initialize_weights``): xavier-uniform on the flattened (D, p·p) kernel, so a
    patch's content is not drowned by its fixed sine-cosine position (std 0.02 made it ~17× smaller)."""
    w = tiny_audio("audiomae_tiny", embed_dim=128).audio_embed.proj.weight  # (128, 1, 16, 16)
    bound = (6.0 / (128 + 256)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
