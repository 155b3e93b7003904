"""Readers of the audio-classification datasets, as published, and the clip dataset with SpecAugment.

**ESC-50** (Piczak 2015): ``root/meta/esc50.csv`` (``filename, fold, target, category, esc10, src_file,
take``) and ``root/audio/<filename>``; single-label, five folds. **AudioSet** (Gemmeke et al. 2017):
segment CSVs ``root/<split>.csv`` (``balanced_train_segments``, ``unbalanced_train_segments``,
``eval_segments``): ``#`` header lines, then ``YTID, start_seconds, end_seconds, "mid,mid,..."``;
``root/class_labels_indices.csv`` (``index,mid,display_name``); clips ``root/audio/<YTID>.<ext>`` (or
``Y<YTID>.wav``, as common downloaders name them); multi-label.

Every record is checked up front (file present, header decodable by libsndfile, at least one sample);
malformed and missing ones are counted and skipped (or raise with ``data.on_error=error``), naming the
file and line.

SpecAugment (Park et al. 2019) as AudioMAE's ``dataset.py``: one frequency mask of width uniform in
[0, freqm) and one time mask of width uniform in [0, timem) (torchaudio's ``FrequencyMasking`` /
``TimeMasking`` sampling), filled with the value a raw filterbank of 0 normalises to (AudioMAE masks the
raw filterbank with zeros before normalising).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mdm.data.audio import AUDIO_EXTS, AudioReadError, load_fbank
from mdm.tasks.common import Problems, RecordError
from mdm.tasks.config import AudioDataConfig


@dataclass(frozen=True)
class ClipRecord:
    """One clip: ``key`` (file stem or YTID), ``path``, ``target`` (class index or tuple of indices), fold."""

    key: str
    path: str
    target: int | tuple[int, ...]
    fold: int = 0


def detect_layout(root: Path, audio: AudioDataConfig) -> str:
    """``esc50`` or ``audioset`` (``audio.layout``, or ``auto``: esc50 when ``meta/esc50.csv`` exists)."""
    if audio.layout != "auto":
        return audio.layout
    return "esc50" if (Path(root) / "meta" / "esc50.csv").is_file() else "audioset"


def _check_clip(path: Path, problems: Problems, where: str) -> bool:
    """The clip exists and its header decodes with at least one frame."""
    if not path.is_file():
        problems.add("missing_audio", f"{where}: {path} not found")
        return False
    try:
        import soundfile

        info = soundfile.info(str(path))
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad headers
        problems.add("bad_audio", f"{where}: {path}: cannot decode ({e})")
        return False
    if info.frames == 0:
        problems.add("empty_audio", f"{where}: {path}: 0 samples")
        return False
    return True


# ---------------------------------------------------------------------------------------------- ESC-50
def read_esc50(
    root: Path, audio_dir: str, problems: Problems, folds: set[int] | None = None
) -> tuple[list[ClipRecord], list[str]]:
    """The ESC-50 records of ``folds`` (None: all; clips of other folds are not checked) and the class
    names (index = target, from every row)."""
    from mdm.data.audio_shards import read_esc50_meta

    root = Path(root)
    csv_path = root / "meta" / "esc50.csv"
    records, names = [], {}
    for n, row in read_esc50_meta(root):
        where = f"{csv_path}:{n}"
        try:
            fold, target, name = int(row["fold"]), int(row["target"]), row["filename"].strip()
        except (TypeError, ValueError, AttributeError) as e:
            problems.add("malformed_record", f"{where}: {e}")
            continue
        if not name or target < 0:
            problems.add("malformed_record", f"{where}: empty filename or negative target")
            continue
        names.setdefault(target, row.get("category") or str(target))
        if folds is not None and fold not in folds:
            continue
        path = root / audio_dir / name
        if _check_clip(path, problems, where):
            records.append(ClipRecord(Path(name).stem, str(path), target, fold))
    if not names:
        raise ValueError(f"{csv_path}: no usable record")
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
    return records, classes


# ---------------------------------------------------------------------------------------------- AudioSet
def read_class_index(path: Path) -> tuple[list[str], list[str]]:
    """(mids, display names) of ``class_labels_indices.csv`` in index order; errors name the file."""
    try:
        f = open(path, newline="")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: AudioSet class index not found") from None
    with f:
        reader = csv.DictReader(f)
        if not {"index", "mid", "display_name"} <= set(reader.fieldnames or []):
            raise RecordError(f"{path}: expected columns index,mid,display_name, got {reader.fieldnames}")
        rows = {}
        for n, row in enumerate(reader, start=2):
            try:
                rows[int(row["index"])] = (row["mid"].strip(), row["display_name"].strip())
            except (TypeError, ValueError, AttributeError) as e:
                raise RecordError(f"{path}:{n}: bad index ({e})") from None
    if sorted(rows) != list(range(len(rows))):
        raise RecordError(f"{path}: indices are not 0..{len(rows) - 1}")
    return [rows[i][0] for i in range(len(rows))], [rows[i][1] for i in range(len(rows))]


def _find_clip(audio_dir: Path, ytid: str) -> Path:
    for stem in (ytid, f"Y{ytid}"):
        for ext in AUDIO_EXTS:
            p = audio_dir / f"{stem}.{ext}"
            if p.is_file():
                return p
    return audio_dir / f"{ytid}.wav"


def read_segments(path: Path, mids: list[str], audio_dir: Path, problems: Problems) -> list[ClipRecord]:
    """Records of an AudioSet segment CSV (labels → class indices through ``mids``)."""
    index = {m: i for i, m in enumerate(mids)}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: AudioSet segment file not found") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        row = next(csv.reader([line], skipinitialspace=True))
        if len(row) != 4:
            problems.add(
                "malformed_record", f"{where}: expected 4 fields (YTID, start, end, labels), got {len(row)}"
            )
            continue
        ytid, labels = row[0].strip(), [m.strip() for m in row[3].split(",") if m.strip()]
        unknown = [m for m in labels if m not in index]
        if unknown or not labels:
            problems.add("unknown_label", f"{where}: labels {unknown or labels} not in the class index")
            continue
        clip = _find_clip(audio_dir, ytid)
        if _check_clip(clip, problems, where):
            records.append(ClipRecord(ytid, str(clip), tuple(sorted({index[m] for m in labels}))))
    return records


# ---------------------------------------------------------------------------------------------- dataset
def spec_augment(fbank: torch.Tensor, freqm: int, timem: int, fill: float | torch.Tensor) -> torch.Tensor:
    """One frequency and one time mask on a (T, F) filterbank (global torch RNG: worker-seeded); ``fill``
    is one value or one per bin (a per-bin normalised front end)."""
    x = fbank.clone()
    fill = torch.as_tensor(fill, dtype=x.dtype).expand(x.shape[1])  # (F,)
    for dim, width in ((1, freqm), (0, timem)):
        if width <= 0:
            continue
        w = int(torch.rand(()) * width)
        start = int(torch.rand(()) * (x.shape[dim] - w))
        if dim == 1:
            x[:, start : start + w] = fill[start : start + w]
        else:
            x[start : start + w] = fill
    return x


class ClipDataset(Dataset):
    """Items: ``audio`` (T, F), ``n_frames``, ``label`` (long) or ``labels`` (C multi-hot), ``key``, ``path``.

    Args:
        records: the clips.
        num_classes: classes C.
        multilabel: targets are tuples of classes.
        audio: front end and augmentation.
        train: apply SpecAugment (and let the collate function mix up).
    """

    def __init__(
        self,
        records: list[ClipRecord],
        num_classes: int,
        multilabel: bool,
        audio: AudioDataConfig,
        train: bool,
    ) -> None:
        self.items, self.num_classes, self.multilabel = records, num_classes, multilabel
        self.audio, self.train = audio, train
        fe = audio.frontend
        scale = (fe.target_frames or 1024) / 1024
        self.timem = int(round(audio.timem * scale))
        self.fill = fe.normalise(torch.zeros(fe.num_mel_bins))  # (F,): raw 0, normalised

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.items[i]
        try:
            fbank, n = load_fbank(rec.path, rec.path, self.audio.frontend)
        except AudioReadError as e:  # checked up front; a file that changed since is a hard error
            raise RecordError(str(e)) from None
        if self.train:
            fbank = spec_augment(fbank, self.audio.freqm, self.timem, self.fill)
        item: dict[str, Any] = {"audio": fbank, "n_frames": n, "key": rec.key, "path": rec.path}
        if self.multilabel:
            target = torch.zeros(self.num_classes)
            target[list(rec.target)] = 1.0  # type: ignore[arg-type]
            item["labels"] = target
        else:
            item["label"] = int(rec.target)  # type: ignore[arg-type]
        if self.train and self.audio.mixup > 0:
            item["mixup"] = True
        return item
