"""Audio objectives: AudioMAE reconstruction (global and shifted-window decoders), BEATs masked acoustic-token
prediction, audio-text ITC, and all streams in one PretrainModel."""

from __future__ import annotations

import pytest
import torch

from mdm.models import create_model
from mdm.models.config import make_config
from mdm.objectives import (
    AudioMAEDecoder,
    AudioMaskedAutoencoder,
    MaskedAcousticModeling,
    ObjectivesConfig,
    build_pretrain_model,
    fill_audio_tokens,
)
from mdm.objectives.amae import window_regions
from mdm.objectives.mae import normalize_patches

KW = dict(depth=2, embed_dim=64, ffn_dim=128, num_heads=4, audio_frames=64)


def backbone(name="audiomae_tiny", **kw):
    torch.manual_seed(0)
    return create_model(name, **{**KW, **kw})


def audio_batch(B=2, T=64, ratio=0.75, seed=0, pad_last=0):
    g = torch.Generator().manual_seed(seed)
    P = (T // 16) * 8
    hidden = round(ratio * P)
    mask = torch.stack([torch.randperm(P, generator=g) < hidden for _ in range(B)])  # (B, P), equal counts
    batch = {"audio": torch.randn(B, T, 128, generator=g), "audio_mask": mask}
    if pad_last:
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[-1, T - pad_last :] = True
        batch["audio_padding_mask"] = pad
    return batch


def test_amae_loss_is_mse_on_hidden_normalised_patches():
    model = backbone().eval()
    obj = AudioMaskedAutoencoder(model.cfg, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    batch = audio_batch()
    out = obj(model, batch)
    r = obj.reconstruct(model, batch)
    # hand computation, AudioMAE's forward_loss: per-patch mean over values, mean over removed patches
    a = batch["audio"]
    target = a.reshape(2, 4, 16, 8, 16).permute(0, 1, 3, 2, 4).reshape(2, 32, 256)  # time-major patches
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    m = batch["audio_mask"].float()
    want = (((r["pred"] - target) ** 2).mean(-1) * m).sum() / m.sum()
    torch.testing.assert_close(out["amae_loss"], want)
    assert out["amae_count"].item() == m.sum().item() == 48
    torch.testing.assert_close(r["target"], normalize_patches(target))


def test_amae_padding_is_neither_target_nor_key():
    model = backbone().eval()
    obj = AudioMaskedAutoencoder(model.cfg, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    batch = audio_batch(pad_last=32)  # last clip: 2 of 4 time patches are padding
    r = obj.reconstruct(model, batch)
    assert not r["hidden"][1, 16:].any() and r["hidden"][0, 16:].sum() > 0
    assert obj(model, batch)["amae_count"].item() == r["hidden"].sum().item()
    # padded frames do not change the real patches' predictions
    batch2 = {**batch, "audio": batch["audio"].clone()}
    batch2["audio"][1, 32:] = 5.0
    r2 = obj.reconstruct(model, batch2)
    torch.testing.assert_close(r2["pred"][1, :16], r["pred"][1, :16], rtol=0, atol=1e-5)


def test_local_decoder_windows_and_shift_mask():
    """Depth 2 on an 8 × 8 grid with 4 × 4 windows, the second block shifted by 2 along time: a change at
    patch (0, 0) reaches t < 6, f < 4 and nothing else — the wrapped window of the shifted block must not
    carry it from t ∈ {0, 1} to t ∈ {6, 7}."""
    torch.manual_seed(0)
    dec = AudioMAEDecoder(16, 4, 8, dim=32, depth=2, num_heads=4, attention="local").eval()
    with torch.no_grad():  # O(1) weights: with the 0.02 init a change moves other tokens by ~1e-8 only
        for p in dec.parameters():
            p.normal_(0, 0.3)
    latent = torch.randn(1, 1 + 64, 16)
    vis = torch.arange(64)[None]
    with torch.no_grad():
        base = dec(latent, vis, (8, 8)).view(8, 8, 4)
        bumped = latent.clone()
        bumped[0, 1] += 3.0  # patch (t=0, f=0)
        moved = (dec(bumped, vis, (8, 8)).view(8, 8, 4) - base).abs().amax(-1)  # (8, 8)
    reach = moved > 1e-4
    assert reach[:6, :4].all() and not reach[6:].any() and not reach[:, 4:].any()
    regions = window_regions(8, 8, (4, 4), (2, 0))
    assert regions[:4].eq(0).all() and regions[4:6].eq(3).all() and regions[6:].eq(6).all()
    # odd lengths: the grid is padded to whole windows, the extra cells are never keys
    with torch.no_grad():
        assert dec(torch.randn(2, 1 + 40, 16), torch.arange(40).expand(2, -1), (5, 8)).shape == (2, 40, 4)


@pytest.mark.parametrize("attention", ["global", "local"])
def test_amae_trains(attention):
    model = backbone().train()
    obj = AudioMaskedAutoencoder(
        model.cfg, decoder_dim=32, decoder_depth=2, decoder_heads=4, decoder_attention=attention
    )
    opt = torch.optim.AdamW([*model.parameters(), *obj.parameters()], lr=2e-3)
    batch = audio_batch(B=4, ratio=0.8)
    # stationary "tones": every clip constant over time, so a hidden patch is predictable from the
    # visible patches of its frequency row
    f = torch.arange(128, dtype=torch.float32)
    tones = torch.stack([torch.sin(f / (2.0 + b)) for b in range(4)])  # (4, 128)
    batch["audio"] = tones[:, None, :].expand(4, 64, 128) + 0.05 * batch["audio"]
    losses = []
    for _ in range(40):
        loss = obj(model, batch)["amae_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_beats_cross_entropy_on_hidden_patches_and_learns():
    model = backbone("beats_tiny").train()
    obj = MaskedAcousticModeling(
        model.cfg, codebook_size=16, predictor_dim=32, predictor_depth=1, predictor_heads=4
    )
    batch = audio_batch(B=4, ratio=0.75, pad_last=16)
    g = torch.Generator().manual_seed(1)
    batch["audio_tokens"] = torch.randint(0, 16, (4, 32), generator=g)
    out = obj(model, batch)
    hidden_real = batch["audio_mask"].clone()
    hidden_real[3, 24:] = False  # the last time patch of the last clip is padding
    assert out["beats_count"].item() == hidden_real.sum().item()
    assert abs(out["beats_loss"].item() - torch.log(torch.tensor(16.0)).item()) < 0.5  # ≈ uniform at init
    opt = torch.optim.AdamW([*model.parameters(), *obj.parameters()], lr=3e-3)
    for _ in range(30):
        out = obj(model, batch)
        opt.zero_grad()
        out["beats_loss"].backward()
        opt.step()
    assert out["beats_acc"].item() > 3 / 16  # well above chance (1/16) on the memorised batch
    with pytest.raises(ValueError, match="audio_tokens"):
        obj(model, {**batch, "audio_tokens": batch["audio_tokens"][:, :5]})


def test_fill_audio_tokens_uses_the_frozen_tokenizer_without_grad():
    class Tok:
        def encode(self, audio, padding_mask=None):
            assert not torch.is_grad_enabled()
            return audio.reshape(audio.shape[0], -1, 16 * 128)[..., 0].gt(0).long().repeat_interleave(8, 1)

    batch = audio_batch()
    out = fill_audio_tokens(batch, Tok())
    assert out["audio_tokens"].shape == (2, 32) and "audio_tokens" not in batch
    assert fill_audio_tokens(out, None)["audio_tokens"] is out["audio_tokens"]
    with pytest.raises(ValueError, match="integer codes"):
        fill_audio_tokens(batch, type("T", (), {"encode": lambda self, a, p=None: torch.zeros(2, 32)})())


def test_all_streams_in_one_pretrain_model():
    """Image, text, pair, audio and audio-text batches through one PretrainModel (vision, language and
    audio experts): every objective returns its entries, every head and expert gets a gradient."""
    cfg = make_config("vlmo_tiny_audio", **KW)
    obj = ObjectivesConfig(
        objectives=["mim", "mlm", "mvlm", "itc", "amae", "beats", "audio_itc"],
        codebook_size=32, audio_codebook_size=16, amae_decoder_dim=32, amae_decoder_depth=1,
        amae_decoder_heads=4, beats_predictor_depth=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_pretrain_model(cfg, obj).train()
    g = torch.Generator().manual_seed(0)
    P = cfg.num_patches
    text = {
        "text": torch.randint(0, 100, (2, 6), generator=g),
        "text_input": torch.randint(0, 100, (2, 6), generator=g),
        "text_mask": torch.rand(2, 6, generator=g) < 0.5,
        "text_padding_mask": torch.zeros(2, 6, dtype=torch.bool),
    }
    image = {
        "image": torch.randn(2, 3, 64, 64, generator=g),
        "image_mask": torch.rand(2, P, generator=g) < 0.4,
        "image_tokens": torch.randint(0, 32, (2, P), generator=g),
    }
    audio = {**audio_batch(), "audio_tokens": torch.randint(0, 16, (2, 32), generator=g)}
    batches = {
        "image": image,
        "text": text,
        "pair": {**image, **text},
        "audio": audio,
        "audio_text": {**audio_batch(seed=3), **text},
    }
    out = model(batches)
    for k in (
        "mim_loss",
        "mlm_loss",
        "mvlm_image_loss",
        "itc_loss",
        "amae_loss",
        "beats_loss",
        "audio_itc_loss",
    ):
        assert torch.isfinite(out[k]), k
    out["loss"].backward()
    names = dict(model.named_parameters())
    for part in (
        "ffn.audio",
        "ffn.vision",
        "ffn.text",
        "ffn.vl",
        "audio_embed",
        "heads.audio_itc",
        "objectives.amae",
        "objectives.beats",
    ):
        assert any(part in n and p.grad is not None and p.grad.abs().sum() > 0 for n, p in names.items()), (
            part
        )
    nwd = model.no_weight_decay()
    assert {"objectives.amae.decoder.mask_token", "backbone.audio_embed.cls_token"} <= nwd <= set(names)
    with pytest.raises(ValueError, match="no audio expert"):
        build_pretrain_model(make_config("vlmo_tiny", depth=1), ObjectivesConfig(objectives=["amae"]))


@pytest.mark.parity
def test_amae_loss_matches_audiomae_restated_on_timm():
    """The amae objective against AudioMAE's computation on timm modules (``benchmarks/audio_throughput.py``'s
    peer) at a tiny size, same weights through the import key map: equal loss and encoder gradients."""
    pytest.importorskip("timm")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "audio_throughput.py"
    spec = importlib.util.spec_from_file_location("audio_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    TimmAudioMAE, share_weights = bench.TimmAudioMAE, bench.share_weights

    torch.manual_seed(0)
    peer = TimmAudioMAE(frames=64, dim=64, depth=2, heads=4, dec_dim=32, dec_depth=2, dec_heads=4)
    model = create_model("audiomae_tiny", depth=2, embed_dim=64, ffn_dim=256, num_heads=4, audio_frames=64)
    obj = AudioMaskedAutoencoder(model.cfg, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    share_weights(peer, model, obj)
    batch = audio_batch(B=3, ratio=0.8)
    vis = (~batch["audio_mask"]).nonzero()[:, 1].view(3, -1)
    ours = obj(model, batch)["amae_loss"]
    theirs = peer(batch["audio"], vis)
    assert abs(ours.item() - theirs.item()) <= 1e-5
    ours.backward()
    theirs.backward()
    g_ours = model.layers[0].ffn.audio.fc1.weight.grad
    g_theirs = peer.encoder.blocks[0].mlp.fc1.weight.grad
    assert (g_ours - g_theirs).abs().max().item() <= 1e-5
