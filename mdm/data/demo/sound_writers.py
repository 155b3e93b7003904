"""The sound world on disk in the published layouts that ``mdm data shards`` and ``mdm finetune`` read.

One root holds every layout over the same clips (the audio is written once):

- ``audio/<fold>-<clip id>-A-<target>.wav`` — 16-bit PCM WAV, ESC-50's file-name convention;
- ``meta/esc50.csv`` — ESC-50: ``filename,fold,target,category,esc10,src_file,take``, 5 folds, balanced
  over the classes in every fold;
- ``class_labels_indices.csv`` (``index,mid,display_name``), ``balanced_train_segments.csv`` (folds
  1–4) and ``eval_segments.csv`` (fold 5) — AudioSet: three ``#`` header lines, then
  ``YTID, start_seconds, end_seconds, "mid,mid"`` rows; the YTID is the file's stem (``audio/<YTID>.wav``);
- ``captions.jsonl`` — ``{"audio": "audio/<file>.wav", "text": caption}`` per clip (``--from audio-jsonl``);
- ``sounds.json`` — every clip's events, labels and caption (for checks and figures).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mdm.data.demo.sounds import CLASSES, TAGS, Clip, make_clip, render

N_FOLDS = 5
#: ESC-10-style subset flag: the first half of the classes.
ESC10 = frozenset(CLASSES[: len(CLASSES) // 2])


def tag_mid(tag: int) -> str:
    """An AudioSet-style machine id for tag ``tag`` (``/m/sw00``...)."""
    return f"/m/sw{tag:02d}"


def clip_fold(clip: Clip) -> int:
    """Fold 1..5: clips of each class are dealt round-robin over the folds."""
    return 1 + (clip.index // len(CLASSES)) % N_FOLDS


def clip_filename(clip: Clip) -> str:
    """``<fold>-<clip id>-A-<target>.wav`` (ESC-50's convention)."""
    return f"{clip_fold(clip)}-{100000 + clip.index}-A-{clip.label}.wav"


def write_wav(path: Path, wav: Any, sample_rate: int) -> None:
    """(N,) float32 → 16-bit PCM WAV."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wav, sample_rate, subtype="PCM_16", format="WAV")


def _segments(path: Path, clips: list[Clip]) -> None:
    n_labels = sum(len(c.tags) for c in clips)
    lines = [
        "# Segments csv created by mdm (sound world)",
        f"# num_ytids={len(clips)}, num_segs={len(clips)}, num_unique_labels={len(TAGS)}, num_positive_labels={n_labels}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    for c in clips:
        mids = ",".join(tag_mid(t) for t in c.tags)
        lines.append(f'{Path(clip_filename(c)).stem}, 0.000, {c.duration:.3f}, "{mids}"')
    path.write_text("\n".join(lines) + "\n")


def write_sound_world(
    root: str | Path,
    clips_per_class: int = 10,
    seed: int = 0,
    duration: float = 3.0,
    sample_rate: int = 16000,
) -> dict[str, Any]:
    """Writes ``clips_per_class × len(CLASSES)`` clips in every layout under ``root``.

    Args:
        root: output directory.
        clips_per_class: clips per class (a multiple of 5 keeps the folds balanced).
        seed: the world seed.
        duration: clip length in seconds.
        sample_rate: rate of the WAV files (e.g. 44100 as ESC-50; readers resample to 16 kHz).

    Returns:
        counts: ``{"clips", "classes", "tags", "folds"}``.
    """
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    clips = [make_clip(seed, i, duration, sample_rate) for i in range(clips_per_class * len(CLASSES))]
    for c in clips:
        write_wav(root / "audio" / clip_filename(c), render(c), sample_rate)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for c in clips:
            w.writerow(
                [
                    clip_filename(c),
                    clip_fold(c),
                    c.label,
                    c.category,
                    c.category in ESC10,
                    100000 + c.index,
                    "A",
                ]
            )
    with open(root / "class_labels_indices.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        w.writerow(["index", "mid", "display_name"])
        for i, t in enumerate(TAGS):
            w.writerow([i, tag_mid(i), t])
    _segments(root / "balanced_train_segments.csv", [c for c in clips if clip_fold(c) < N_FOLDS])
    _segments(root / "eval_segments.csv", [c for c in clips if clip_fold(c) == N_FOLDS])
    with open(root / "captions.jsonl", "w") as f:
        for c in clips:
            f.write(json.dumps({"audio": f"audio/{clip_filename(c)}", "text": c.caption}) + "\n")
    meta = [
        {
            "file": clip_filename(c),
            "fold": clip_fold(c),
            "label": c.label,
            "category": c.category,
            "tags": [TAGS[t] for t in c.tags],
            "caption": c.caption,
            "noise_db": c.noise_db,
            "events": [ev.__dict__ for ev in c.events],
        }
        for c in clips
    ]
    (root / "sounds.json").write_text(
        json.dumps({"seed": seed, "sample_rate": sample_rate, "clips": meta}, indent=1)
    )
    return {"clips": len(clips), "classes": len(CLASSES), "tags": len(TAGS), "folds": N_FOLDS}
