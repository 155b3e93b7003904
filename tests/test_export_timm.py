"""timm export: strict load into timm's VisionTransformer, features equal to mdm's image-only forward."""

from __future__ import annotations

import json

import pytest
import torch

from mdm.cli import main as mdm_main
from mdm.export.timm import export_timm, load_timm_export, mdm_to_timm, timm_model_args
from mdm.export.unilm import mdm_to_unilm
from mdm.models import create_model, save_pretrained

timm = pytest.importorskip("timm")


def _random_model(arch: str, seed: int = 0, **overrides):
    """A model whose every tensor is perturbed away from its init (LayerNorms, gammas, biases too)."""
    torch.manual_seed(seed)
    model = create_model(arch, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _features_match(model, tm, batch: int = 2) -> float:
    image = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.no_grad():
        ours, theirs = model(image=image), tm.eval().forward_features(image)
    assert ours.shape == theirs.shape == (batch, 1 + model.cfg.num_patches, model.cfg.embed_dim)
    return (ours - theirs).abs().max().item()


@pytest.mark.parity
@pytest.mark.parametrize(
    "arch,overrides,timm_arch",
    [
        ("beit3_tiny", dict(depth=2), "beit3_base_patch16_224"),
        ("beit3_tiny", dict(depth=2, normalize_output=False), "beit3_base_patch16_224"),
        ("vlmo_tiny", dict(depth=2), "vit_base_patch16_224"),  # shared attention, layer scale, VL-FFN on top
        (
            "vlmo_tiny",
            dict(depth=2, subln=True, qkv_bias=False, layer_scale_init=0.0),
            "vit_base_patch16_224",
        ),
    ],
)
def test_cli_export_loads_strictly_with_equal_features(tmp_path, arch, overrides, timm_arch):
    model = _random_model(arch, **overrides)
    save_pretrained(model, tmp_path / "m")
    assert (
        mdm_main(
            ["export", "--checkpoint", str(tmp_path / "m"), "--format", "timm", "--out", str(tmp_path / "t")]
        )
        == 0
    )
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["architecture"] == timm_arch
    tm = load_timm_export(tmp_path / "t")  # timm.create_model(..., checkpoint_path=...) loads strictly
    assert _features_match(model, tm) <= 1e-5
    # timm's own local-directory loader reads the same files
    tm2 = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True)
    assert _features_match(model, tm2) <= 1e-5


@pytest.mark.parity
def test_matches_timms_own_beit3_conversion():
    """Our mdm→timm map equals timm's ``_convert_beit3`` applied to our unilm export of the same model."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = _random_model("beit3_tiny", depth=2, normalize_output=False)
    cfg, sd = model.cfg, model.state_dict()
    heads = {"fc_norm.weight": torch.randn(128), "fc_norm.bias": torch.randn(128),
             "head.weight": torch.randn(10, 128), "head.bias": torch.randn(10)}  # fmt: skip
    arch, args = timm_model_args(cfg, heads)
    tm = timm.create_model(arch, **args)
    theirs = checkpoint_filter_fn({"model": mdm_to_unilm(sd, heads)}, tm)
    ours = mdm_to_timm(cfg, sd, heads)
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    tm.load_state_dict(ours, strict=True)


@pytest.mark.parity
@pytest.mark.slow
def test_base_classifier_loads_into_timm_beit3_base_without_arguments(tmp_path):
    """The acceptance case: ``timm.create_model("beit3_base_patch16_224", checkpoint_path=...)``."""
    torch.manual_seed(0)
    with torch.device("meta"):  # skip the (slow) truncated-normal init of 221M parameters
        model = create_model("beit3_base", normalize_output=False)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02)
    heads = {"fc_norm.weight": 1 + 0.1 * torch.randn(768), "fc_norm.bias": 0.1 * torch.randn(768),
             "head.weight": 0.02 * torch.randn(1000, 768), "head.bias": torch.zeros(1000)}  # fmt: skip
    out, arch, _ = export_timm(model.cfg, model.state_dict(), heads, tmp_path / "t")
    tm = timm.create_model("beit3_base_patch16_224", checkpoint_path=str(out / "model.safetensors")).eval()
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        x = model(image=image)
        assert (x - tm.forward_features(image)).abs().max().item() <= 1e-5
        logits = torch.nn.functional.layer_norm(
            x[:, 1:].mean(1), (768,), heads["fc_norm.weight"], heads["fc_norm.bias"]
        )
        logits = logits @ heads["head.weight"].T + heads["head.bias"]  # unilm BEiT3ForImageClassification
        torch.testing.assert_close(tm(image), logits, atol=1e-5, rtol=1e-5)


def test_refuses_what_timm_cannot_build():
    model = create_model("beit3_tiny", depth=1, norm_eps=1e-4)
    with pytest.raises(ValueError, match="eps 0.0001 has no timm"):
        timm_model_args(model.cfg)
    model = create_model("beit3_tiny", depth=1)  # final norm + fc_norm classifier: timm has one or the other
    heads = {"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128),
             "head.weight": torch.zeros(3, 128), "head.bias": torch.zeros(3)}  # fmt: skip
    with pytest.raises(ValueError, match="final norm and the head an fc_norm"):
        timm_model_args(model.cfg, heads)
    sd = dict(model.state_dict())
    sd["layers.0.attn.extra_vision_bias"] = torch.zeros(128)  # a vision tensor timm has no slot for
    with pytest.raises(ValueError, match="no timm VisionTransformer equivalent"):
        mdm_to_timm(model.cfg, sd)
