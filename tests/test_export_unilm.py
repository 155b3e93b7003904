"""unilm/beit3 checkpoints: import → mdm → export is exact for every official task variant.

The synthetic checkpoints are built from the key list and shapes of torchscale's ``BEiT3`` and unilm's
task wrappers (``beit3/modeling_finetune.py``; reference notes §1.3–1.4), not from mdm's own key map;
one test checks that list against torchscale itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from mdm.cli import main as mdm_main
from mdm.config import to_dict
from mdm.export.unilm import (
    infer_config,
    task_state_dict_to_unilm,
    unilm_to_mdm,
    unilm_to_task_state_dict,
    unilm_variant,
)
from mdm.models import from_pretrained

D, DEPTH, FFN, GRID, VOCAB, HEADS = 128, 2, 512, 2, 100, 4  # img 32 px, patch 16 (tiny width: 4 heads)


def unilm_backbone(normalize_output: bool, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A torchscale BEiT3 state dict with ``beit3.`` prefix, random values, correct shapes."""

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "text_embed.weight": r(VOCAB, D),
        "vision_embed.mask_token": r(1, 1, D),
        "vision_embed.cls_token": r(1, 1, D),
        "vision_embed.proj.weight": r(D, 3, 16, 16),
        "vision_embed.proj.bias": r(D),
        "encoder.embed_positions.A.weight": r(GRID * GRID + 3, D),
        "encoder.embed_positions.B.weight": r(1024, D),
    }
    for i in range(DEPTH):
        for X in "AB":
            pre = f"encoder.layers.{i}."
            for proj in ("k", "v", "q", "out"):
                sd[f"{pre}self_attn.{proj}_proj.{X}.weight"] = r(D, D)
                sd[f"{pre}self_attn.{proj}_proj.{X}.bias"] = r(D)
            for ln, width in (
                ("self_attn.inner_attn_ln", D),
                ("self_attn_layer_norm", D),
                ("final_layer_norm", D),
            ):
                sd[f"{pre}{ln}.{X}.weight"], sd[f"{pre}{ln}.{X}.bias"] = r(width), r(width)
            sd[f"{pre}ffn.{X}.fc1.weight"], sd[f"{pre}ffn.{X}.fc1.bias"] = r(FFN, D), r(FFN)
            sd[f"{pre}ffn.{X}.ffn_layernorm.weight"], sd[f"{pre}ffn.{X}.ffn_layernorm.bias"] = r(FFN), r(FFN)
            sd[f"{pre}ffn.{X}.fc2.weight"], sd[f"{pre}ffn.{X}.fc2.bias"] = r(D, FFN), r(D)
    if normalize_output:
        for X in "AB":
            sd[f"encoder.layer_norm.{X}.weight"], sd[f"encoder.layer_norm.{X}.bias"] = r(D), r(D)
    return {"beit3." + k: v for k, v in sd.items()}


def unilm_heads(variant: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Head tensors of unilm's wrapper for ``variant`` (names and shapes of modeling_finetune.py)."""

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if variant in ("itc", "retrieval"):
        return {"language_head.weight": r(D, D), "vision_head.weight": r(D, D), "logit_scale": r(())}
    if variant == "vqav2":
        return {
            "pooler.norm.weight": r(D), "pooler.norm.bias": r(D),
            "pooler.dense.weight": r(D, D), "pooler.dense.bias": r(D),
            "head.0.weight": r(2 * D, D), "head.0.bias": r(2 * D),
            "head.1.weight": r(2 * D), "head.1.bias": r(2 * D),
            "head.3.weight": r(3129, 2 * D), "head.3.bias": r(3129),
        }  # fmt: skip
    if variant == "nlvr2":
        return {
            "head.norm1.weight": r(4 * D), "head.norm1.bias": r(4 * D),
            "head.dense1.weight": r(2 * D, 4 * D), "head.dense1.bias": r(2 * D),
            "head.norm2.weight": r(2 * D), "head.norm2.bias": r(2 * D),
            "head.dense2.weight": r(2, 2 * D), "head.dense2.bias": r(2),
        }  # fmt: skip
    if variant == "imageclassification":
        return {"fc_norm.weight": r(D), "fc_norm.bias": r(D), "head.weight": r(1000, D), "head.bias": r(1000)}
    if variant == "captioning":
        return {"mlm_head.weight": r(VOCAB, D), "mlm_head.bias": r(VOCAB)}
    assert variant == "pretrained"
    return {}


# unilm builds VQA and ImageNet models with normalize_output=False (no beit3.encoder.layer_norm.*).
VARIANTS = {
    "pretrained": True, "itc": True, "vqav2": False, "nlvr2": True,
    "retrieval": True, "imageclassification": False, "captioning": True,
}  # fmt: skip


def unilm_checkpoint(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {**unilm_backbone(VARIANTS[variant], g), **unilm_heads(variant, g)}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), f"only in one: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_unilm_mdm_unilm_is_exact(tmp_path, variant, capsys):
    sd = unilm_checkpoint(variant)
    src = tmp_path / "in.pth"
    torch.save({"model": sd}, src)
    assert mdm_main(["import", "unilm", str(src), str(tmp_path / "mdm")]) == 0
    model = from_pretrained(tmp_path / "mdm")  # the imported backbone loads strictly
    assert model.cfg.normalize_output == VARIANTS[variant]
    out = tmp_path / "out"
    assert (
        mdm_main(["export", "--checkpoint", str(tmp_path / "mdm"), "--format", "unilm", "--out", str(out)])
        == 0
    )
    files = list(out.glob("*.pth"))
    assert len(files) == 1
    expected_suffix = {"pretrained": None, "itc": "retrieval"}.get(variant, variant)
    assert files[0].stem.endswith(f"_{expected_suffix}" if expected_suffix else "patch16_32"), files[0].name
    back = torch.load(files[0], map_location="cpu", weights_only=True)
    assert set(back) == {"model"}
    assert_identical(sd, back["model"])


@pytest.mark.parametrize("variant", ["vqav2", "retrieval", "nlvr2"])
def test_task_state_dict_maps_beit3_to_backbone_prefix(variant):
    sd = unilm_checkpoint(variant, seed=1)
    task = unilm_to_task_state_dict(sd)
    heads = set(unilm_heads(variant, torch.Generator()))
    assert {k for k in task if not k.startswith("backbone.")} == heads
    assert "backbone.layers.0.attn.qkv.vision.weight" in task
    assert_identical(sd, task_state_dict_to_unilm(task))
    assert unilm_variant({k: task[k] for k in heads}) == variant


def _training_checkpoint(root, sd_unilm):
    """A single-process training checkpoint of a fine-tuned task model (what mdm finetune writes)."""
    backbone, _ = unilm_to_mdm(sd_unilm)
    cfg = infer_config(backbone)
    ckpt = root / "checkpoints" / "step-00000007"
    ckpt.mkdir(parents=True)
    torch.save({"model": unilm_to_task_state_dict(sd_unilm), "optimizer": None}, ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 7, "config": {"model": to_dict(cfg)}}))
    return ckpt


def test_training_checkpoint_exports_to_unilm_and_safetensors(tmp_path):
    sd = unilm_checkpoint("vqav2", seed=2)
    ckpt = _training_checkpoint(tmp_path / "run", sd)
    pth = tmp_path / "vqa.pth"
    # a run directory resolves to its newest checkpoint
    assert (
        mdm_main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "unilm", "--out", str(pth)])
        == 0
    )
    assert_identical(sd, torch.load(pth, weights_only=True)["model"])

    assert (
        mdm_main(
            ["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "st")]
        )
        == 0
    )
    model = from_pretrained(tmp_path / "st")
    backbone, heads = unilm_to_mdm(sd)
    assert_identical(backbone, model.state_dict())
    from safetensors.torch import load_file

    assert_identical(heads, load_file(str(tmp_path / "st" / "heads.safetensors")))


def test_safetensors_export_of_model_dir_loads_and_matches(tmp_path):
    from mdm.models import create_model, save_pretrained

    torch.manual_seed(0)
    model = create_model("vlmo_tiny", depth=2).eval()
    save_pretrained(model, tmp_path / "a")
    assert (
        mdm_main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "a"),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    loaded = from_pretrained(tmp_path / "b").eval()
    image, text = torch.randn(2, 3, 64, 64), torch.randint(0, 1024, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(image=image, text=text), loaded(image=image, text=text))


def test_vlmo_layout_is_refused_with_a_reason(tmp_path, capsys):
    from mdm.models import create_model, save_pretrained

    save_pretrained(create_model("vlmo_tiny", depth=2), tmp_path / "vlmo")
    code = mdm_main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "vlmo"),
            "--format",
            "unilm",
            "--out",
            str(tmp_path / "x.pth"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "shared_attention=True" in err and "vl_ffn_layers=1" in err and "layer_scale_init" in err
    assert not (tmp_path / "x.pth").exists()


def test_missing_checkpoint_is_a_message_not_a_traceback(tmp_path, capsys):
    code = mdm_main(
        ["export", "--checkpoint", str(tmp_path / "nope"), "--format", "unilm", "--out", str(tmp_path / "o")]
    )
    assert code == 1 and "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = mdm_main(
        ["export", "--checkpoint", str(tmp_path / "empty"), "--format", "timm", "--out", str(tmp_path / "o")]
    )
    assert code == 1 and "not an mdm model directory" in capsys.readouterr().err


def test_import_resizes_position_embeddings(tmp_path):
    sd = unilm_checkpoint("pretrained", seed=3)
    torch.save({"model": sd}, tmp_path / "in.pth")
    assert (
        mdm_main(["import", "unilm", str(tmp_path / "in.pth"), str(tmp_path / "m"), "--img-size", "64"]) == 0
    )
    model = from_pretrained(tmp_path / "m")
    table, old = model.vision_pos_embed.weight.detach(), sd["beit3.encoder.embed_positions.A.weight"]
    assert model.cfg.img_size == 64 and table.shape == (16 + 3, D)
    assert torch.equal(table[:3], old[:3])  # fairseq rows and [CLS] are kept as they are
    grid = old[3:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(table[3:], ref.permute(0, 2, 3, 1).reshape(16, D))


@pytest.mark.parity
def test_synthetic_key_list_matches_torchscale():
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    for normalize in (True, False):
        cfg = EncoderConfig(
            img_size=32, patch_size=16, vocab_size=VOCAB, multiway=True, layernorm_embedding=False,
            normalize_output=normalize, no_output_layer=True, encoder_embed_dim=D,
            encoder_attention_heads=HEADS, encoder_ffn_embed_dim=FFN, encoder_layers=DEPTH,
        )  # fmt: skip
        ref = {k: tuple(v.shape) for k, v in BEiT3(cfg).state_dict().items()}
        ours = {
            k.removeprefix("beit3."): tuple(v.shape)
            for k, v in unilm_backbone(normalize, torch.Generator()).items()
        }
        assert ours == ref


def test_pretraining_checkpoint_exports_backbone_without_objective_heads(tmp_path):
    sd = unilm_checkpoint("pretrained", seed=4)
    ckpt = _training_checkpoint(tmp_path / "run", sd)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    state["model"].update(
        {"heads.mim.weight": torch.randn(8192, D), "objectives.cls_mim.blocks.0.w": torch.ones(3)}
    )
    torch.save(state, ckpt / "state.pt")
    out = tmp_path / "pt.pth"
    assert mdm_main(["export", "--checkpoint", str(ckpt), "--format", "unilm", "--out", str(out)]) == 0
    assert_identical(sd, torch.load(out, weights_only=True)["model"])


def _task_models():
    from mdm.models import create_model
    from mdm.tasks.classification import ClassificationModel
    from mdm.tasks.nlvr2 import NLVR2Model
    from mdm.tasks.retrieval import RetrievalModel
    from mdm.tasks.vqav2 import VQAModel

    def backbone(**kw):
        return create_model(
            "beit3_tiny", depth=DEPTH, img_size=32, vocab_size=VOCAB, max_text_positions=1024, **kw
        )

    return {
        "vqav2": lambda: VQAModel(backbone(normalize_output=False), 3129),
        "nlvr2": lambda: NLVR2Model(backbone()),
        "retrieval": lambda: RetrievalModel(backbone()),
        "imageclassification": lambda: ClassificationModel(backbone(normalize_output=False), 1000),
    }


@pytest.mark.parametrize("variant", ["vqav2", "nlvr2", "retrieval", "imageclassification"])
def test_mdm_task_models_have_unilm_head_names_and_load_unilm_checkpoints(variant):
    """mdm's task models (mdm.tasks) hold exactly unilm's head tensors, so a unilm checkpoint loads
    strictly into them and a fine-tuned model exports back unchanged."""
    make = _task_models()[variant]
    sd = unilm_checkpoint(variant, seed=5)
    model = make()
    model.load_state_dict(unilm_to_task_state_dict(sd), strict=True)
    assert_identical(sd, task_state_dict_to_unilm(model.state_dict()))


def test_safetensors_export_keeps_a_fine_tuned_directory_usable(tmp_path):
    """A fine-tuned model directory (mdm.tasks.io) keeps its heads and task metadata through export."""
    from mdm.tasks.io import read_task_meta

    sd = unilm_checkpoint("retrieval", seed=6)
    torch.save({"model": sd}, tmp_path / "in.pth")
    assert mdm_main(["import", "unilm", str(tmp_path / "in.pth"), str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta.update(task={"name": "retrieval"}, data={"image_size": 32}, task_state={})
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    assert (
        mdm_main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "m"),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    assert read_task_meta(tmp_path / "e")["task"] == {"name": "retrieval"}
    assert (
        mdm_main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "e"),
                "--format",
                "unilm",
                "--out",
                str(tmp_path / "r.pth"),
            ]
        )
        == 0
    )
    assert_identical(sd, torch.load(tmp_path / "r.pth", weights_only=True)["model"])
