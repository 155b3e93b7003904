"""PretrainModel (weighted sum, streams, export, optimizer hooks), ObjectivesConfig, fill_visual_tokens,
purity of mdm.objectives, and a loss-decreases sanity run."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mdm.config import ConfigError, from_dict, to_dict
from mdm.models import MultiwayTransformer
from mdm.objectives import OBJECTIVES, ObjectivesConfig, PretrainModel, fill_visual_tokens
from mdm.objectives.config import KNOWN
from tests.test_objectives import B, P, make_batches, make_model

ALL = ["mim", "mlm", "mvlm"]


# --------------------------------------------------------------------------- PretrainModel
def test_total_is_the_weighted_sum_of_every_loss_entry():
    model = make_model(ALL, weights={"mim": 0.5, "mlm": 2.0})
    out = model(make_batches())
    expected = 0.5 * out["mim_loss"] + 2.0 * out["mlm_loss"] + out["mvlm_image_loss"] + out["mvlm_text_loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses = sorted(k for k in out if k.endswith("_loss"))
    assert losses == ["mim_loss", "mlm_loss", "mvlm_image_loss", "mvlm_text_loss"]
    assert all(out[k].requires_grad for k in losses)
    assert not any(out[k].requires_grad for k in out if k.endswith(("_acc", "_count")))


def test_missing_streams_are_skipped_and_unknown_ones_rejected():
    model = make_model(ALL)
    batches = make_batches()
    out = model({"text": batches["text"], "pair": None})
    assert {k for k in out if k.endswith("_loss")} == {"mlm_loss"}
    with pytest.raises(KeyError, match="images"):
        model({"images": batches["image"]})
    with pytest.raises(ValueError, match="none of the given streams"):
        make_model(["mlm"])({"image": batches["image"]})


def test_export_is_the_backbone_alone_and_loads_strictly():
    model = make_model(["cls_mim", "mlm", "mvlm"])
    sd = model.pretrained_backbone_state_dict()
    fresh = MultiwayTransformer(model.backbone.cfg)
    fresh.load_state_dict(sd, strict=True)
    assert set(sd) == set(fresh.state_dict())
    full = model.state_dict()
    assert {k for k in full if not k.startswith("backbone.")} == {
        k for k in full if k.startswith(("heads.", "objectives."))
    }
    for k, v in sd.items():
        assert torch.equal(v, full[f"backbone.{k}"])


def test_no_weight_decay_and_group_matcher_cover_the_right_parameters():
    timm_models = pytest.importorskip("timm.models")
    model = make_model(ALL + ["mae"], mae_decoder_dim=32, mae_decoder_depth=1, mae_decoder_heads=4)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert "backbone.vision_embed.mask_token" in nwd and "objectives.mae.decoder.mask_token" in nwd
    assert nwd <= set(names)

    groups = timm_models.group_parameters(model, model.group_matcher())
    where = {n: gid for gid, members in groups.items() for n in members}
    assert set(where) == set(names)
    top = max(groups)
    assert where["backbone.text_embed.weight"] == min(groups)
    assert where["backbone.layers.0.attn.qkv.weight"] < where["backbone.layers.1.attn.qkv.weight"] < top
    # timm convention: the final norm joins the last block; heads and objective modules come after.
    assert where["backbone.norm.vision.weight"] == where["backbone.layers.1.attn.qkv.weight"]
    assert {n for n in names if where[n] == top} == {
        n for n in names if n.startswith(("heads.", "objectives."))
    }


def test_shared_heads_follow_the_model_across_copy_and_dtype():
    model = make_model(ALL)
    clone = copy.deepcopy(model)
    assert clone.objectives["mvlm"].image_head is clone.heads["mim"] is not model.heads["mim"]
    clone.double()
    assert clone.objectives["mim"].head.proj.weight.dtype == torch.float64


def test_forward_never_touches_the_global_rng():
    model = make_model(ALL + ["mae"], mae_decoder_dim=32, mae_decoder_depth=1, mae_decoder_heads=4).train()
    batches = make_batches()
    batches["image"]["mae_noise"] = torch.rand(B, P)
    state = torch.get_rng_state()
    model(batches)["loss"].backward()
    assert torch.equal(state, torch.get_rng_state())


def test_objectives_package_imports_no_distributed_or_io():
    root = Path(__file__).resolve().parents[1] / "mdm" / "objectives"
    forbidden = re.compile(
        r"torch\.distributed|deepspeed|\bopen\(|torch\.(save|load)\(|torch\.manual_seed|np\.random|import random"
        r"|torch\.(rand|randn|randint|randperm|multinomial)\((?![^)]*generator=)"
    )
    for path in sorted(root.glob("*.py")):
        bad = [m.group(0) for m in forbidden.finditer(path.read_text())]
        assert not bad, f"{path.name}: {bad}"


# --------------------------------------------------------------------------- config
def test_objectives_config_is_strict():
    assert sorted(KNOWN) == OBJECTIVES.names()
    cfg = from_dict(ObjectivesConfig, {"objectives": ["cls_mim", "mlm"], "weights": {"mlm": 0.25}})
    assert from_dict(ObjectivesConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="did you mean 'mvlm'"):
        from_dict(ObjectivesConfig, {"objectives": ["mvml"]})
    with pytest.raises(ConfigError, match="cls_mim already computes"):
        from_dict(ObjectivesConfig, {"objectives": ["mim", "cls_mim"]})
    with pytest.raises(ConfigError, match="not among the objectives"):
        from_dict(ObjectivesConfig, {"objectives": ["mim"], "weights": {"mlm": 1.0}})
    with pytest.raises(ConfigError, match="codebook_sise"):
        from_dict(ObjectivesConfig, {"codebook_sise": 8192})


# --------------------------------------------------------------------------- frozen tokenizer
class FakeTokenizer(nn.Module):
    """encode: argmax of a 1x1 conv over 4x4 average-pooled [0, 1] pixels → (B, 4, 4) codes."""

    def __init__(self, codes: int = 64) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, codes, 1)
        self.calls: list[torch.Size] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape)
        return self.proj(nn.functional.adaptive_avg_pool2d(images, 4)).argmax(1)


def test_fill_visual_tokens_under_no_grad_in_raster_order():
    tok = FakeTokenizer()
    batch = make_batches()["image"]
    del batch["image_tokens"]
    batch["tokenizer_image"] = torch.rand(B, 3, 32, 32)
    out = fill_visual_tokens(batch, tok)
    assert "image_tokens" not in batch  # the input batch is not modified
    assert tok.calls == [torch.Size([B, 3, 32, 32])]  # the tokenizer view, not the backbone view
    codes = out["image_tokens"]
    assert codes.dtype == torch.long and codes.shape == (B, P) and not codes.requires_grad
    assert torch.equal(codes.view(B, 4, 4), tok.encode(batch["tokenizer_image"]))
    with torch.enable_grad():
        assert fill_visual_tokens(batch, _GradProbe()).get("image_tokens") is not None

    pre = dict(batch, image_tokens=torch.zeros(B, P, dtype=torch.long))
    assert fill_visual_tokens(pre, tok)["image_tokens"] is pre["image_tokens"] and len(tok.calls) == 2
    with pytest.raises(ValueError, match="4x4 code grid.*9 patches"):
        fill_visual_tokens({"tokenizer_image": batch["tokenizer_image"]}, tok, num_patches=9)
    with pytest.raises(KeyError, match="tokenizer_image"):  # never the normalised backbone view
        fill_visual_tokens({"image": batch["image"]}, tok)


def test_check_visual_tokenizer_compares_codebook_and_grid():
    model = make_model(["mim"])
    tok = FakeTokenizer(codes=64)
    tok.codebook_size, tok.grid_size = 64, (4, 4)
    model.check_visual_tokenizer(tok)
    tok.codebook_size = 8192
    with pytest.raises(ValueError, match="8192 codes.*predicts 64"):
        model.check_visual_tokenizer(tok)
    tok.codebook_size, tok.grid_size = 64, (14, 14)
    with pytest.raises(ValueError, match="14x14.*4x4"):
        model.check_visual_tokenizer(tok)


class _GradProbe:
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "tokenizer called with grad enabled"
        return torch.zeros(images.shape[0], 4, 4, dtype=torch.long)


# --------------------------------------------------------------------------- sanity
def test_loss_decreases_on_a_fixed_batch():
    model: PretrainModel = make_model(ALL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batches = make_batches()
    losses = []
    for _ in range(20):
        out = model(batches)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert out["mim_acc"].item() > 0.5 and out["mlm_acc"].item() > 0.5
