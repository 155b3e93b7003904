"""``mdm launch --dry-run``: parameter counts against published numbers, ZeRO arithmetic against the
ZeRO paper, the activation formula against what autograd actually saves."""

from __future__ import annotations

import json

import pytest
import torch

from mdm.cli import main as mdm_main
from mdm.launch.memory import encoder_pass, pass_activation_bytes, zero_state_bytes
from mdm.launch.plan import build_plan
from mdm.models import create_model

VQA = "configs/finetune/vqav2_base.yaml"


def _pretrain_yaml(tmp_path, arch="beit3_base", extra=""):
    path = tmp_path / "pt.yaml"
    path.write_text(
        f"model:\n  arch: {arch}\nobjectives:\n  objectives: [mim, mlm, mvlm]\n"
        f"train:\n  steps: 1000\n  grad_accum: 2\ndistributed:\n  precision: bf16\n{extra}"
    )
    return str(path)


@pytest.mark.parametrize("arch,backbone,vision", [("beit3_base", 221.0, 85.9), ("beit3_large", 672.7, 303.6)])
def test_parameter_counts_match_torchscale(tmp_path, arch, backbone, vision):
    """Reference notes §1.2: torchscale BEiT3 backbone and vision-only path, counted on the meta device."""
    plan = build_plan(_pretrain_yaml(tmp_path, arch), 1, 8, batch={"image": 1, "text": 1, "pair": 1})
    assert sum(plan.table.values()) / 1e6 == pytest.approx(backbone, abs=0.05)
    vision_path = sum(n for (_, e), n in plan.table.items() if e in ("vision", "shared"))
    assert vision_path / 1e6 == pytest.approx(vision, abs=0.05)


@pytest.mark.parametrize(
    "overrides,total",
    [
        (["task.name=vqav2"], 228.1),  # unilm beit3_base_patch16_480_vqav2
        (["task.name=nlvr2", "model.img_size=224", "model.normalize_output=true"], 225.7),
        (["task.name=retrieval", "model.img_size=384", "model.normalize_output=true"], 222.5),
        (["task.name=classification", "model.img_size=224"], 221.8),
    ],
)
def test_finetune_parameter_counts_match_unilm(overrides, total):
    """Reference notes §1.4: measured parameter counts of unilm's base task models."""
    plan = build_plan(VQA, 1, 8, overrides=overrides)
    assert plan.command == "finetune"
    assert plan.trainable / 1e6 == pytest.approx(total, abs=0.05)


def test_zero_stages_match_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2020) Figure 1: Ψ = 7.5B, N_d = 64, K = 12 → 120 / 31.4 / 16.6 / 1.88 GB."""
    got = [zero_state_bytes(7_500_000_000, 64, "bf16", s).total / 1e9 for s in range(4)]
    assert got == pytest.approx([120.0, 31.4, 16.6, 1.875], abs=0.05)
    fp32 = zero_state_bytes(1000, 4, "fp32", 0)
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4000, 4000, 8000)


def _saved_bytes(model, x, **kw) -> int:
    """Bytes of the distinct storages autograd saves during one forward, parameters and input excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(image=x, **kw)
    return sum(seen.values())


@pytest.mark.parametrize(
    "arch", ["beit3_tiny", "vlmo_tiny"]
)  # Sub-LN + multiway / layer scale + shared attention
def test_activation_formula_matches_autograd(arch):
    torch.manual_seed(0)
    model = create_model(arch, normalize_output=False)
    B, N = 8, 1 + model.cfg.num_patches
    x = torch.randn(B, 3, model.cfg.img_size, model.cfg.img_size)
    estimate = pass_activation_bytes(encoder_pass(model.cfg, "image", B, N), 4, checkpointing=False)
    assert _saved_bytes(model, x) == pytest.approx(estimate, rel=0.1)
    # with checkpointing autograd keeps at most each layer's input (non-reentrant checkpoint may hold them
    # outside the saved-tensor hooks); the estimate adds one rebuilt layer for the backward
    model.set_grad_checkpointing(True)
    model.train()
    inputs = model.cfg.depth * B * N * model.cfg.embed_dim * 4
    assert _saved_bytes(model, x) <= 1.1 * inputs
    ckpt = pass_activation_bytes(encoder_pass(model.cfg, "image", B, N), 4, checkpointing=True)
    assert ckpt == pytest.approx(inputs + estimate / model.cfg.depth, rel=1e-6)


def test_dry_run_cli_reports_batch_steps_and_memory(tmp_path, capsys):
    cfg = _pretrain_yaml(tmp_path, "beit3_large")
    argv = ["launch", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--config", cfg]
    assert mdm_main([*argv, "--batch", "image=16,text=32,pair=16"]) == 0
    text = capsys.readouterr().out
    for needle in ("ZeRO-0", "ZeRO-3", "attention", "heads.mlm", "global image 512, text 1024, pair 512"):
        assert needle in text, needle
    assert mdm_main([*argv, "--batch", "image=16,text=32,pair=16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["world_size"] == 16 and d["steps"] == 1000
    totals = [z["total"] for z in d["zero"]]
    assert totals == sorted(totals, reverse=True) and totals[3] == pytest.approx(d["trainable"] * 16 / 16)
    assert d["activations"]["checkpointing"] < d["activations"]["no_checkpointing"] / 3


def test_dry_run_without_batch_sizes_says_what_to_pass(tmp_path, capsys):
    assert mdm_main(["launch", "--dry-run", "--config", _pretrain_yaml(tmp_path, "vlmo_tiny")]) == 2
    assert "--batch image=N" in capsys.readouterr().err


def test_without_dry_run_prints_launch_commands(capsys):
    assert (
        mdm_main(["launch", "--nodes", "4", "--gpus-per-node", "8", "--config", VQA, "train.steps=10"]) == 0
    )
    out = capsys.readouterr().out
    assert "NNODES=4 NODE_RANK=<r>" in out and "launch/torchrun.sh finetune --config" in out
    assert "sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sbatch" in out and "train.steps=10" in out


def test_shipped_pretrain_config_gives_batches_and_lengths_from_its_data_section():
    from mdm.config.core import read_yaml

    path = "configs/pretrain/beit3_base_mdm.yaml"
    data = read_yaml(path)["data"]
    plan = build_plan(path, 8, 8)
    assert plan.micro_batch == {k: data[k]["batch_size"] for k in ("image", "text", "pair")}
    tokens = {p.name: (p.batch, p.tokens) for p in plan.passes}
    P = plan.model.num_patches
    assert tokens["text: mlm"] == (data["text"]["batch_size"], data["text"]["max_text_len"])
    assert tokens["pair: mvlm"] == (data["pair"]["batch_size"], 1 + P + data["pair"]["max_text_len"])
    assert tokens["image: mim"] == (data["image"]["batch_size"], 1 + P)
