"""BEATs import: ``mdm import beats`` on a checkpoint in the released layout, written by a test-only
re-statement of the reference (tests/beats_reference.py) with random weights; features, padding masks and
the fine-tuned predictor agree at ≤ 1e-5 in fp32, front end included."""

from __future__ import annotations

import json

import pytest
import torch

import mdm
from mdm.data.audio import AudioFrontendConfig, compute_fbank
from mdm.export.cli import main as import_main
from mdm.models.beats import BEATsEncoder, reference_patch_padding
from tests.beats_reference import RefBEATs

RELEASED = dict(  # the released models' switches at tiny sizes
    input_patch_size=16,
    embed_dim=24,
    encoder_layers=3,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=8,
    conv_pos_groups=4,
    relative_position_embedding=True,
    num_buckets=32,
    max_distance=64,
    gru_rel_pos=True,
    deep_norm=True,
    layer_norm_first=False,
)
VARIANT = dict(
    RELEASED,
    deep_norm=False,
    layer_norm_first=True,
    relative_position_embedding=False,
    gru_rel_pos=False,
    activation_fn="relu",
    conv_pos=7,
    embed_dim=32,
    conv_bias=True,
)


def _reference(cfg: dict, seed: int = 0) -> RefBEATs:
    torch.manual_seed(seed)
    ref = RefBEATs(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # nothing left at its init value (LayerNorms, gates, biases)
            p.add_(
                torch.randn_like(p) * (0.2 if "norm" in name or "grep" in name or "bias" in name else 0.05)
            )
    return ref


def _waves():
    g = torch.Generator().manual_seed(1)
    source = torch.randn(2, 17600, generator=g) * 0.1
    pad = torch.zeros(2, 17600, dtype=torch.bool)
    source[1, 9000:] = 0.0  # the second clip is shorter: zero samples marked as padding
    pad[1, 9000:] = True
    return source, pad


def _import(ref: RefBEATs, cfg: dict, tmp_path, state=None) -> BEATsEncoder:
    ckpt = tmp_path / "BEATs_tiny.pt"
    torch.save({"cfg": dict(cfg), "model": state if state is not None else ref.state_dict()}, ckpt)
    torch.load(ckpt, weights_only=True)  # the layout loads without unpickling code
    assert import_main(["beats", str(ckpt), str(tmp_path / "out")]) == 0
    model = mdm.from_pretrained(tmp_path / "out")
    assert isinstance(model, BEATsEncoder)
    return model.eval()


@pytest.mark.parametrize("cfg", [RELEASED, VARIANT], ids=["released", "preln-variant"])
def test_features_match_the_reference(cfg, tmp_path):
    ref = _reference(cfg)
    ours = _import(ref, cfg, tmp_path)
    source, pad = _waves()
    with torch.no_grad():
        want, want_pad = ref.extract_features(source.clone(), pad)
        got, got_pad = ours.extract_features(source, pad)
        # the same through the mdm API: our front end + frame padding mask
        fe = AudioFrontendConfig(style="beats")
        fbank = torch.stack([compute_fbank(w, 16000, fe) for w in source])  # (2, 108, 128)
        frames = reference_patch_padding(pad, fbank.shape[1])
        api, api_pad = ours(audio=fbank, audio_padding_mask=frames)
    assert want.shape == (2, 6 * 8, 32) and want_pad.any()
    assert torch.equal(got_pad, want_pad) and torch.equal(api_pad, want_pad)
    keep = ~want_pad  # padded positions attend nowhere real in the reference either way; compare all
    assert (got - want).abs().max() <= 1e-5
    assert (api - want)[keep].abs().max() <= 1e-5 and (api - want).abs().max() <= 1e-5
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["family"] == "beats" and meta["ignored_cfg_keys"] == []


def test_finetuned_predictor_matches_the_reference(tmp_path):
    cfg = dict(RELEASED, finetuned_model=True, predictor_class=7, some_training_flag=3)
    ref = _reference(cfg, seed=2)
    ours = _import(ref, cfg, tmp_path)
    source, pad = _waves()
    with torch.no_grad():
        want, _ = ref.extract_features(source.clone(), pad)
        got, _ = ours.extract_features(source, pad)
        unpadded_want, _ = ref.extract_features(source[:1].clone(), None)
        unpadded_got, _ = ours.extract_features(source[:1], None)
    assert want.shape == (2, 7) and (got - want).abs().max() <= 1e-5
    assert (unpadded_got - unpadded_want).abs().max() <= 1e-5
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["ignored_cfg_keys"] == ["some_training_flag"]


def test_a_broken_mapping_is_caught(tmp_path):
    """Swapping two same-shaped tensors imports fine but moves the features far beyond 1e-5."""
    ref = _reference(RELEASED)
    sd = ref.state_dict()
    sd["encoder.layers.1.self_attn.q_proj.weight"], sd["encoder.layers.1.self_attn.k_proj.weight"] = (
        sd["encoder.layers.1.self_attn.k_proj.weight"],
        sd["encoder.layers.1.self_attn.q_proj.weight"],
    )
    ours = _import(ref, RELEASED, tmp_path, state=sd)
    source, pad = _waves()
    with torch.no_grad():
        assert (
            ours.extract_features(source, pad)[0] - ref.extract_features(source.clone(), pad)[0]
        ).abs().max() > 1e-3


def test_parametrized_weight_norm_names_and_errors(tmp_path, capsys):
    ref = _reference(RELEASED)
    sd = ref.state_dict()
    sd["encoder.pos_conv.0.parametrizations.weight.original0"] = sd.pop("encoder.pos_conv.0.weight_g")
    sd["encoder.pos_conv.0.parametrizations.weight.original1"] = sd.pop("encoder.pos_conv.0.weight_v")
    for i in (1, 2):  # a file listing the shared table under layer 0 only
        sd.pop(f"encoder.layers.{i}.self_attn.relative_attention_bias.weight")
    ours = _import(ref, RELEASED, tmp_path, state=sd)
    source, _ = _waves()
    with torch.no_grad():
        assert (
            ours.extract_features(source)[0] - ref.extract_features(source.clone())[0]
        ).abs().max() <= 1e-5
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}}, bad)
    assert import_main(["beats", str(bad), str(tmp_path / "x")]) == 1
    assert "bad.pt: not a BEATs checkpoint" in capsys.readouterr().err
    sd = ref.state_dict()
    sd.pop("encoder.layers.2.fc1.weight")
    torch.save({"cfg": RELEASED, "model": sd}, bad)
    assert import_main(["beats", str(bad), str(tmp_path / "x")]) == 1
    assert "encoder.layers.2.fc1.weight" in capsys.readouterr().err
