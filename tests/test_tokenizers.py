"""Visual tokenizers: parity with dall_e and timm's BEiT ViT, the quantizer, the interface, save/load, imports."""

from __future__ import annotations

import math

import pytest
import torch

from mdm.tokenizers import DVAE, VQKD, load, save_tokenizer
from mdm.tokenizers.config import DVAEConfig, ViTConfig, VQKDConfig
from mdm.tokenizers.io import PickleRefused, load_dall_e_pickles
from mdm.tokenizers.quantizer import NormEMAQuantizer
from mdm.tokenizers.unilm import infer_vqkd_config, vqkd_from_unilm, vqkd_to_unilm
from mdm.tokenizers.vit import ViT

TINY_DVAE = DVAEConfig(
    img_size=32, vocab_size=512, hidden_dim=64, blocks_per_group=1, decoder_init_dim=32, decoder_hidden_dim=64
)


def tiny_vqkd(**kw) -> VQKD:
    cfg = VQKDConfig(
        img_size=32,
        patch_size=8,
        encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2),
        decoder=ViTConfig(embed_dim=32, depth=1, num_heads=2),
        codebook_size=64,
        code_dim=8,
        teacher_dim=24,
        **kw,
    )
    return VQKD(cfg)


def _dall_e_pair():
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    return dall_e, enc, dec


@pytest.mark.parity
def test_dvae_matches_dall_e_package():
    dall_e, enc, dec = _dall_e_pair()
    tok = DVAE(TINY_DVAE)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd |= {f"decoder.{k}": v for k, v in dec.state_dict().items()}
    tok.load_state_dict(sd, strict=True)  # same names, same shapes
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref_logits = enc(dall_e.map_pixels(x))
    assert torch.allclose(tok.logits(x), ref_logits, atol=1e-5, rtol=0)
    codes = tok.encode(x)
    assert torch.equal(codes, ref_logits.argmax(dim=1))
    one_hot = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
    ref_img = dall_e.unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
    assert torch.allclose(tok.decode(codes), ref_img, atol=1e-5, rtol=0)


@pytest.mark.parity
def test_dall_e_pickle_import_refuses_without_consent_and_matches_with_it(tmp_path, capsys):
    dall_e, enc, dec = _dall_e_pair()
    torch.save(enc, tmp_path / "encoder.pkl")  # the official files are pickled modules like these
    torch.save(dec, tmp_path / "decoder.pkl")
    with pytest.raises(PickleRefused, match="arbitrary code"):
        load_dall_e_pickles(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", allow_pickle=False)
    tok = load_dall_e_pickles(
        tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", allow_pickle=True, img_size=32
    )
    assert (tok.cfg.hidden_dim, tok.cfg.vocab_size, tok.cfg.blocks_per_group, tok.cfg.decoder_init_dim) == (
        64,
        512,
        1,
        32,
    )
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tok.encode(x), enc(dall_e.map_pixels(x)).argmax(1))
    from mdm.tokenizers.cli import main

    args = [
        "import",
        "dall-e",
        "--encoder",
        str(tmp_path / "encoder.pkl"),
        "--out",
        str(tmp_path / "d"),
        "--img-size",
        "32",
    ]
    assert main(args) == 2 and not (tmp_path / "d").exists()  # refused, nothing written
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*args, "--decoder", str(tmp_path / "decoder.pkl"), "--allow-pickle"]) == 0
    assert torch.equal(load(tmp_path / "d").encode(x), tok.encode(x))
    encoder_only = load_dall_e_pickles(tmp_path / "encoder.pkl", None, allow_pickle=True, img_size=32)
    assert not encoder_only.can_decode
    with pytest.raises(NotImplementedError, match="no decoder"):
        encoder_only.decode(torch.zeros(1, 4, 4, dtype=torch.long))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_dall_e_import_rejects_foreign_globals_even_with_consent(tmp_path):
    path = tmp_path / "encoder.pkl"
    torch.save({"x": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(ValueError, match="refusing to load global"):
        load_dall_e_pickles(path, None, allow_pickle=True)


@pytest.mark.parity
def test_vit_matches_timm_beit():
    from timm.models.beit import Beit

    ref = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0, use_abs_pos_emb=True,
               use_rel_pos_bias=False, init_values=None, global_pool="avg")  # fmt: skip
    ours = ViT(ViTConfig(embed_dim=32, depth=2, num_heads=2), img_size=32, patch_size=8)
    ours.load_state_dict(ref.state_dict(), strict=True)  # unilm/timm BEiT names
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(ours(x), ref.fc_norm(ref.forward_features(x)[:, 1:]), atol=1e-5)


def test_encode_interface_shapes_channels_and_sizes():
    tok = DVAE(TINY_DVAE).freeze()
    codes = tok.encode(torch.rand(2, 3, 32, 32))
    assert codes.dtype == torch.long and codes.shape == (2, 4, 4) and tok.grid_size == (4, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.codebook_size
    grey = torch.rand(2, 1, 32, 32)
    assert torch.equal(tok.encode(grey), tok.encode(grey.expand(-1, 3, -1, -1)))
    rgba = torch.cat([torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)], dim=1)  # fully transparent
    assert torch.equal(tok.encode(rgba), tok.encode(torch.ones(1, 3, 32, 32)))  # composited over white
    assert tok.encode(torch.rand(1, 3, 37, 51)).shape == (1, 4, 4)  # odd sizes are resized
    assert tok.decode(codes).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.encode(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="batch"):
        tok.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        tok.encode(torch.rand(1, 2, 32, 32))


def test_dvae_training_loss_terms():
    tok = DVAE(TINY_DVAE)
    g = torch.Generator().manual_seed(0)
    out = tok(torch.rand(2, 3, 32, 32), temperature=1.0, kl_weight=1.0, generator=g)
    assert torch.allclose(out["loss"], out["recon_loss"] + out["kl_loss"])
    out["loss"].backward()
    assert tok.encoder.blocks.input.w.grad is not None and tok.decoder.blocks.output.conv.w.grad is not None
    # KL to the uniform prior is zero for uniform code probabilities, log K for one-hot ones
    with torch.no_grad():
        tok.encoder.blocks.output.conv.w.zero_()
        tok.encoder.blocks.output.conv.b.zero_()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        uniform = tok(x, generator=g, diversity_weight=1.0)
    assert float(uniform["kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(uniform["diversity_loss"]) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # every position certain of code 7: KL = log K, diversity loss = its weight
        tok.encoder.blocks.output.conv.b[7] = 100.0
        collapsed = tok(x, generator=g, diversity_weight=0.5)
    assert float(collapsed["kl"]) == pytest.approx(math.log(512), rel=1e-4)
    assert float(collapsed["diversity_loss"]) == pytest.approx(0.5, rel=1e-4)


def test_quantizer_kmeans_init_ema_and_unit_codebook():
    q = NormEMAQuantizer(8, 4, decay=0.5, restart_every=0).train()
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    z = centres.repeat(50, 1) + 0.01 * torch.randn(400, 4, generator=g)
    z_q, codes, loss = q(z, generator=g)
    assert bool(q.initted) and torch.allclose(q.codebook.norm(dim=-1), torch.ones(8), atol=1e-5)
    # k-means(++) on well separated clusters puts one code on each centre
    assert codes[:8].unique().numel() == 8 and torch.allclose(q.codebook[codes[:8]], centres, atol=0.05)
    assert z_q.shape == z.shape and codes.shape == (400,) and float(loss) < 1e-3


def test_dead_codes_are_restarted_on_data():
    g = torch.Generator().manual_seed(0)
    q = NormEMAQuantizer(16, 4, restart_every=5, dead_code_threshold=0.1, kmeans_init=False).train()
    far = torch.nn.functional.normalize(torch.ones(15, 4) + 0.01 * torch.randn(15, 4, generator=g), dim=-1)
    near = torch.nn.functional.normalize(-torch.ones(1, 4), dim=-1)
    with torch.no_grad():  # one code near the data, fifteen on the other side of the sphere
        q.codebook.copy_(torch.cat([near, far]))
    data = torch.nn.functional.normalize(-torch.ones(256, 4) + 0.5 * torch.randn(256, 4, generator=g), dim=-1)
    assert q.nearest(data).unique().tolist() == [0]
    for _ in range(5):
        q(data, generator=g)
    assert q.last_restarts == 15
    # restarted codes sit on data points, and now share the data with code 0
    on_data = torch.isclose(q.codebook[1:] @ data.t(), torch.tensor(1.0), atol=1e-4).any(dim=1)
    assert bool(on_data.all())
    assert q.nearest(data).unique().numel() >= 12


def test_vqkd_forward_losses_and_codes():
    tok = tiny_vqkd()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 4, 4, 24)
    out = tok(torch.rand(4, 3, 32, 32), target, generator=g)
    assert torch.allclose(out["loss"], out["rec_loss"] + out["quant_loss"])
    out["loss"].backward()
    assert tok.encoder.patch_embed.proj.weight.grad is not None  # straight-through reaches the encoder
    assert not tok.quantizer.codebook.requires_grad
    assert tok.freeze().encode(torch.rand(2, 3, 32, 32)).shape == (2, 4, 4)
    assert tok.decode_features(torch.zeros(1, 4, 4, dtype=torch.long)).shape == (1, 4, 4, 24)
    with pytest.raises(NotImplementedError, match="pixel decoder"):
        tok.decode(torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda: DVAE(TINY_DVAE), tiny_vqkd], ids=["dvae", "vqkd"])
def test_save_load_round_trip(tmp_path, make):
    tok = make()
    if isinstance(tok, VQKD):  # give it a trained-looking codebook
        tok.train()(
            torch.rand(4, 3, 32, 32), torch.randn(4, 4, 4, 24), generator=torch.Generator().manual_seed(0)
        )
    tok_id = save_tokenizer(tok, tmp_path / "tok")
    again = load(tmp_path / "tok")
    assert (
        again.tokenizer_id == tok_id == save_tokenizer(tok, tmp_path / "tok2")
    )  # id depends on weights only
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(again.encode(x), tok.freeze().encode(x))


def test_unilm_vqkd_key_map_round_trip(tmp_path):
    tok = tiny_vqkd()
    ours = tok.state_dict()
    unilm = vqkd_to_unilm(ours)
    for key, shape in {
        "encoder.blocks.0.attn.q_bias": (32,),
        "encoder.blocks.0.attn.qkv.weight": (96, 32),
        "encoder.fc_norm.weight": (32,),
        "decoder.patch_embed.proj.weight": (32, 8, 1, 1),
        "encode_task_layer.2.weight": (8, 32),
        "decode_task_layer.2.weight": (24, 32),
        "quantize.embedding.weight": (64, 8),
        "quantize.embedding.embed_avg": (64, 8),
        "quantize.embedding.cluster_size": (64,),
        "quantize.embedding.initted": (1,),
        "quantize.cluster_size": (64,),
    }.items():
        assert tuple(unilm[key].shape) == shape, key
    # a unilm training checkpoint also carries the teacher; the importer drops it
    unilm["teacher_model.visual.proj"] = torch.zeros(3)
    unilm["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    back = vqkd_from_unilm(unilm)
    assert set(back) == set(ours)
    assert all(back[k].shape == ours[k].shape and torch.equal(back[k], ours[k]) for k in ours)
    cfg = infer_vqkd_config(back, encoder_heads=2, decoder_heads=2)
    assert (cfg.img_size, cfg.patch_size, cfg.codebook_size, cfg.code_dim, cfg.teacher_dim) == (
        32,
        8,
        64,
        8,
        24,
    )
    torch.save({"model": unilm}, tmp_path / "vqkd.pth")
    from mdm.tokenizers.io import import_unilm_vqkd

    imported = import_unilm_vqkd(tmp_path / "vqkd.pth", 2, 2).freeze()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(imported.encode(x), tok.freeze().encode(x))
