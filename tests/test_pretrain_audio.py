"""``mdm pretrain`` with image, text, pair, audio and audio-text streams in one run: every objective trains,
a killed run resumes exactly, the backbone is exported with its audio expert."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mdm.models import from_pretrained
from mdm.train.metrics import read_metrics
from mdm.train.pretrain import main
from tests.pretrain_fixtures import add_audio, audio_overrides, build_world

CONFIG = "configs/pretrain/test_tiny_audio.yaml"
LOSSES = ("loss", "mim_loss", "mlm_loss", "mvlm_image_loss", "amae_loss", "beats_loss", "audio_itc_loss")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return add_audio(build_world(tmp_path_factory.mktemp("world")))


def _run(args: list[str]) -> None:
    assert main(["--config", CONFIG, *args]) == 0


def test_all_streams_in_one_run_resume_exactly(world, tmp_path):
    common = ["logging.every=1", "model.drop_path_rate=0.1", "train.ckpt_every=3"]
    _run([*audio_overrides(world, tmp_path / "a", 6), *common])
    _run([*audio_overrides(world, tmp_path / "b", 6), *common, "train.stop_after=4"])
    assert not (tmp_path / "b" / "model").exists()
    _run([*audio_overrides(world, tmp_path / "b", 6), *common])
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in LOSSES:
        assert [r[key] for r in a] == [r[key] for r in b], key
    last = a[-1]
    assert 0 < last["beats_count"] and 0 < last["amae_count"] and last["tokens_per_s"] > 0
    model = from_pretrained(tmp_path / "a" / "model")
    assert model.cfg.modalities == ["vision", "text", "audio"]
    heads = load_file(str(tmp_path / "a" / "model" / "heads.safetensors"))
    assert any(k.startswith("heads.audio_itc.") for k in heads) and any(
        k.startswith("heads.mim.") for k in heads
    )


def test_audio_tokenizer_must_match(world, tmp_path, capsys):
    with pytest.raises(Exception, match="audio_codebook_size"):
        _run([*audio_overrides(world, tmp_path, 2), "objectives.audio_codebook_size=32"])
