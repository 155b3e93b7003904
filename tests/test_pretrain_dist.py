"""2-process pretraining on CPU (gloo): DDP exact resume, DeepSpeed ZeRO-2/3 run → checkpoint → consolidate."""

from __future__ import annotations

import pytest
import torch

from mdm.models.io import from_pretrained
from mdm.train.checkpoint import latest_checkpoint
from mdm.train.consolidate import consolidate
from mdm.train.metrics import read_metrics
from tests.helpers import torchrun
from tests.pretrain_fixtures import add_audio, audio_overrides, build_world, pretrain_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]
CONFIG = "configs/pretrain/test_tiny.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def _launch(world, out_dir, steps, *extra):
    out_file = out_dir / "outputs.pt"
    torchrun(
        [
            "tests/dist_pretrain_worker.py",
            str(out_file),
            CONFIG,
            *pretrain_overrides(world, out_dir, steps),
            "logging.every=1",
            *extra,
        ]
    )
    return out_file


def test_ddp_resume_matches_uninterrupted_run(world, tmp_path):
    # with ITC and ITM too: four backbone passes in one forward (joint, image alone, text alone, ITM's
    # fusion pass over hard negatives gathered from both ranks) under DDP; the negatives drawn after the
    # resume are those of the uninterrupted run (the sampler is re-seeded from the checkpointed RNG)
    extra = (
        "distributed.strategy=ddp",
        "train.ckpt_every=3",
        "model.drop_path_rate=0.1",
        "objectives.objectives=[mim,mlm,mvlm,itc,itm]",
    )
    _launch(world, tmp_path / "a", 6, *extra)
    _launch(world, tmp_path / "b", 6, *extra, "train.stop_after=4")
    _launch(world, tmp_path / "b", 6, *extra)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in (
            "loss",
            "mim_loss",
            "mlm_loss",
            "mvlm_image_loss",
            "mvlm_text_loss",
            "itc_loss",
            "itm_loss",
        ):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_consolidates_to_the_sharded_model(world, tmp_path, stage):
    out_file = _launch(
        world,
        tmp_path / "run",
        4,
        f"distributed.zero_stage={stage}",
        "train.ckpt_every=2",
        "objectives.objectives=[mim,mlm,mvlm,itc,itm]",
    )
    ref = torch.load(out_file)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and (ckpt / "deepspeed").is_dir()
    model = from_pretrained(consolidate(ckpt, tmp_path / "consolidated")).eval()
    with torch.no_grad():
        out = model(image=ref["image"], text=ref["text"])
    assert (out - ref["out"]).abs().max().item() <= 1e-5
    # the backbone written at the end of the run (gathered from the shards in-process) agrees too
    exported = from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        assert (exported(image=ref["image"], text=ref["text"]) - ref["out"]).abs().max().item() <= 1e-5
    # the pretraining heads are written whole, not as this rank's ZeRO partition
    from safetensors.torch import load_file

    heads = load_file(str(tmp_path / "run" / "model" / "heads.safetensors"))
    D = exported.cfg.embed_dim
    assert (
        heads["heads.itc.vision_head.weight"].shape == (D, D) and heads["heads.itc.logit_scale"].shape == ()
    )
    assert heads["heads.mim.proj.weight"].shape[1] == D


@pytest.fixture(scope="module")
def audio_world(world):
    return add_audio(world)


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_all_streams_under_ddp_and_zero3(audio_world, tmp_path, strategy):
    """Image, text, pair, audio and audio-text streams in one 2-rank run (amae, beats, audio_itc beside
    MIM/MLM/MVLM); under ZeRO-3 the consolidated checkpoint reproduces the audio expert's output."""
    extra = ["distributed.strategy=ddp"] if strategy == "ddp" else ["distributed.zero_stage=3"]
    out_file = tmp_path / "outputs.pt"
    torchrun(
        [
            "tests/dist_pretrain_worker.py",
            str(out_file),
            "configs/pretrain/test_tiny_audio.yaml",
            *audio_overrides(audio_world, tmp_path / "run", 3),
            "logging.every=1",
            "train.ckpt_every=3",
            *extra,
        ]
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("mim_loss", "mlm_loss", "amae_loss", "beats_loss", "audio_itc_loss"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    ref = torch.load(out_file)
    model = from_pretrained(tmp_path / "run" / "model").eval()
    with torch.no_grad():
        assert (model(audio=ref["audio"], text=ref["text"]) - ref["audio_out"]).abs().max().item() <= 1e-5
    if strategy == "zero3":
        ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
        consolidated = from_pretrained(consolidate(ckpt, tmp_path / "consolidated")).eval()
        with torch.no_grad():
            got = consolidated(audio=ref["audio"], text=ref["text"])
        assert (got - ref["audio_out"]).abs().max().item() <= 1e-5
