"""WebDataset tar shards: writing them from common sources, and reading them sample by sample.

A shard is a plain tar whose members ``<key>.<ext>`` are grouped by key (WebDataset's convention):

- ``<key>.jpg`` / ``.png`` … — the image file's original bytes (decoded and converted to RGB on read);
- ``<key>.txt`` — a text (text stream) or the first caption (pair stream);
- ``<key>.json`` — metadata: ``{"captions": [...], "source": ...}`` (pairs draw one caption per read);
- ``<key>.cls`` — a class index (image folders with class sub-folders);
- ``<key>.tok.npy`` — precomputed visual codes (``mdm tokenizer encode``).

Every shard set gets ``index.json`` (kind, shards, sample counts, what was skipped and why). Reading
(from local paths or any URL webdataset opens, from a sample offset) is :mod:`mdm.data.shard_reader`;
``iter_tar_samples`` and the shard errors are re-exported here.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mdm.data.shard_reader import ShardReadError, TruncatedShard, UnreadableShard, iter_tar_samples
from mdm.tokenizers.data import IMAGE_EXTS, ImageReadError, decode_image

__all__ = [
    "ShardReadError",
    "TruncatedShard",
    "UnreadableShard",
    "WriteReport",
    "from_coco_captions",
    "from_image_folder",
    "from_jsonl",
    "from_text_files",
    "iter_tar_samples",
    "write_shards",
]

log = logging.getLogger(__name__)


@dataclass
class WriteReport:
    """What a shard writer did."""

    kind: str
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped %s: %s", what, reason)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[dict[str, bytes]],
    out_dir: str | Path,
    kind: str,
    max_count: int = 10_000,
    prefix: str = "shard",
    report: WriteReport | None = None,
) -> WriteReport:
    """Writes ``samples`` (``{"__key__": str, ext: bytes}``) into ``out_dir/<prefix>-NNNNNN.tar``.

    Each shard is written under a temporary name and renamed when complete.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report or WriteReport(kind)
    tar, tmp, count = None, None, 0

    def close() -> None:
        nonlocal tar, count
        if tar is not None:
            tar.close()
            final = tmp.with_name(tmp.name.removesuffix(".tmp"))
            tmp.rename(final)
            report.shards.append(final.name)
            report.counts.append(count)
            tar, count = None, 0

    for sample in tqdm(samples, desc=f"shards ({kind})", unit="sample", dynamic_ncols=True):
        if tar is None:
            tmp = out / f"{prefix}-{len(report.shards):06d}.tar.tmp"
            tar = tarfile.open(tmp, "w")
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext != "__key__":
                _add_member(tar, f"{key}.{ext}", data)
        count += 1
        if count >= max_count:
            close()
    close()
    index = {
        "kind": kind,
        "shards": report.shards,
        "counts": report.counts,
        "total": sum(report.counts),
        "skipped": report.skipped,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return report


def _image_ok(path: Path, report: WriteReport) -> bytes | None:
    try:
        data = path.read_bytes()
        decode_image(data, str(path))
        return data
    except (OSError, ImageReadError) as e:
        report.skip("unreadable image", f"{path} ({e})")
        return None


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def from_coco_captions(
    captions_json: Path, image_dir: Path, report: WriteReport
) -> Iterator[dict[str, bytes]]:
    """Pairs from a COCO captions file (``images`` [{id, file_name}], ``annotations`` [{image_id, caption}])."""
    data = json.loads(Path(captions_json).read_text())
    caps: dict[int, list[str]] = {}
    for a in data.get("annotations", []):
        text = str(a.get("caption", "")).strip()
        if text:
            caps.setdefault(a["image_id"], []).append(text)
        else:
            report.skip("empty caption", f"{captions_json}: annotation {a.get('id')}")
    for img in sorted(data.get("images", []), key=lambda r: r["id"]):
        texts = caps.get(img["id"])
        if not texts:
            report.skip("image without captions", f"{captions_json}: image {img['id']}")
            continue
        path = Path(image_dir) / img["file_name"]
        data_bytes = _image_ok(path, report)
        if data_bytes is None:
            continue
        meta = {"captions": texts, "source": str(path), "image_id": img["id"]}
        yield {
            "__key__": f"{img['id']:012d}",
            _ext(path): data_bytes,
            "txt": texts[0].encode(),
            "json": json.dumps(meta).encode(),
        }


def from_jsonl(jsonl: Path, report: WriteReport) -> Iterator[dict[str, bytes]]:
    """Pairs (or images) from ``{"image": path, "text": str | [str]}`` lines; paths relative to the file."""
    base = Path(jsonl).parent
    for n, line in enumerate(Path(jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{n}"
        try:
            rec = json.loads(line)
            path = base / rec["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            report.skip("malformed record", f"{where} ({e})")
            continue
        texts = rec.get("text", [])
        texts = [t.strip() for t in ([texts] if isinstance(texts, str) else texts) if str(t).strip()]
        if "text" in rec and not texts:
            report.skip("empty text", where)
            continue
        data_bytes = _image_ok(path, report)
        if data_bytes is None:
            continue
        sample = {
            "__key__": f"{n:09d}",
            _ext(path): data_bytes,
            "json": json.dumps({"captions": texts, "source": str(path)}).encode(),
        }
        if texts:
            sample["txt"] = texts[0].encode()
        yield sample


def from_image_folder(root: Path, report: WriteReport) -> Iterator[dict[str, bytes]]:
    """Images of a folder; with class sub-folders each sample gets ``cls`` (sorted folder index)."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = sorted(f for f in root.rglob("*") if f.is_file() and _ext(f) in IMAGE_EXTS)
    for n, path in enumerate(files):
        data_bytes = _image_ok(path, report)
        if data_bytes is None:
            continue
        sample = {
            "__key__": f"{n:09d}",
            _ext(path): data_bytes,
            "json": json.dumps({"source": str(path)}).encode(),
        }
        rel = path.relative_to(root).parts
        if len(rel) > 1 and rel[0] in classes:
            sample["cls"] = str(classes.index(rel[0])).encode()
        yield sample


def from_text_files(files: list[Path], report: WriteReport, min_chars: int = 1) -> Iterator[dict[str, bytes]]:
    """One text sample per non-empty line of each file (blank lines are separators, not samples)."""
    n = 0
    for f in files:
        for line in Path(f).read_text(errors="replace").splitlines():
            text = line.strip()
            if len(text) < min_chars:
                continue
            yield {"__key__": f"{n:09d}", "txt": text.encode()}
            n += 1
