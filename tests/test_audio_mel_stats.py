"""Per-mel-bin dataset normalisation (``AudioFrontendConfig.mel_stats``, ``mdm data audio-stats``) and the
audio position scale (``ModelConfig.audio_pos_scale``)."""

from __future__ import annotations

import io
import json
import math

import pytest
import soundfile
import torch

from mdm.data.audio import (
    MEL_STD_FLOOR,
    AudioFrontendConfig,
    collate_fbanks,
    compute_fbank,
    load_fbank,
    pad_or_crop,
)
from mdm.data.cli import main as data_main
from mdm.data.demo.sounds import make_clip, render
from mdm.data.shards import write_shards
from mdm.models import create_model
from mdm.tasks.audio_data import spec_augment

SR = 16000


def _wav_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, render(make_clip(3, i, duration=0.5)), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("mel_stats")
    samples = ({"__key__": f"c{i:03d}", "wav": _wav_bytes(i), "txt": b"x"} for i in range(12))
    write_shards(samples, root / "clips", "audio", max_count=5)
    out = root / "stats.json"
    assert data_main(["audio-stats", "--shards", str(root / "clips"), "--out", str(out)]) == 0
    return out


def test_audio_stats_normalise_every_bin_to_zero_mean_and_half_std(stats_file):
    meta = json.loads(stats_file.read_text())
    assert (
        meta["clips"] == 12 and meta["num_mel_bins"] == 128 and len(meta["mean"]) == len(meta["std"]) == 128
    )
    fe = AudioFrontendConfig(target_frames=0, mel_stats=str(stats_file))
    fe.validate()
    feats = torch.cat(
        [compute_fbank(torch.from_numpy(render(make_clip(3, i, duration=0.5))), SR, fe) for i in range(12)]
    )
    live = torch.tensor(meta["std"]) > MEL_STD_FLOOR
    assert int(live.sum()) > 100  # a few low mel filters hold no FFT bin at 16 kHz / 128 bins
    # (WAV files are 16-bit: the float clips differ from them by < 1 LSB, hence the tolerances)
    assert feats.mean(0)[live].abs().max() < 0.02
    assert (feats.std(0, unbiased=False)[live] - 0.5).abs().max() < 0.02
    # the scalar normalisation of the same clips is far from that: the statistics were used
    plain = torch.cat(
        [
            compute_fbank(torch.from_numpy(render(make_clip(3, i, duration=0.5))), SR, AudioFrontendConfig())
            for i in range(12)
        ]
    )
    assert (plain.std(0, unbiased=False)[live] - 0.5).abs().max() > 0.2


def test_per_bin_padding_and_spec_augment_fill(stats_file):
    fe = AudioFrontendConfig(target_frames=64, mel_stats=str(stats_file))
    pad = fe.pad_value
    assert isinstance(pad, torch.Tensor) and pad.shape == (128,)
    raw_silence = torch.full((128,), math.log(torch.finfo(torch.float32).eps))
    assert torch.allclose(pad, fe.normalise(raw_silence))
    assert pad.std() > 0.1  # one value per bin, not a constant
    fb, n = load_fbank(_wav_bytes(0), "c0", fe)  # 0.5 s = 48 frames, padded to 64
    assert fb.shape == (64, 128) and n == 48 and torch.equal(fb[48:], pad.expand(16, 128))
    audio, mask = collate_fbanks([fb[:20], fb[:48]], [20, 48], pad)
    assert audio.shape == (2, 48, 128) and torch.equal(audio[0, 20:], pad.expand(28, 128)) and mask[0, 20]
    torch.manual_seed(0)
    y = spec_augment(torch.zeros(64, 128), 48, 30, fill=pad)
    changed = y != 0
    assert changed.any()
    assert torch.equal(y[changed], pad.expand(64, 128)[changed])  # each masked bin takes its own value
    # the default front end keeps its scalar padding (the references' behaviour is unchanged)
    assert isinstance(AudioFrontendConfig().pad_value, float)
    assert torch.equal(pad_or_crop(torch.ones(3, 128), 16, -2.0)[0][3:], torch.full((13, 128), -2.0))


def test_mel_stats_are_checked_against_the_front_end(stats_file, tmp_path):
    with pytest.raises(ValueError, match="128 bins"):
        AudioFrontendConfig(num_mel_bins=64, mel_stats=str(stats_file)).validate()
    with pytest.raises(ValueError, match="style 'beats'"):
        AudioFrontendConfig(style="audiomae", mel_stats=str(stats_file)).validate()
    with pytest.raises(FileNotFoundError, match="not found"):
        AudioFrontendConfig(mel_stats=str(tmp_path / "nope.json")).validate()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0.0] * 128, "std": [0.0] * 128}))
    with pytest.raises(ValueError, match="positive"):
        AudioFrontendConfig(mel_stats=str(bad)).validate()


@pytest.mark.parametrize("arch", ["audiomae_tiny", "beats_tiny"])
def test_audio_pos_scale_scales_the_initial_table(arch):
    full = create_model(arch, audio_frames=64).audio_pos_embed.detach()
    small = create_model(arch, audio_frames=64, audio_pos_scale=0.1).audio_pos_embed.detach()
    assert full.abs().max() > 0.9
    assert torch.allclose(small, 0.1 * full)
