"""``mdm import unilm``: reading torchscale/unilm BEiT-3 checkpoints safely and exactly.

Checkpoints are synthesised from torchscale's ``BEiT3`` key names and shapes (reference notes §1.3),
written independently of mdm's key map; one test also uses a real torchscale model when it is installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mdm
from mdm.export.cli import main as import_main
from mdm.export.unilm import load_unilm_checkpoint, mdm_to_torchscale, torchscale_to_mdm

D, HEADS, DEPTH, GRID, VOCAB, TEXT_POS = 64, 4, 2, 2, 50, 40  # 32 px images, patch 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spinning on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def torchscale_state_dict(seed: int = 0, normalize_output: bool = True) -> dict[str, torch.Tensor]:
    """A torchscale BEiT3 backbone state dict (no prefix) with random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {
        "text_embed.weight": r(VOCAB, D),
        "vision_embed.mask_token": r(1, 1, D),
        "vision_embed.cls_token": r(1, 1, D),
        "vision_embed.proj.weight": r(D, 3, 16, 16) * 0.05,
        "vision_embed.proj.bias": r(D),
        "encoder.embed_positions.A.weight": r(GRID * GRID + 3, D),
        "encoder.embed_positions.B.weight": r(TEXT_POS, D),
    }
    for i in range(DEPTH):
        pre = f"encoder.layers.{i}."
        for X in "AB":
            for proj in ("k", "v", "q", "out"):
                sd[f"{pre}self_attn.{proj}_proj.{X}.weight"] = r(D, D) * D**-0.5
                sd[f"{pre}self_attn.{proj}_proj.{X}.bias"] = r(D)
            for norm, width in (
                ("self_attn.inner_attn_ln", D),
                ("self_attn_layer_norm", D),
                ("final_layer_norm", D),
                ("ffn.ffn_layernorm", 4 * D),
            ):
                name = norm.replace("ffn.", f"ffn.{X}.") if norm.startswith("ffn.") else f"{norm}.{X}"
                sd[f"{pre}{name}.weight"], sd[f"{pre}{name}.bias"] = 1 + 0.1 * r(width), r(width)
            sd[f"{pre}ffn.{X}.fc1.weight"], sd[f"{pre}ffn.{X}.fc1.bias"] = r(4 * D, D) * D**-0.5, r(4 * D)
            sd[f"{pre}ffn.{X}.fc2.weight"], sd[f"{pre}ffn.{X}.fc2.bias"] = r(D, 4 * D) * D**-0.5, r(D)
    if normalize_output:
        for X in "AB":
            sd[f"encoder.layer_norm.{X}.weight"], sd[f"encoder.layer_norm.{X}.bias"] = 1 + 0.1 * r(D), r(D)
    return sd


def run_import(tmp_path: Path, obj, *extra: str, name: str = "ckpt.pth") -> tuple[int, Path]:
    ckpt = tmp_path / name
    torch.save(obj, ckpt)
    out = tmp_path / (name + ".mdm")
    return import_main(["unilm", str(ckpt), str(out), "--num-heads", str(HEADS), *extra]), out


# ------------------------------------------------------------------------------------------ safety

_RAN: list[str] = []


def _side_effect(path: str) -> str:
    _RAN.append(path)
    Path(path).write_text("code ran")
    return path


class Payload:
    """Unpickling this calls ``_side_effect`` — what a weights-only load must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_pickled_object_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    obj = {
        "model": {"beit3." + k: v for k, v in torchscale_state_dict().items()},
        "args": Payload(str(marker)),
    }
    code, out = run_import(tmp_path, obj)
    err = capsys.readouterr().err
    assert code == 1
    assert "ckpt.pth" in err and "weights-only" in err
    assert not marker.exists() and not _RAN and not out.exists()
    with pytest.raises(ValueError, match="weights-only"):
        load_unilm_checkpoint(tmp_path / "ckpt.pth")


def test_missing_file_is_a_message(tmp_path, capsys):
    code = import_main(["unilm", str(tmp_path / "nope.pth"), str(tmp_path / "o")])
    assert code == 1 and "nope.pth" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("normalize_output", [True, False])
def test_final_norm_presence_is_read_off_the_keys(tmp_path, normalize_output):
    sd = torchscale_state_dict(normalize_output=normalize_output)
    code, out = run_import(tmp_path, {"model": {"beit3." + k: v for k, v in sd.items()}})
    assert code == 0
    model = mdm.from_pretrained(out)
    assert model.cfg.normalize_output is normalize_output
    assert (model.norm is not None) is normalize_output
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_dim) == (D, DEPTH, HEADS, 4 * D)
    assert (cfg.img_size, cfg.vocab_size, cfg.max_text_positions) == (GRID * 16, VOCAB, TEXT_POS)
    assert (cfg.shared_attention, cfg.vl_ffn_layers, cfg.subln, cfg.layer_scale_init) == (False, 0, True, 0.0)
    assert not (out / "heads.safetensors").exists()


def test_containers_and_prefixes_give_identical_weights(tmp_path):
    sd = torchscale_state_dict(seed=1)
    prefixed = {"beit3." + k: v for k, v in sd.items()}
    heads = {"head.weight": torch.randn(7, D), "head.bias": torch.randn(7), "fc_norm.weight": torch.ones(D)}
    variants = {
        "bare": sd,
        "bare_prefixed": prefixed,
        "model_bare": {"model": sd},
        "model_prefixed": {"model": {**prefixed, **heads}, "epoch": 3},
        "module": {"module": prefixed},
    }
    weights = {}
    for name, obj in variants.items():
        code, out = run_import(tmp_path, obj, name=f"{name}.pth")
        assert code == 0, name
        weights[name] = load_file(str(out / "model.safetensors"))
    first = weights.pop("bare")
    for name, w in weights.items():
        assert w.keys() == first.keys(), name
        assert all(torch.equal(w[k], first[k]) for k in w), name
    kept = load_file(str(tmp_path / "model_prefixed.pth.mdm" / "heads.safetensors"))
    assert kept.keys() == heads.keys() and all(torch.equal(kept[k], heads[k]) for k in heads)


# ------------------------------------------------------------------------------------------ resizing


def bicubic_reference(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """unilm ``load_model_and_may_interpolate``: keep 3 rows, bicubic-resize the patch grid."""
    extra, rows = table[:3], table[3:]
    g = math.isqrt(rows.shape[0])
    grid = rows.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1)])


@pytest.mark.parametrize("img_size", [48, 80])
def test_img_size_resizes_vision_positions_bicubically(tmp_path, img_size):
    sd = torchscale_state_dict(seed=2)
    code, out = run_import(tmp_path, {"model": sd}, "--img-size", str(img_size))
    assert code == 0
    model = mdm.from_pretrained(out).eval()
    new_grid = img_size // 16
    assert model.cfg.img_size == img_size
    table = model.vision_pos_embed.weight.detach()
    expected = bicubic_reference(sd["encoder.embed_positions.A.weight"], new_grid)
    assert table.shape == (new_grid**2 + 3, D)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    assert torch.equal(model.text_pos_embed.weight.detach(), sd["encoder.embed_positions.B.weight"])
    # the same as running the original-size model on the new resolution (on-the-fly interpolation)
    code, out0 = run_import(tmp_path, {"model": sd}, name="orig.pth")
    original = mdm.from_pretrained(out0).eval()
    image = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(model(image=image), original(image=image), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "bad_key",
    ["encoder.layers.0.self_attn.rel_pos_bias.A.weight", "encoder.layers.1.ffn.C.fc1.weight", "encoder.blah"],
)
def test_unknown_backbone_key_is_named(tmp_path, capsys, bad_key):
    sd = torchscale_state_dict()
    sd[bad_key] = torch.zeros(3)
    code, _ = run_import(tmp_path, {"model": {"beit3." + k: v for k, v in sd.items()}})
    err = capsys.readouterr().err
    assert code == 1 and bad_key in err and "ckpt.pth" in err


def test_incomplete_qkv_is_named(tmp_path, capsys):
    sd = torchscale_state_dict()
    del sd["encoder.layers.1.self_attn.k_proj.B.weight"]
    code, _ = run_import(tmp_path, sd)
    err = capsys.readouterr().err
    assert code == 1 and "layer 1" in err and "text" in err


def test_missing_backbone_key_is_named(tmp_path, capsys):
    sd = torchscale_state_dict()
    del sd["encoder.layers.0.ffn.A.ffn_layernorm.bias"]
    code, _ = run_import(tmp_path, sd)
    assert code == 1 and "layers.0.ffn.vision.sub_norm.bias" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ round trip


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("normalize_output", [True, False])
def test_round_trip_torchscale_mdm_torchscale_is_exact(tmp_path, normalize_output):
    sd = torchscale_state_dict(seed=4, normalize_output=normalize_output)
    assert_same(mdm_to_torchscale(torchscale_to_mdm(sd)), sd)
    # through the file written by the command and the model loaded from it
    code, out = run_import(tmp_path, {"model": {"beit3." + k: v for k, v in sd.items()}})
    assert code == 0
    assert_same(mdm_to_torchscale(mdm.from_pretrained(out).state_dict()), sd)


@pytest.mark.parity
def test_round_trip_of_a_real_torchscale_model():
    pytest.importorskip("torchscale")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3

    cfg = EncoderConfig(
        img_size=32, patch_size=16, vocab_size=VOCAB, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, encoder_embed_dim=D, encoder_attention_heads=HEADS,
        encoder_ffn_embed_dim=4 * D, encoder_layers=DEPTH,
    )  # fmt: skip
    sd = BEiT3(cfg).state_dict()
    assert sorted(sd) == sorted(torchscale_state_dict(normalize_output=True))
    assert_same(mdm_to_torchscale(torchscale_to_mdm(sd)), sd)
