"""Audio shard writers: ``mdm data shards --from audio-folder | audio-jsonl | esc50``.

Samples follow the shard layout of :mod:`mdm.data.shards`, with audio members:

- ``<key>.wav`` / ``.flac`` / ``.mp3`` / ``.ogg`` — the clip file's original bytes (decoded on read);
- ``<key>.txt`` — the first caption (audio-jsonl);
- ``<key>.cls`` — the class index (audio-folder: sorted class sub-folder; esc50: ``target``);
- ``<key>.json`` — metadata: ``{"source", "captions"?, "class"?, "fold"?, "category"?, "labels"?}``.

Every clip is decoded once while writing; unreadable or empty clips are skipped and counted in
``index.json`` (``unreadable audio``), as the image writers count unreadable images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from mdm.data.audio import AUDIO_EXTS, AudioReadError, read_audio
from mdm.data.shards import WriteReport


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _audio_ok(path: Path, report: WriteReport) -> bytes | None:
    """The file's bytes when it decodes to a non-empty clip, else None (skipped and counted)."""
    try:
        data = path.read_bytes()
        read_audio(data, str(path))
        return data
    except (OSError, AudioReadError) as e:
        report.skip("unreadable audio", f"{path} ({e})")
        return None


def from_audio_folder(root: Path, report: WriteReport) -> Iterator[dict[str, bytes]]:
    """Clips of a folder; with class sub-folders each sample gets ``cls`` (sorted folder index)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: audio folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = sorted(f for f in root.rglob("*") if f.is_file() and _ext(f) in AUDIO_EXTS)
    for n, path in enumerate(files):
        data = _audio_ok(path, report)
        if data is None:
            continue
        meta: dict = {"source": str(path)}
        sample = {"__key__": f"{n:09d}", _ext(path): data}
        rel = path.relative_to(root).parts
        if len(rel) > 1 and rel[0] in classes:
            sample["cls"] = str(classes.index(rel[0])).encode()
            meta["class"] = rel[0]
        sample["json"] = json.dumps(meta).encode()
        yield sample


def from_audio_jsonl(jsonl: Path, report: WriteReport) -> Iterator[dict[str, bytes]]:
    """Clips (with captions) from ``{"audio": path, "text": str | [str]}`` lines; paths relative to the file.

    Optional keys ``labels`` (list) and ``label`` are kept in the metadata.
    """
    jsonl = Path(jsonl)
    base = jsonl.parent
    for n, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            rec = json.loads(line)
            path = base / rec["audio"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            report.skip("malformed record", f"{where} ({e!r})")
            continue
        texts = rec.get("text", [])
        texts = [str(t).strip() for t in ([texts] if isinstance(texts, str) else texts) if str(t).strip()]
        if "text" in rec and not texts:
            report.skip("empty text", where)
            continue
        data = _audio_ok(path, report)
        if data is None:
            continue
        meta = {"captions": texts, "source": str(path)}
        meta.update({k: rec[k] for k in ("labels", "label") if k in rec})
        sample = {"__key__": f"{n:09d}", _ext(path): data, "json": json.dumps(meta).encode()}
        if texts:
            sample["txt"] = texts[0].encode()
        yield sample


ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def read_esc50_meta(root: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of ``root/meta/esc50.csv``; errors name the file."""
    path = Path(root) / "meta" / "esc50.csv"
    try:
        f = open(path, newline="")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: ESC-50 metadata not found (expected meta/esc50.csv under {root})"
        ) from None
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in ESC50_COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        return [(n, row) for n, row in enumerate(reader, start=2)]


def from_esc50(root: Path, report: WriteReport) -> Iterator[dict[str, bytes]]:
    """ESC-50 (``meta/esc50.csv`` + ``audio/``): ``cls`` = target; fold, category, esc10 in the metadata."""
    root = Path(root)
    for n, row in read_esc50_meta(root):
        where = f"{root / 'meta' / 'esc50.csv'}:{n}"
        try:
            fold, target, name = int(row["fold"]), int(row["target"]), row["filename"]
        except (TypeError, ValueError) as e:
            report.skip("malformed record", f"{where} ({e})")
            continue
        data = _audio_ok(root / "audio" / name, report)
        if data is None:
            continue
        meta = {
            "source": str(root / "audio" / name),
            "fold": fold,
            "target": target,
            "category": row["category"],
            "esc10": str(row.get("esc10", "")).lower() == "true",
        }
        yield {
            "__key__": Path(name).stem,
            _ext(Path(name)): data,
            "cls": str(target).encode(),
            "json": json.dumps(meta).encode(),
        }
