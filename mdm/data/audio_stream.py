"""Decoding and collation of the ``audio`` and ``audio_text`` pretraining streams.

:class:`mdm.data.streams.StreamDataset` calls :func:`decode_audio` for every raw shard sample of an
audio kind and :func:`collate_audio` for every batch; text members of ``audio_text`` samples go through
the stream's usual text path (``<key>.json`` captions or ``<key>.txt``, MLM corruption). Batch keys
(``docs/ARCHITECTURE.md``): ``audio`` (B, T, F) normalised log-mel, T a multiple of 16;
``audio_padding_mask`` (B, T) True at padded frames (only when some clip is shorter than T);
``audio_mask`` (B, P) patch mask, P = (T/16)·(F/16) time-major, the same count in every row.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from mdm.data.audio import (
    AUDIO_EXTS,
    PATCH,
    AudioFrontendConfig,
    AudioReadError,
    audio_mask,
    collate_fbanks,
    load_fbank,
)

#: Stream kinds read by this module.
AUDIO_KINDS = ("audio", "audio_text")


def decode_audio(
    raw: dict[str, bytes], frontend: AudioFrontendConfig, skip: Callable[[str, str], None]
) -> dict[str, Any] | None:
    """``{"audio": (T, F), "n_frames": int}`` of a shard sample, or None (``skip`` told why).

    Reasons: ``no_audio`` (no ``wav``/``flac``/``mp3``/``ogg`` member), ``bad_audio`` (undecodable,
    empty or shorter than one frame).
    """
    ext = next((e for e in AUDIO_EXTS if e in raw), None)
    if ext is None:
        skip("no_audio", "no audio member")
        return None
    try:
        fbank, n = load_fbank(raw[ext], f"{raw.get('__key__')}.{ext}", frontend)
    except AudioReadError as e:
        skip("bad_audio", str(e))
        return None
    return {"audio": fbank, "n_frames": n}


def collate_audio(
    samples: list[dict[str, Any]],
    frontend: AudioFrontendConfig,
    mask_ratio: float,
    mode: str,
    rng: random.Random,
    time_ratio: float = 0.6,
    freq_ratio: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The audio keys of a batch; masks are drawn from ``rng`` (none when ``mask_ratio <= 0``)."""
    audio, pad = collate_fbanks(
        [s["audio"] for s in samples], [s["n_frames"] for s in samples], frontend.pad_value
    )
    batch = {"audio": audio}
    if pad is not None:
        batch["audio_padding_mask"] = pad
    if mask_ratio > 0:
        tp, fp = audio.shape[1] // PATCH, frontend.freq_patches
        masks = [audio_mask(tp, fp, mask_ratio, mode, rng, time_ratio, freq_ratio) for _ in samples]  # type: ignore[arg-type]
        batch["audio_mask"] = torch.stack(masks)  # (B, P)
    return batch
