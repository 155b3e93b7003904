"""The GPU path on a CPU machine: what each precision selects (autocast dtype, loss scaler, TF32, fused
AdamW) for every strategy, and ``train.compile=true`` training a tiny pretraining model to the losses of
eager mode.

The compile test uses the ``aot_eager`` backend (dynamo capture + AOTAutograd joint graphs, no kernel
generation): inductor's C++ code generation takes ~1 min on this machine for the same run, which does
not fit the suite's budget; it was checked by hand (``docs/performance.md``).
"""

from __future__ import annotations

import pytest
import torch

from mdm.distributed.strategy import (
    DistributedConfig,
    PrecisionPlan,
    Strategy,
    precision_plan,
    use_fused_adamw,
)
from mdm.models.config import make_config
from mdm.objectives import ObjectivesConfig, build_pretrain_model
from mdm.train.loop import TrainConfig, Trainer
from mdm.train.metrics import LoggingConfig, read_metrics
from mdm.train.optim import OptimConfig, build_optimizer

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("deepspeed", [False, True])
def test_cpu_plan_is_plain_fp32(precision, deepspeed):
    plan = precision_plan(DistributedConfig(precision=precision), CPU, deepspeed)
    assert plan == PrecisionPlan(autocast_dtype=None, grad_scaler=False, tf32=False, fused_adamw=True)
    offload = DistributedConfig(precision=precision, zero_stage=2, offload_optimizer=True)
    assert precision_plan(offload, CPU, deepspeed).fused_adamw == (not deepspeed)


def test_cuda_plans():
    plan = lambda p, ds=False, **kw: precision_plan(DistributedConfig(precision=p, **kw), GPU, ds)  # noqa: E731
    assert plan("bf16") == PrecisionPlan(torch.bfloat16, grad_scaler=False, tf32=True, fused_adamw=True)
    assert plan("fp16") == PrecisionPlan(torch.float16, grad_scaler=True, tf32=True, fused_adamw=True)
    assert plan("fp32") == PrecisionPlan(None, grad_scaler=False, tf32=True, fused_adamw=True)
    # DeepSpeed scales fp16 losses itself; ZeRO-Offload keeps the optimizer on the CPU: no fused kernel
    assert plan("fp16", True) == PrecisionPlan(torch.float16, grad_scaler=False, tf32=True, fused_adamw=True)
    assert not plan("bf16", True, zero_stage=2, offload_optimizer=True).fused_adamw
    assert plan("bf16", False, offload_optimizer=True).fused_adamw  # offload means nothing without DeepSpeed


def test_strategy_on_cpu_runs_fp32_with_fused_adamw_and_no_scaler():
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, OptimConfig(), num_layers=0)
    st = Strategy(DistributedConfig(precision="fp16"))
    st.setup(model, opt)
    assert st.amp_dtype is None and not st.scaler.is_enabled()
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    assert not torch.backends.cuda.matmul.allow_tf32 or torch.cuda.is_available()


def test_use_fused_adamw_sets_the_step_flags_and_steps_the_same():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, OptimConfig(lr=1e-2, warmup_steps=0), num_layers=0)
    opt_b = build_optimizer(b, OptimConfig(lr=1e-2, warmup_steps=0), num_layers=0)
    assert use_fused_adamw(opt_b) and all(g["fused"] and not g["foreach"] for g in opt_b.param_groups)
    assert not use_fused_adamw(torch.optim.SGD(a.parameters(), lr=0.1))
    x = torch.randn(16, 8)
    for model, opt in ((a, opt_a), (b, opt_b)):  # torch's fused AdamW also runs on CPU
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)


class Batches:
    """Pretraining batches with text lengths and padding that change from step to step."""

    def __init__(self) -> None:
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed(self.i)
        B, T, P = 3, 5 + self.i % 3, 4
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[1, 2 + self.i % 2 :] = True
        text = torch.randint(4, 100, (B, T), generator=g)
        text_mask = (torch.rand(B, T, generator=g) < 0.4) & ~pad
        text_mask[:, 1] = True
        image_mask = torch.rand(B, P, generator=g) < 0.5
        image_mask[:, 0] = True
        img = dict(image=torch.randn(B, 3, 32, 32, generator=g), image_mask=image_mask)
        img["image_tokens"] = torch.randint(0, 16, (B, P), generator=g)
        txt = dict(
            text=text, text_input=text.masked_fill(text_mask, 3), text_mask=text_mask, text_padding_mask=pad
        )
        self.i += 1
        return {"image": img, "text": txt, "pair": {**img, **txt}}


def _train(tmp_path, compile: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = make_config(
        "vlmo_tiny", depth=1, embed_dim=32, num_heads=2, ffn_dim=64, img_size=32, vocab_size=100
    )
    model = build_pretrain_model(cfg, ObjectivesConfig(codebook_size=16))
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    train = TrainConfig(
        steps=3,
        out_dir=str(tmp_path),
        resume="none",
        peak_tflops=1.0,
        compile=compile,
        compile_backend="aot_eager",
    )
    trainer = Trainer(
        model,
        build_optimizer(model, optim, cfg.depth),
        Strategy(DistributedConfig()),
        Batches(),
        train,
        optim,
        LoggingConfig(every=1, progress=False),
    )
    blocks = model.backbone.layers
    assert all((b._compiled_call_impl is not None) == compile for b in blocks)
    trainer.fit()
    return [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")]


def test_compiled_training_matches_eager(tmp_path):
    torch._dynamo.reset()
    eager = _train(tmp_path / "eager", compile=False)
    compiled = _train(tmp_path / "compiled", compile=True)
    assert len(eager) == 3 and eager[0] != eager[-1]
    assert compiled == pytest.approx(eager, rel=0, abs=1e-5)
