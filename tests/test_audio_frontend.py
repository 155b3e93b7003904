"""Audio front end: Kaldi filterbanks exactly as BEATs and AudioMAE compute them, decoding, resampling,
mono mix-down, errors that name the file, pad/crop, patch padding and the masking modes."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional

from mdm.data.audio import (
    AudioFrontendConfig,
    AudioReadError,
    audio_mask,
    collate_fbanks,
    compute_fbank,
    load_fbank,
    load_waveform,
    pad_or_crop,
    patch_padding_mask,
    read_audio,
)

ALSA = Path("/usr/share/sounds/alsa/Front_Center.wav")


def _wave(seconds: float = 1.3, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    return (0.3 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(t.shape, generator=g)).float()


def _encode(wav: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wav, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_beats_fbank_matches_the_reference_call():
    w = _wave()
    ours = compute_fbank(w, 16000, AudioFrontendConfig(style="beats"))
    # unilm beats/BEATs.py preprocess: waveform * 2**15, fbank(128 bins, 16 kHz, 25/10 ms), (x - m) / (2 s)
    ref = kaldi.fbank(
        w[None] * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10
    )
    ref = (ref - 15.41663) / (2 * 6.55582)
    assert ours.shape == ref.shape == (1 + (len(w) - 400) // 160, 128)
    assert (ours - ref).abs().max() <= 1e-5


def test_audiomae_fbank_and_padding_match_the_reference_pipeline():
    w = _wave(2.0)
    cfg = AudioFrontendConfig(style="audiomae", target_frames=256)
    ours, n = pad_or_crop(compute_fbank(w, 16000, cfg), cfg.target_frames, cfg.pad_value)
    # AudioMAE dataset.py _wav2fbank + __getitem__: DC removal, fbank, ZeroPad2d on the raw fbank, normalise
    x = w[None] - w[None].mean()
    raw = kaldi.fbank(
        x,
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    ref = torch.nn.ZeroPad2d((0, 0, 0, 256 - raw.shape[0]))(raw)
    ref = (ref - (-4.2677393)) / (4.5689974 * 2)
    assert n == raw.shape[0] == 198
    assert ours.shape == (256, 128)
    assert (ours - ref).abs().max() <= 1e-5
    # the two styles are different computations: the comparison above could fail
    beats = compute_fbank(w, 16000, AudioFrontendConfig(style="beats"))
    assert (beats - ours[:n]).abs().max() > 0.1


def test_beats_padding_value_is_what_zero_samples_give():
    cfg = AudioFrontendConfig(style="beats")
    w = torch.cat([_wave(0.5), torch.zeros(16000)])
    fb = compute_fbank(w, 16000, cfg)
    assert torch.allclose(fb[-20:], torch.full_like(fb[-20:], cfg.pad_value), atol=1e-5)


def test_resampling_path(tmp_path):
    sr = 44100
    t = np.arange(int(1.5 * sr)) / sr
    wav = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    path = tmp_path / "a.wav"
    path.write_bytes(_encode(wav, sr, subtype="FLOAT"))
    cfg = AudioFrontendConfig(target_frames=0)
    got = load_waveform(path, None, 16000)
    ref = torchaudio.functional.resample(torch.from_numpy(wav)[None], sr, 16000)
    assert got.shape == ref.shape == (1, 24000)
    assert torch.equal(got, ref)
    spec = torch.fft.rfft(got[0]).abs()
    assert abs(int(spec.argmax()) * 16000 / 24000 - 1000) < 2  # the tone stays at 1 kHz
    fb, n = load_fbank(path, None, cfg)
    assert n == 1 + (24000 - 400) // 160 and fb.shape == (160, 128)
    # compute_fbank resamples by itself when told the original rate
    direct = compute_fbank(torch.from_numpy(wav), sr, cfg)
    assert (direct - fb[:n]).abs().max() <= 1e-5


def test_mono_mixdown_and_formats(tmp_path):
    left, right = _wave(0.6, seed=1).numpy(), _wave(0.6, seed=2).numpy() * 0.5
    stereo = np.stack([left, right], 1)
    wav, sr = read_audio(_encode(stereo, 16000, subtype="FLOAT"), "s.wav")
    assert wav.shape == (2, len(left)) and sr == 16000
    mono = load_waveform(_encode(stereo, 16000, subtype="FLOAT"), "s.wav", 16000)
    assert torch.allclose(mono[0], torch.from_numpy((left + right) / 2), atol=1e-7)
    cfg = AudioFrontendConfig()  # (C, N) input is mixed down, not concatenated
    assert torch.equal(compute_fbank(wav, 16000, cfg), compute_fbank(wav.mean(0), 16000, cfg))
    flac, _ = read_audio(_encode(left, 16000, "FLAC", "PCM_16"), "a.flac")
    assert (flac[0] - torch.from_numpy(left)).abs().max() < 1e-4  # lossless up to 16-bit rounding
    mp3, sr = read_audio(_encode(left, 16000, "MP3", None), "a.mp3")
    assert sr == 16000 and abs(mp3.shape[1] - len(left)) < 2000  # lossy codec: length within a frame


def test_unreadable_and_empty_clips_name_the_file(tmp_path):
    with pytest.raises(AudioReadError, match="broken.wav: cannot decode"):
        read_audio(b"RIFF....not a wave file", "broken.wav")
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(AudioReadError, match="empty.flac: empty audio file"):
        read_audio(tmp_path / "empty.flac")
    with pytest.raises(AudioReadError, match="silent.wav: empty audio clip"):
        read_audio(_encode(np.zeros(0, np.float32), 16000), "silent.wav")
    with pytest.raises(AudioReadError, match="missing.wav: cannot read"):
        read_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioReadError, match="tiny.wav: clip of 100 samples"):
        load_fbank(_encode(np.zeros(100, np.float32), 16000), "tiny.wav", AudioFrontendConfig())


def test_pad_crop_collate_and_patch_padding():
    fb = torch.randn(40, 128)
    out, n = pad_or_crop(fb, 0, -1.0)
    assert out.shape == (48, 128) and n == 40 and (out[40:] == -1).all()
    out, n = pad_or_crop(fb, 32)
    assert n == 32 and torch.equal(out, fb[:32])
    audio, pad = collate_fbanks([torch.zeros(48, 128), torch.zeros(16, 128)], [40, 16], 0.0)
    assert audio.shape == (2, 48, 128) and pad.shape == (2, 48)
    assert pad[0].tolist() == [False] * 40 + [True] * 8 and pad[1].sum() == 32
    assert collate_fbanks([torch.zeros(32, 128)], [32], 0.0)[1] is None
    patches = patch_padding_mask(pad, 8)  # (2, 3 * 8), time-major
    assert patches.shape == (2, 24)
    assert not patches[0].any()  # the last time patch of clip 0 still holds 8 real frames
    assert patches[1].tolist() == [False] * 8 + [True] * 16


@pytest.mark.parametrize("mode", ["random", "time", "frequency", "time_frequency"])
def test_audio_mask_modes(mode):
    tp, fp = 20, 8
    masks = [audio_mask(tp, fp, 0.8, mode, random.Random(i)) for i in range(6)]
    counts = {int(m.sum()) for m in masks}
    assert len(counts) == 1  # the same number in every row of a batch
    expected = {"random": 128, "time": 16 * 8, "frequency": 20 * 6, "time_frequency": 160 - 8 * 4}[mode]
    assert counts == {expected}
    grid = masks[0].view(tp, fp)  # patch index = time * F/16 + freq
    if mode == "time":
        assert ((grid.all(1)) | (~grid.any(1))).all()
    if mode == "frequency":
        assert ((grid.all(0)) | (~grid.any(0))).all()
    if mode == "time_frequency":
        kept = ~grid
        assert kept.any(1).sum() == 8 and kept.any(0).sum() == 4  # int(20 * 0.4) columns × int(8 * 0.5) rows
    assert torch.equal(audio_mask(tp, fp, 0.8, mode, random.Random(3)), masks[3])
    assert not all(torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.skipif(not ALSA.exists(), reason="alsa-utils voice samples not installed")
def test_real_file_smoke():
    fb, n = load_fbank(ALSA, None, AudioFrontendConfig(target_frames=1024))
    info = soundfile.info(str(ALSA))
    assert fb.shape == (1024, 128) and n == 1 + (round(info.frames * 16000 / info.samplerate) - 400) // 160
    assert torch.isfinite(fb).all() and fb[:n].std() > 0.1
