"""The training loop on a toy model: exact resume, non-finite steps, checkpoint rotation, schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mdm.distributed import DistributedConfig, build_strategy
from mdm.train.checkpoint import latest_checkpoint, list_checkpoints
from mdm.train.loop import TrainConfig, Trainer, TrainingAborted
from mdm.train.metrics import LoggingConfig, read_metrics
from mdm.train.optim import OptimConfig, build_optimizer, layer_id, lr_at, param_groups


class ToyStream:
    """A resumable infinite stream: batch i is a pure function of (seed, i)."""

    def __init__(self, seed: int = 0, nan_at: set[int] | None = None) -> None:
        self.seed, self.i, self.nan_at = seed, 0, nan_at or set()

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
        x = torch.randn(8, 6, generator=g)
        y = x @ torch.arange(6.0).unsqueeze(1) + 0.1 * torch.randn(8, 1, generator=g)
        if self.i in self.nan_at:
            y = y * float("nan")
        self.i += 1
        return {"x": x, "y": y}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, batch):
        err = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        return {"loss": err, "mse_loss": err}


def _run(tmp_path, steps, stop_after=0, nan_at=None, max_bad=5, resume="auto", accum=1, freeze=0):
    torch.manual_seed(123)  # model init
    model = ToyModel()
    optim = OptimConfig(
        lr=1e-2,
        warmup_steps=2,
        weight_decay=0.01,
        clip_grad=1.0,
        head_prefixes=["net.3."],
        freeze_backbone_steps=freeze,
    )
    opt = build_optimizer(model, optim, num_layers=0)
    train = TrainConfig(
        steps=steps,
        ckpt_every=3,
        keep_last=2,
        out_dir=str(tmp_path),
        stop_after=stop_after,
        max_bad_steps=max_bad,
        resume=resume,
        grad_accum=accum,
        peak_tflops=1.0,
    )
    trainer = Trainer(
        model,
        opt,
        build_strategy(DistributedConfig()),
        ToyStream(nan_at=nan_at),
        train,
        optim,
        LoggingConfig(every=1, progress=False),
        flops_per_batch=lambda b: 6.0 * 8 * 16 * 7,
    )
    trainer.fit()
    return read_metrics(tmp_path / "metrics.jsonl"), trainer


def test_resume_is_exact(tmp_path):
    straight, _ = _run(tmp_path / "a", steps=10)
    first, _ = _run(tmp_path / "b", steps=10, stop_after=7)  # "killed" after step 7; last ckpt at 6
    assert [r["step"] for r in first] == list(range(1, 8))
    resumed, _ = _run(tmp_path / "b", steps=10)
    assert [r["step"] for r in resumed] == list(range(1, 11))  # rows after the checkpoint rewritten
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit-identical, dropout included


def test_resume_with_grad_accumulation(tmp_path):
    straight, _ = _run(tmp_path / "a", steps=6, accum=2)
    _run(tmp_path / "b", steps=6, stop_after=4, accum=2)
    resumed, _ = _run(tmp_path / "b", steps=6, accum=2)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_freeze_backbone_steps_trains_only_the_head_then_everything_and_resumes(tmp_path):
    torch.manual_seed(123)
    init = {k: v.clone() for k, v in ToyModel().state_dict().items()}
    _, held = _run(tmp_path / "a", steps=10, stop_after=4, freeze=5)  # killed inside the freeze
    sd = held.model.state_dict()
    assert torch.equal(sd["net.0.weight"], init["net.0.weight"])  # no update, no weight decay
    assert torch.equal(sd["net.0.bias"], init["net.0.bias"])
    assert not torch.equal(sd["net.3.weight"], init["net.3.weight"])  # the head moved
    resumed, done = _run(tmp_path / "a", steps=10, freeze=5)
    straight, _ = _run(tmp_path / "b", steps=10, freeze=5)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert not torch.equal(done.model.state_dict()["net.0.weight"], init["net.0.weight"])  # thawed
    plain, _ = _run(tmp_path / "c", steps=10)
    assert [r["loss"] for r in plain] != [r["loss"] for r in straight]


def test_group_lr_holds_the_backbone_groups():
    from mdm.distributed.strategy import group_lr

    groups = param_groups(ToyModel(), OptimConfig(head_prefixes=["net.3."], freeze_backbone_steps=3), 0)
    hold = {n: g["hold_steps"] for g in groups for n in g["names"]}
    assert hold == {"net.0.weight": 3, "net.0.bias": 3, "net.3.weight": 0, "net.3.bias": 0}
    body = next(g for g in groups if g["hold_steps"])
    assert group_lr(body, 1e-3, 2) == 0.0 and group_lr(body, 1e-3, 3) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="head_prefixes"):
        param_groups(ToyModel(), OptimConfig(head_prefixes=["nohead."], freeze_backbone_steps=3), 0)


def test_checkpoints_rotate_and_tmp_is_ignored(tmp_path):
    _, trainer = _run(tmp_path, steps=10)
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [9, 10]  # keep_last=2 of 3, 6, 9, 10
    meta = json.loads((latest_checkpoint(tmp_path / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == 10
    # a half-written checkpoint (no meta.json, temporary name) is never picked for resume
    (tmp_path / "checkpoints" / ".step-00000011.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-00000012").mkdir()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000010"


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    rows, trainer = _run(tmp_path, steps=6, nan_at={2})
    assert trainer.bad_total == 1
    assert rows[-1]["skipped_steps"] == 1
    assert all(p.isfinite().all() for p in trainer.strategy.module.parameters())


def test_too_many_bad_steps_abort_with_advice(tmp_path):
    with pytest.raises(TrainingAborted, match="optim.lr"):
        _run(tmp_path, steps=10, nan_at={1, 2, 3}, max_bad=3)


def test_metrics_rows_have_required_fields(tmp_path):
    rows, _ = _run(tmp_path, steps=3)
    for r in rows:
        for key in ("step", "loss", "mse_loss", "lr", "samples_per_s", "grad_norm", "mfu"):
            assert key in r, key
        assert r["samples_per_s"] > 0


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert lr_at(0, cfg, 20) == pytest.approx(0.25)
    assert lr_at(3, cfg, 20) == pytest.approx(1.0)
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)


def test_layer_decay_and_no_decay_groups():
    from mdm.models import create_model

    model = create_model("beit3_tiny", depth=3)
    cfg = OptimConfig(layer_decay=0.5, weight_decay=0.05)
    groups = param_groups(model, cfg, num_layers=3)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["text_embed.weight"]["lr_scale"] == pytest.approx(0.5**4)
    assert by_name["layers.0.attn.qkv.vision.weight"]["lr_scale"] == pytest.approx(0.5**3)
    assert by_name["layers.2.ffn.text.fc1.weight"]["lr_scale"] == pytest.approx(0.5)
    assert by_name["norm.vision.weight"]["lr_scale"] == pytest.approx(1.0)
    assert by_name["layers.0.attn.qkv.vision.bias"]["weight_decay"] == 0.0
    assert by_name["vision_pos_embed.weight"]["weight_decay"] == 0.0  # no_weight_decay()
    assert by_name["layers.0.attn.qkv.vision.weight"]["weight_decay"] == 0.05
    assert layer_id("backbone.layers.7.attn.qkv.weight", 12) == 8
    assert layer_id("decoder.layers.0.fc.weight", 12) == 13  # heads' own "layers" are not backbone layers


def test_layer_decay_puts_the_audio_stem_first():
    """The audio patch embedding, its [CLS]/[MASK] and positions are the stem (layer 0), not a head."""
    from mdm.models import create_model

    model = create_model("audiomae_tiny", depth=2, audio_pos_trainable=True)
    groups = param_groups(model, OptimConfig(layer_decay=0.5), num_layers=2)
    by_name = {n: g["lr_scale"] for g in groups for n in g["names"]}
    for name in (
        "audio_embed.proj.weight",
        "audio_embed.proj.bias",
        "audio_embed.cls_token",
        "audio_pos_embed",
    ):
        assert by_name[name] == pytest.approx(0.5**3), name
    assert layer_id("backbone.audio_embed.proj.weight", 12) == 0


def test_stagewise_freezing():
    from mdm.models import create_model
    from mdm.train.optim import apply_trainable

    model = create_model("vlmo_tiny", depth=2)
    # VLMo language stage: only text embeddings, text FFN experts and the text-side norm train
    cfg = OptimConfig(trainable=[r"^text_", r"\.ffn\.text\.", r"^norm\.text"])
    frozen = apply_trainable(model, cfg)
    assert "layers.0.attn.qkv.weight" in frozen and "layers.0.ffn.vision.fc1.weight" in frozen
    names = {n for g in param_groups(model, cfg, 2) for n in g["names"]}
    assert names and all(n.startswith(("text_", "norm.text")) or ".ffn.text." in n for n in names)
