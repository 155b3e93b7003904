"""The audio front end: clip bytes → mono 16 kHz waveform → normalised log-mel filterbank, and masks.

Both reference families compute Kaldi filterbanks with ``torchaudio.compliance.kaldi.fbank``; they
differ in the arguments, and :func:`compute_fbank` reproduces each exactly:

- ``beats`` (BEATs, Chen et al. 2022; unilm ``beats/BEATs.py`` ``preprocess``): the waveform scaled by
  2**15 (16-bit integer range), 128 mel bins, 25 ms frames every 10 ms, Kaldi's defaults otherwise
  (povey window, dither 0), normalised as ``(fbank - 15.41663) / (2 · 6.55582)``;
- ``audiomae`` (Audio-MAE, Huang et al. 2022; facebookresearch/AudioMAE ``dataset.py``): DC removal
  ``w - w.mean()`` instead of the scaling, ``htk_compat=True``, ``use_energy=False``, a Hanning window,
  dither 0, normalised with the AudioSet statistics ``(fbank + 4.2677393) / (2 · 4.5689974)``; clips are
  zero-padded at the end (on the raw filterbank) or cropped to 1024 frames (10.24 s).

The result is a (T, F) "image" of T frames × F mel bins; models cut it into 16×16 patches, flattened
time-major (patch index = time index · F/16 + frequency index), as the reference patch embeddings do.

Decoding goes through ``soundfile`` (libsndfile: wav, flac, ogg and mp3 with libsndfile ≥ 1.1), with
``torchaudio.load`` as a fallback when soundfile is missing (torchaudio ≥ 2.9 needs ``torchcodec`` for
that). Multi-channel clips are mixed down to mono; other sample rates are resampled with
``torchaudio.functional.resample``. Every function takes explicit inputs; randomness (masks) comes from
an explicit ``random.Random``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

#: Member / file extensions read as audio (``<key>.wav`` etc. in shards).
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
#: Patch side of the reference spectrogram patch embeddings (time and frequency).
PATCH = 16
#: (mean, std) of the reference normalisations.
STYLE_STATS = {"beats": (15.41663, 6.55582), "audiomae": (-4.2677393, 4.5689974)}
#: ``log`` of the floor Kaldi puts under mel energies (torch.finfo(float32).eps): what silence gives.
_LOG_EPS = math.log(torch.finfo(torch.float32).eps)

MaskMode = Literal["random", "time", "frequency", "time_frequency"]


class AudioReadError(ValueError):
    """An audio clip cannot be decoded or holds no samples; the message names the file."""


@dataclass
class AudioFrontendConfig:
    """How clips become filterbanks.

    Attributes:
        style: ``beats`` or ``audiomae`` (see the module docstring).
        sample_rate: clips are resampled to this rate (the references use 16 kHz).
        num_mel_bins: mel bins F (128 in both references).
        frame_length: frame length in ms.
        frame_shift: frame shift in ms.
        target_frames: pad (at the end) or crop every clip to this many frames (1024 = AudioMAE's
            10.24 s); 0 keeps each clip's length, padded up to a multiple of 16 frames.
        mean: normalisation mean (None: the style's reference value).
        std: normalisation std; features are ``(fbank - mean) / (2 · std)`` (None: the style's value).
        dither: Kaldi dither (0 in both references; > 0 draws from torch's global RNG).
        mel_stats: optional path of a JSON file of per-mel-bin statistics of the raw filterbank over a
            training set (``{"mean": [F floats], "std": [F floats], ...}``, written by
            :func:`write_mel_stats` / ``mdm data audio-stats``). When set, every bin is normalised with
            its own statistics, ``(fbank[:, f] - mean[f]) / (2 · std[f])`` (a global per-bin CMVN, with
            AudioMAE's ``2 · std``), and ``mean``/``std`` are not used. Off by default: the references
            normalise with two scalars.
    """

    style: Literal["beats", "audiomae"] = "beats"
    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length: float = 25.0
    frame_shift: float = 10.0
    target_frames: int = 1024
    mean: float | None = None
    std: float | None = None
    dither: float = 0.0
    mel_stats: str = ""

    def validate(self) -> None:
        """Raises ValueError on impossible values."""
        if self.style not in STYLE_STATS:
            raise ValueError(f"audio style must be one of {sorted(STYLE_STATS)}, got {self.style!r}")
        if self.num_mel_bins % PATCH:
            raise ValueError(f"num_mel_bins {self.num_mel_bins} is not a multiple of {PATCH}")
        if self.target_frames < 0 or self.target_frames % PATCH:
            raise ValueError(
                f"target_frames {self.target_frames} must be 0 or a positive multiple of {PATCH}"
            )
        if self.mel_stats:
            read_mel_stats(self.mel_stats, self)

    def stats(self) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in use: two floats, or two (F,) tensors with ``mel_stats``."""
        if self.mel_stats:
            return read_mel_stats(self.mel_stats, self)
        mean, std = STYLE_STATS[self.style]
        return (mean if self.mean is None else self.mean, std if self.std is None else self.std)

    def normalise(self, fbank: torch.Tensor) -> torch.Tensor:
        """``(fbank - mean) / (2 · std)`` (per bin, over the last dimension, with ``mel_stats``)."""
        mean, std = self.stats()
        return (fbank - mean) / (2 * std)

    @property
    def pad_value(self) -> float | torch.Tensor:
        """The normalised value of padded frames, as each reference produces them: a float, or an (F,)
        tensor (one value per bin) with ``mel_stats``.

        AudioMAE pads the raw filterbank with zeros before normalising; BEATs sees padding as silent
        (zero) samples, whose mel energies sit at Kaldi's floor ``log(eps)``.
        """
        raw = 0.0 if self.style == "audiomae" else _LOG_EPS
        if self.mel_stats:
            return self.normalise(torch.full((self.num_mel_bins,), raw))
        mean, std = self.stats()
        return (raw - mean) / (2 * std)

    @property
    def freq_patches(self) -> int:
        """Patches along frequency (F / 16)."""
        return self.num_mel_bins // PATCH


# ---------------------------------------------------------------------------------------------- decoding
def read_audio(source: bytes | str | Path, name: str | None = None) -> tuple[torch.Tensor, int]:
    """Decodes a clip.

    Args:
        source: the file's bytes, or a path.
        name: what to call the clip in errors (default: the path, or ``<bytes>``).

    Returns:
        (waveform (C, N) float32 in [-1, 1], sample rate).

    Raises:
        AudioReadError: the clip cannot be decoded or has no samples.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise AudioReadError(f"{name}: cannot read audio file ({e})") from None
    if not data:
        raise AudioReadError(f"{name}: empty audio file (0 bytes)")
    wav, sr = _decode(data, name)
    if wav.shape[-1] == 0:
        raise AudioReadError(f"{name}: empty audio clip (0 samples)")
    if not torch.isfinite(wav).all():
        raise AudioReadError(f"{name}: audio clip holds non-finite samples")
    return wav, sr


def _decode(data: bytes, name: str) -> tuple[torch.Tensor, int]:
    try:
        import soundfile
    except ImportError:  # pragma: no cover - soundfile is a dependency; torchaudio needs torchcodec here
        return _decode_torchaudio(data, name)
    try:
        array, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, C)
    except (RuntimeError, TypeError, ValueError, soundfile.LibsndfileError) as e:
        raise AudioReadError(f"{name}: cannot decode audio ({e})") from None
    return torch.from_numpy(array.T.copy()), int(sr)  # (C, N)


def _decode_torchaudio(data: bytes, name: str) -> tuple[torch.Tensor, int]:  # pragma: no cover
    import torchaudio

    try:
        wav, sr = torchaudio.load(io.BytesIO(data))
    except ImportError as e:
        raise AudioReadError(f"{name}: no audio decoder (install soundfile): {e}") from None
    except (RuntimeError, ValueError) as e:
        raise AudioReadError(f"{name}: cannot decode audio ({e})") from None
    return wav.float(), int(sr)


def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """(C, N) → (1, N), the mean of the channels."""
    return waveform.mean(0, keepdim=True) if waveform.shape[0] > 1 else waveform


def resample(waveform: torch.Tensor, sample_rate: int, target: int) -> torch.Tensor:
    """``torchaudio.functional.resample`` when the rates differ (default sinc interpolation)."""
    if sample_rate == target:
        return waveform
    import torchaudio.functional

    return torchaudio.functional.resample(waveform, sample_rate, target)


def load_waveform(source: bytes | str | Path, name: str | None, sample_rate: int) -> torch.Tensor:
    """A clip as (1, N) mono float32 at ``sample_rate``."""
    wav, sr = read_audio(source, name)
    return resample(to_mono(wav), sr, sample_rate)


# ---------------------------------------------------------------------------------------------- features
def compute_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    cfg: AudioFrontendConfig,
    name: str = "<waveform>",
    raw: bool = False,
) -> torch.Tensor:
    """The normalised log-mel filterbank of one mono clip, exactly as the ``cfg.style`` reference.

    Args:
        waveform: (N,), (1, N) or (C, N) float samples in [-1, 1] (channels are mixed down).
        sample_rate: its rate (resampled to ``cfg.sample_rate`` first when different).
        cfg: the front end.
        name: what to call the clip in errors.
        raw: return the log-mel filterbank before normalisation.

    Returns:
        (T, F) float32, T = 1 + (N - frame) // shift frames (Kaldi's ``snip_edges``), F = num_mel_bins.

    Raises:
        AudioReadError: the clip is shorter than one frame.
    """
    import torchaudio.compliance.kaldi as kaldi

    w = to_mono(waveform.reshape(-1, waveform.shape[-1])).float()  # (1, N)
    w = resample(w, sample_rate, cfg.sample_rate)
    if w.shape[-1] < int(cfg.sample_rate * cfg.frame_length / 1000):
        raise AudioReadError(
            f"{name}: clip of {w.shape[-1]} samples is shorter than one {cfg.frame_length} ms frame"
        )
    common = dict(
        num_mel_bins=cfg.num_mel_bins,
        sample_frequency=cfg.sample_rate,
        frame_length=cfg.frame_length,
        frame_shift=cfg.frame_shift,
        dither=cfg.dither,
    )
    if cfg.style == "beats":
        fbank = kaldi.fbank(w * 2**15, **common)
    else:
        fbank = kaldi.fbank(w - w.mean(), htk_compat=True, use_energy=False, window_type="hanning", **common)
    return fbank if raw else cfg.normalise(fbank)  # (T, F)


def pad_or_crop(
    fbank: torch.Tensor, target: int, pad_value: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, int]:
    """Pads (at the end) or crops (from the start) a (T, F) filterbank in time.

    Args:
        fbank: (T, F).
        target: frames wanted; 0 pads up to the next multiple of 16.
        pad_value: value of padded frames, a float or one per bin (:attr:`AudioFrontendConfig.pad_value`).

    Returns:
        ((target, F) filterbank, number of real frames in it).
    """
    T = fbank.shape[0]
    if target <= 0:
        target = max(-(-T // PATCH) * PATCH, PATCH)
    if T >= target:
        return fbank[:target], target
    pad = torch.as_tensor(pad_value, dtype=fbank.dtype).expand(target - T, fbank.shape[1])
    return torch.cat([fbank, pad]), T


def load_fbank(
    source: bytes | str | Path, name: str | None, cfg: AudioFrontendConfig
) -> tuple[torch.Tensor, int]:
    """read → mono → resample → filterbank → pad/crop: ((T, F) features, real frames)."""
    wav = load_waveform(source, name, cfg.sample_rate)
    fbank = compute_fbank(wav, cfg.sample_rate, cfg, name or "<bytes>")
    return pad_or_crop(fbank, cfg.target_frames, cfg.pad_value)


def collate_fbanks(
    fbanks: list[torch.Tensor], n_valid: list[int], pad_value: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacks (T_i, F) filterbanks, padding to the longest (a multiple of 16).

    Returns:
        (audio (B, T, F), audio_padding_mask (B, T) bool True at padded frames, or None when no clip
        has padding).
    """
    T = max(max(f.shape[0] for f in fbanks), PATCH)
    T = -(-T // PATCH) * PATCH
    rows = [pad_or_crop(f, T, pad_value)[0] for f in fbanks]
    audio = torch.stack(rows)  # (B, T, F)
    frames = torch.arange(T)
    pad = frames[None, :] >= torch.tensor(n_valid)[:, None]  # (B, T)
    return audio, (pad if bool(pad.any()) else None)


def patch_padding_mask(frame_padding: torch.Tensor, freq_patches: int, patch: int = PATCH) -> torch.Tensor:
    """(B, T) frame padding → (B, P) patch padding, P = (T / patch) · freq_patches, time-major.

    A patch is padding when all of its frames are padding.
    """
    B, T = frame_padding.shape
    time_pad = frame_padding[:, : T // patch * patch].reshape(B, T // patch, patch).all(-1)  # (B, T/16)
    return time_pad.repeat_interleave(freq_patches, dim=1)  # (B, P)


# ---------------------------------------------------------------------------------------------- per-bin statistics
#: Floor under a bin's std in :func:`mel_bin_stats` (raw log-mel units): with 128 bins at 16 kHz the lowest
#: mel filters can hold no FFT bin and sit at Kaldi's floor for every clip (std ~0); they stay ~0.
MEL_STD_FLOOR = 0.1


class MelStats:
    """Accumulates per-mel-bin mean and std of raw filterbanks, over real frames only (float64 sums)."""

    def __init__(self, num_mel_bins: int) -> None:
        self.n = 0
        self.s = torch.zeros(num_mel_bins, dtype=torch.float64)
        self.s2 = torch.zeros(num_mel_bins, dtype=torch.float64)
        self.clips = 0

    def add(self, raw: torch.Tensor) -> None:
        """One clip's (T, F) raw filterbank."""
        x = raw.double()
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.s2 += (x * x).sum(0)
        self.clips += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (F,), std (F,) floored at :data:`MEL_STD_FLOOR`), float32."""
        if self.n == 0:
            raise ValueError("per-bin statistics of no frame")
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp(min=0.0)
        return mean.float(), var.sqrt().clamp(min=MEL_STD_FLOOR).float()


def write_mel_stats(
    sources: list[tuple[str, bytes | str | Path]], cfg: AudioFrontendConfig, out: str | Path
) -> dict[str, Any]:
    """Per-mel-bin statistics of the raw filterbanks of ``sources`` ((name, bytes or path) pairs) with
    the front end ``cfg`` (its style and frame settings; its normalisation is not used), written to
    ``out`` as JSON for :attr:`AudioFrontendConfig.mel_stats`. Clips that cannot be decoded are skipped
    and counted. Returns what was written."""
    acc = MelStats(cfg.num_mel_bins)
    skipped = 0
    for name, src in sources:
        try:
            wav = load_waveform(src, name, cfg.sample_rate)
            acc.add(compute_fbank(wav, cfg.sample_rate, cfg, name, raw=True))
        except AudioReadError:
            skipped += 1
    mean, std = acc.result()
    meta = {
        "format": "mdm-mel-stats",
        "style": cfg.style,
        "num_mel_bins": cfg.num_mel_bins,
        "sample_rate": cfg.sample_rate,
        "clips": acc.clips,
        "frames": acc.n,
        "skipped": skipped,
        "std_floor": MEL_STD_FLOOR,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


@functools.lru_cache(maxsize=8)
def _read_mel_stats(path: str, mtime: float) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"audio front end mel_stats: {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"audio front end mel_stats: {path} is not JSON ({e})") from None
    if not isinstance(meta, dict) or not {"mean", "std"} <= set(meta):
        raise ValueError(f"audio front end mel_stats: {path} has no 'mean' and 'std' lists")
    mean = torch.tensor(meta["mean"], dtype=torch.float32)
    std = torch.tensor(meta["std"], dtype=torch.float32)
    if mean.ndim != 1 or mean.shape != std.shape or not bool((std > 0).all()):
        raise ValueError(
            f"audio front end mel_stats: {path}: mean and std must be lists of one positive std per bin"
        )
    return meta, mean, std


def read_mel_stats(path: str | Path, cfg: AudioFrontendConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (F,), std (F,)) of a :func:`write_mel_stats` file, checked against ``cfg`` (bins, style)."""
    path = str(path)
    try:
        mtime = Path(path).stat().st_mtime
    except FileNotFoundError:
        raise FileNotFoundError(f"audio front end mel_stats: {path} not found") from None
    meta, mean, std = _read_mel_stats(path, mtime)
    if mean.shape[0] != cfg.num_mel_bins:
        raise ValueError(
            f"audio front end mel_stats: {path} has {mean.shape[0]} bins, the front end {cfg.num_mel_bins}"
        )
    if meta.get("style", cfg.style) != cfg.style:
        raise ValueError(
            f"audio front end mel_stats: {path} was computed with style {meta['style']!r}, not {cfg.style!r}"
        )
    return mean, std


# ---------------------------------------------------------------------------------------------- masking
def audio_mask(
    time_patches: int,
    freq_patches: int,
    ratio: float,
    mode: MaskMode,
    rng: random.Random,
    time_ratio: float = 0.6,
    freq_ratio: float = 0.5,
) -> torch.Tensor:
    """A (P,) bool patch mask (True = masked) over a time × frequency patch grid, time-major.

    Args:
        time_patches / freq_patches: the grid.
        ratio: fraction masked for ``random`` (exactly ``round(ratio · P)`` patches, as MAE/AudioMAE),
            ``time`` (``round(ratio · time_patches)`` whole time columns) and ``frequency`` (whole
            frequency rows).
        mode: ``random`` | ``time`` | ``frequency`` | ``time_frequency``.
        rng: the random source.
        time_ratio / freq_ratio: ``time_frequency`` (AudioMAE's 2-D masking): ``int(Tp · (1 - time_ratio))``
            time columns and ``int(Fp · (1 - freq_ratio))`` frequency rows are kept; a patch is masked
            when its column or its row is (AudioMAE's defaults 0.6 / 0.5 mask 80 % of the patches).

    The number of masked patches depends only on the grid and the ratios, so every row of a batch
    masks the same number.
    """
    P = time_patches * freq_patches
    grid = torch.zeros(time_patches, freq_patches, dtype=torch.bool)
    if mode == "random":
        flat = torch.zeros(P, dtype=torch.bool)
        flat[rng.sample(range(P), round(ratio * P))] = True
        return flat
    if mode == "time":
        grid[rng.sample(range(time_patches), round(ratio * time_patches))] = True
    elif mode == "frequency":
        grid[:, rng.sample(range(freq_patches), round(ratio * freq_patches))] = True
    elif mode == "time_frequency":
        keep_t = set(rng.sample(range(time_patches), int(time_patches * (1 - time_ratio))))
        keep_f = set(rng.sample(range(freq_patches), int(freq_patches * (1 - freq_ratio))))
        grid[[t for t in range(time_patches) if t not in keep_t]] = True
        grid[:, [f for f in range(freq_patches) if f not in keep_f]] = True
    else:
        raise ValueError(
            f"audio masking mode must be random, time, frequency or time_frequency, got {mode!r}"
        )
    return grid.flatten()  # (P,) time-major
