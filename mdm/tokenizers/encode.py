"""``mdm tokenizer encode``: precompute visual codes and store them beside each image in its shard.

Every sample with an image gets one more member, ``<key>.tok.npy`` by default: a NumPy array (h, w) of
int16 (int32 when the codebook has more than 32767 codes) holding the codes of the *whole* image
resized to the tokenizer's resolution. A pretraining run whose augmentation keeps the whole image
(no random crop) can read these instead of running the tokenizer online; with random crops the codes
must be computed online on the same crop. Beside the shards, ``tokens.json`` records the tokenizer
(``tokenizer_id``, kind, codebook size, grid, resolution, member name and dtype).

Shards are read from local paths or any URL webdataset opens (``https://``, ``pipe:CMD``, ...) and
rewritten atomically: to ``out_dir`` with the same file names (a local shard set's ``index.json`` is
copied along), or in place (local shards only).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mdm.models.io import atomic_write_bytes
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.data import decode_image, image_member, iter_shard, to_tensor

__all__ = ["encode_shards", "npy_bytes", "read_npy", "TOKENS_JSON"]

log = logging.getLogger(__name__)
TOKENS_JSON = "tokens.json"


def npy_bytes(arr: np.ndarray) -> bytes:
    """The ``.npy`` file of an array."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`npy_bytes` (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _codes_for(
    tok: VisualTokenizer, samples: list[dict], name: str, batch_size: int
) -> list[np.ndarray | None]:
    """Codes (h, w) for each sample with an image, ``None`` for samples without one."""
    size = tok.img_size
    dtype = np.int16 if tok.codebook_size <= np.iinfo(np.int16).max else np.int32
    out: list[np.ndarray | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if image_member(s) is not None]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        tensors = []
        for i in idx:
            ext = image_member(samples[i])
            img = decode_image(samples[i][ext], f"{name}:{samples[i]['__key__']}.{ext}")
            tensors.append(to_tensor(img.resize((size, size), Image.Resampling.BICUBIC)))
        codes = tok.encode(torch.stack(tensors)).cpu().numpy().astype(dtype)  # (b, h, w)
        for i, c in zip(idx, codes):
            out[i] = c
    return out


def _write_tar(path: Path, samples: list[dict], codes: list[np.ndarray | None], member: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample, code in zip(samples, codes):
                items = [(ext, data) for ext, data in sample.items() if ext not in ("__key__", member)]
                if code is not None:
                    items.append((member, npy_bytes(code)))
                for ext, data in items:
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _targets(shards: list[str], out_dir: Path | None) -> list[Path]:
    """Where each shard's rewrite goes: ``out_dir/<shard file name>``, or the shard itself (in place)."""
    from mdm.data.shard_reader import is_url, shard_name

    if out_dir is None:
        remote = [s for s in shards if is_url(s)]
        if remote:
            raise ValueError(f"{remote[0]}: only local shards can be rewritten in place; give --out DIR")
        return [Path(s) for s in shards]
    targets = [out_dir / shard_name(s) for s in shards]
    seen: dict[Path, str] = {}
    for shard, target in zip(shards, targets):
        if target in seen:
            raise ValueError(f"{seen[target]} and {shard} would both be written to {target}")
        seen[target] = shard
    return targets


def encode_shards(
    tok: VisualTokenizer,
    shards: list[str | Path],
    out_dir: Path | None = None,
    member: str = "tok.npy",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Adds a codes member to every image sample of ``shards``.

    Args:
        tok: a loaded (frozen) visual tokenizer.
        shards: tar shards: local paths or URLs webdataset opens (``https://``, ``pipe:CMD``, ...).
        out_dir: where to write the new shards (same file names); ``None`` rewrites them in place
            (local shards only).
        member: extension of the new member (``<key>.<member>``).
        batch_size: images per tokenizer call.

    Returns:
        The content of ``tokens.json`` (also written beside the output shards).
    """
    if not member.endswith(".npy"):
        raise ValueError(f"member {member!r} must end with .npy")
    shards = [str(s) for s in shards]
    targets = _targets(shards, out_dir)
    dtype = "int16" if tok.codebook_size <= np.iinfo(np.int16).max else "int32"
    total = 0
    for shard, target in zip(shards, targets):
        samples = list(iter_shard(shard))
        codes = _codes_for(tok, samples, shard, batch_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_tar(target, samples, codes, member)
        n = sum(c is not None for c in codes)
        total += n
        log.info("%s: %d of %d samples encoded → %s", shard, n, len(samples), target)
    info = {
        "tokenizer_id": getattr(tok, "tokenizer_id", ""),
        "kind": tok.kind,
        "codebook_size": tok.codebook_size,
        "grid_size": list(tok.grid_size),
        "img_size": tok.img_size,
        "member": member,
        "dtype": dtype,
        "view": "whole image resized to img_size",
        "num_samples": total,
        "shards": [t.name for t in targets],
    }
    where = out_dir if out_dir is not None else targets[0].parent
    atomic_write_bytes(where / TOKENS_JSON, (json.dumps(info, indent=2) + "\n").encode())
    _copy_shard_index(shards, out_dir)
    return info


def _copy_shard_index(shards: list[str], out_dir: Path | None) -> None:
    """Copies the shard set's ``index.json`` (``mdm data shards``) to ``out_dir``: same shards, same counts.

    Only local shard sets have one to copy; URL shards are read as a stream, without their folder.
    """
    from mdm.data.shard_reader import is_url

    if out_dir is None:
        return
    for folder in sorted({Path(s).parent for s in shards if not is_url(s)}):
        index = folder / "index.json"
        if index.exists() and not (out_dir / "index.json").exists():
            atomic_write_bytes(out_dir / "index.json", index.read_bytes())
