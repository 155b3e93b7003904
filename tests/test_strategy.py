"""Precision selection, generated DeepSpeed configs, metric sinks — the GPU-only paths tested cheaply."""

from __future__ import annotations

import json

import pytest
import torch

from mdm.distributed.deepspeed import deepspeed_config, promote_scalar_parameters
from mdm.distributed.strategy import DistributedConfig, Strategy, autocast_dtype, build_strategy
from mdm.train.metrics import LoggingConfig, MetricSink, read_metrics


def test_cpu_always_runs_fp32_and_gpu_precisions_map():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("bf16", cpu) is None and autocast_dtype("fp16", cpu) is None
    assert autocast_dtype("bf16", gpu) == torch.bfloat16
    assert autocast_dtype("fp16", gpu) == torch.float16
    assert autocast_dtype("fp32", gpu) is None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_follows_the_typed_config(stage):
    cfg = DistributedConfig(zero_stage=stage, precision="fp16", offload_optimizer=True)
    ds = deepspeed_config(cfg, micro_batch=8, grad_accum=4, world_size=16, clip_grad=3.0, cpu=False)
    assert ds["train_batch_size"] == 8 * 4 * 16
    assert ds["gradient_clipping"] == 3.0
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ("offload_optimizer" in ds["zero_optimization"]) == (stage > 0)
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    json.dumps(ds)  # serialisable
    bf = deepspeed_config(DistributedConfig(zero_stage=stage, precision="bf16"), 8, 1, 1, 0.0, cpu=False)
    assert bf["bf16"] == {"enabled": True} and "fp16" not in bf
    cpu = deepspeed_config(DistributedConfig(zero_stage=stage, precision="bf16"), 8, 1, 1, 0.0, cpu=True)
    assert "bf16" not in cpu and "fp16" not in cpu


def test_auto_strategy_and_single_process_guard(monkeypatch):
    assert type(build_strategy(DistributedConfig())) is Strategy
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="single"):
        build_strategy(DistributedConfig(strategy="single"))
    assert build_strategy(DistributedConfig()).name == "ddp"
    assert build_strategy(DistributedConfig(zero_stage=2)).name == "deepspeed"


def test_fp32_never_applies_a_nonfinite_update():
    model = torch.nn.Linear(3, 1)
    st = Strategy(DistributedConfig())
    st.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.weight.detach().clone()
    st.backward(model(torch.full((2, 3), float("inf"))).sum())
    assert not torch.isfinite(torch.tensor(st.clip_and_step(1.0)))
    assert torch.equal(model.weight, before)  # the non-finite update was dropped


def test_metric_sinks(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials → offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = MetricSink(
        tmp_path, LoggingConfig(wandb=True, tensorboard=True), enabled=True, run_config={"a": 1}
    )
    sink.log(1, {"loss": 2.0, "bad": float("nan")})
    sink.log(2, {"loss": 1.5})
    sink.truncate_after(1)
    sink.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": 2.0, "bad": None}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_scalar_parameters_are_vectors_for_deepspeed_but_scalars_in_state_dicts():
    """DeepSpeed 0.19 cannot broadcast a 0-dim parameter (``view(torch.uint8)``); the retrieval and ITC
    temperatures are 0-dim. While DeepSpeed holds the model they are (1,); state dicts keep ()."""
    from mdm.models import create_model
    from mdm.tasks.retrieval import RetrievalModel

    model = RetrievalModel(create_model("vlmo_tiny", depth=1, img_size=32))
    before = model.state_dict()["logit_scale"].clone()
    assert before.dim() == 0
    assert promote_scalar_parameters(model) == ["logit_scale"]
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale.view(torch.uint8).numel() == 4  # what DeepSpeed's broadcast does
    sd = model.state_dict()
    assert sd["logit_scale"].shape == () and torch.equal(sd["logit_scale"], before)
    sd["logit_scale"] = torch.tensor(1.5)
    model.load_state_dict(sd)  # a saved 0-dim value loads into the (1,) parameter
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 1.5
    fresh = RetrievalModel(create_model("vlmo_tiny", depth=1, img_size=32))
    fresh.load_state_dict(model.state_dict())  # and what it saves loads into an ordinary model
    assert fresh.logit_scale.item() == 1.5
    image, text = torch.rand(2, 3, 32, 32), torch.randint(3, 50, (2, 5))
    batch = {"image": image, "text": text, "text_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}
    assert torch.allclose(model(batch)["loss"], fresh(batch)["loss"])
