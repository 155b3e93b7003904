"""The mdm model directory: ``model.safetensors`` + ``config.json``.

``config.json`` holds ``{"format": "mdm-model", "format_version": 1, "model": <ModelConfig>, ...}`` and
any extra metadata (source checkpoint, git revision). Weights are written atomically (temporary name in
the same directory, then rename), so an interrupted save never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mdm.config import from_dict, to_dict
from mdm.models.config import ModelConfig

FORMAT = "mdm-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # safetensors refuses shared or non-contiguous storage; clone to plain contiguous tensors
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Saves ``model`` (its ``cfg`` and weights) as an mdm model directory.

    Args:
        model: a :class:`~mdm.models.multiway.MultiwayTransformer` (or any module with ``.cfg``).
        out_dir: directory to create or overwrite.
        extra: more JSON-serialisable metadata for ``config.json``.
        state_dict: weights to write instead of ``model.state_dict()``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    save_safetensors_atomic(sd, out / WEIGHTS, metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(model.cfg)}
    meta.update(extra or {})
    atomic_write_bytes(out / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of a model directory of any family."""
    path = Path(model_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir}: not an mdm model directory (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: 'format' is {got!r}, expected {FORMAT!r}")
    if "model" not in meta:
        raise ValueError(f"{path}: missing key 'model'")
    return meta


def model_family(model_dir: str | Path) -> str:
    """The model family of a directory: ``multiway`` (default) or the ``family`` its config.json names
    (``beats``: :class:`mdm.models.beats.BEATsEncoder`, written by ``mdm import beats``)."""
    return str(read_meta(model_dir).get("family", "multiway"))


def read_model_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The :class:`ModelConfig` and full metadata of a (Multiway) model directory."""
    meta = read_meta(model_dir)
    path = Path(model_dir) / CONFIG
    if meta.get("family", "multiway") != "multiway":
        raise ValueError(
            f"{path}: a {meta['family']!r} model, not a Multiway Transformer (load it with mdm.from_pretrained)"
        )
    return from_dict(ModelConfig, meta["model"], source=str(path), prefix="model."), meta


def from_pretrained(
    model_dir: str | Path, map_location: str | torch.device = "cpu", strict: bool = True, **overrides: Any
):
    """Loads an mdm model directory written by :func:`save_pretrained`, ``mdm import`` or ``mdm export``.

    Args:
        model_dir: the directory.
        map_location: device for the weights.
        strict: require the weights to match the architecture exactly.
        **overrides: ModelConfig fields to change that do not affect weights (``drop_path_rate``,
            ``grad_checkpointing``, ``attn_drop``).
    """
    from mdm.models.multiway import MultiwayTransformer

    if model_family(model_dir) == "beats":
        from mdm.models.beats import load_beats

        return load_beats(model_dir, map_location, strict, **overrides)
    cfg, _ = read_model_config(model_dir)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown ModelConfig field {k!r}")
        setattr(cfg, k, v)
    weights = Path(model_dir) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{model_dir}: missing {WEIGHTS}")
    sd = load_file(str(weights), device=str(map_location))
    # build without initialising (the weights replace every tensor): base takes ~20 s to init on CPU
    with torch.device("meta"):
        model = MultiwayTransformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or (strict and unexpected):
        raise ValueError(
            f"{weights}: weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return model.to(map_location)
