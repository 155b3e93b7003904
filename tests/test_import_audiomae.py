"""``mdm import audiomae``: parity with AudioMAE's encoder, which is timm's VisionTransformer with one input
channel and a (time × frequency) input (AudioMAE ``models_mae.py`` / ``models_vit.py``).

The reference is built from timm at tiny size with random weights, its state dict saved in the released
layout (``{"model": sd, "args": Namespace}`` plus the pretraining decoder's tensors, or a fine-tuned
``fc_norm``/``head``), converted with the command, and the features compared in fp32.
"""

from __future__ import annotations

import argparse
from functools import partial

import pytest
import torch

from mdm.cli import main as mdm_main
from mdm.export.audiomae import audiomae_to_mdm
from mdm.models import from_pretrained

pytestmark = pytest.mark.parity
timm_vit = pytest.importorskip("timm.models.vision_transformer")

T, F, D = 128, 128, 64  # 8 × 8 patches


def reference(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = timm_vit.VisionTransformer(
        img_size=(T, F), patch_size=16, in_chans=1, embed_dim=D, depth=2, num_heads=4, mlp_ratio=4,
        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0,
    )  # fmt: skip
    with torch.no_grad():  # random, non-trivial values everywhere (timm zero-inits biases and cls)
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vit.eval()


def released_file(vit: torch.nn.Module, path, finetuned: bool = False) -> None:
    sd = dict(vit.state_dict())
    if finetuned:  # models_vit.py with global_pool: fc_norm + head, no final norm
        sd.pop("norm.weight"), sd.pop("norm.bias")
        sd.update(
            {
                "fc_norm.weight": torch.ones(D),
                "fc_norm.bias": torch.zeros(D),
                "head.weight": torch.randn(5, D),
                "head.bias": torch.zeros(5),
            }
        )
    else:  # models_mae.py: the decoder and its mask token live in the same file
        sd.update({
            "mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, D),
            "decoder_pos_embed": torch.randn(1, 65, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
            "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(256, 32),
        })  # fmt: skip
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)


def test_pretrained_checkpoint_features_match(tmp_path, capsys):
    vit = reference()
    released_file(vit, tmp_path / "pretrained.pth")
    assert (
        mdm_main(
            ["import", "audiomae", str(tmp_path / "pretrained.pth"), str(tmp_path / "m"), "--num-heads", "4"]
        )
        == 0
    )
    assert "6 decoder tensors dropped" in capsys.readouterr().out
    model = from_pretrained(tmp_path / "m").eval()
    assert model.cfg.arch == "audiomae_base" and model.cfg.audio_frames == T and model.cfg.depth == 2
    fb = torch.randn(3, T, F)
    with torch.no_grad():
        want = vit.forward_features(fb.unsqueeze(1))  # (B, 1 + 64, D): [CLS] then patches, after the norm
        got = model(audio=fb)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err


def test_finetuned_checkpoint_keeps_head_and_pooled_features_match(tmp_path):
    vit = reference(1)
    released_file(vit, tmp_path / "ft.pth", finetuned=True)
    assert (
        mdm_main(["import", "audiomae", str(tmp_path / "ft.pth"), str(tmp_path / "m"), "--num-heads", "4"])
        == 0
    )
    model = from_pretrained(tmp_path / "m").eval()
    assert not model.cfg.normalize_output
    from safetensors.torch import load_file

    heads = load_file(str(tmp_path / "m" / "heads.safetensors"))
    assert sorted(heads) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    fb = torch.randn(2, T, F)
    with torch.no_grad():
        x = vit.patch_embed(fb.unsqueeze(1)) + vit.pos_embed[:, 1:]
        x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1), x], 1)
        for blk in vit.blocks:
            x = blk(x)
        want = x[:, 1:].mean(1)  # models_vit.py global pool (before fc_norm)
        got = model(audio=fb)[:, 1:].mean(1)
    assert (got - want).abs().max().item() <= 1e-5


def test_a_broken_mapping_is_detected(tmp_path, monkeypatch):
    """Swapping the two LayerNorms of a block in the converter must break parity (this test guards the
    parity check itself)."""
    import mdm.export.audiomae as A

    vit = reference()
    released_file(vit, tmp_path / "p.pth")
    broken = dict(A._BLOCK, norm1="ffn.audio.norm", norm2="attn_norm")
    monkeypatch.setattr(A, "_BLOCK", broken)
    assert (
        mdm_main(["import", "audiomae", str(tmp_path / "p.pth"), str(tmp_path / "m"), "--num-heads", "4"])
        == 0
    )
    model = from_pretrained(tmp_path / "m").eval()
    fb = torch.randn(2, T, F)
    with torch.no_grad():
        err = (model(audio=fb) - vit.forward_features(fb.unsqueeze(1))).abs().max().item()
    assert err > 1e-3


def test_unknown_keys_and_bad_files_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unexpected AudioMAE key 'blocks.0.ls1.gamma'"):
        audiomae_to_mdm(
            {"patch_embed.proj.weight": torch.zeros(4, 1, 16, 16), "blocks.0.ls1.gamma": torch.zeros(4)}
        )
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert mdm_main(["import", "audiomae", str(tmp_path / "bad.pth"), str(tmp_path / "m")]) == 1
    assert "bad.pth" in capsys.readouterr().err


def test_audio_models_export_as_safetensors_and_refuse_timm(tmp_path, capsys):
    vit = reference()
    released_file(vit, tmp_path / "p.pth")
    assert (
        mdm_main(["import", "audiomae", str(tmp_path / "p.pth"), str(tmp_path / "m"), "--num-heads", "4"])
        == 0
    )
    assert (
        mdm_main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "m"),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    fb = torch.randn(1, T, F)
    with torch.no_grad():
        torch.testing.assert_close(
            from_pretrained(tmp_path / "s")(audio=fb), from_pretrained(tmp_path / "m")(audio=fb)
        )
    assert (
        mdm_main(
            ["export", "--checkpoint", str(tmp_path / "m"), "--format", "timm", "--out", str(tmp_path / "t")]
        )
        != 0
    )
    assert "no vision tower" in capsys.readouterr().err
