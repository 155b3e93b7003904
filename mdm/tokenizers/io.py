"""Saving and loading tokenizers; importing the official DALL-E dVAE pickles.

A tokenizer directory holds ``config.json`` (``{"format": "mdm-tokenizer", "format_version": 1,
"kind", "config", "tokenizer_id", ...}``) and the weights: ``tokenizer.safetensors`` for visual
tokenizers (optionally ``teacher.safetensors`` for VQ-KD evaluation), ``spm.model`` for SentencePiece.
``tokenizer_id`` is ``<kind>-<first 12 hex digits of a SHA-256 over the weights>`` (:func:`tokenizer_id`); precomputed
codes record it so that a pretraining run can check they came from the tokenizer it is configured with.

This is the one module of :mod:`mdm.tokenizers` that touches files (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mdm.models.io import atomic_write_bytes, save_safetensors_atomic
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.config import DVAEConfig

__all__ = [
    "FORMAT",
    "load",
    "save_tokenizer",
    "tokenizer_id",
    "read_meta",
    "read_state_dict",
    "load_dall_e_pickles",
    "PickleRefused",
    "load_teacher",
    "import_spm",
    "import_unilm_vqkd",
]

FORMAT = "mdm-tokenizer"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "tokenizer.safetensors"
TEACHER_WEIGHTS = "teacher.safetensors"
SPM = "spm.model"


def tokenizer_id(kind: str, weights: dict[str, torch.Tensor] | bytes) -> str:
    """``<kind>-<12 hex digits>``: SHA-256 over the tensors (sorted names, dtypes, shapes, values) or model bytes."""
    h = hashlib.sha256()
    if isinstance(weights, bytes):
        h.update(weights)
    else:
        for name in sorted(weights):
            t = weights[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


def _write_meta(
    out: Path, kind: str, config: dict[str, Any], tok_id: str, extra: dict[str, Any] | None
) -> str:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer_id": tok_id,
        "config": config,
    }
    meta.update(extra or {})
    atomic_write_bytes(out / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return tok_id


def save_tokenizer(
    tok: Any,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    teacher_state: dict[str, torch.Tensor] | None = None,
) -> str:
    """Writes a tokenizer directory; returns its ``tokenizer_id``.

    Args:
        tok: a :class:`VisualTokenizer` or a :class:`~mdm.tokenizers.text.TextTokenizer`.
        out_dir: directory to create or overwrite.
        extra: more JSON metadata (training config, teacher description, metrics).
        teacher_state: VQ-KD teacher weights to keep beside the tokenizer (for ``mdm tokenizer eval``).
    """
    from mdm.tokenizers.text import TextTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, TextTokenizer):
        atomic_write_bytes(out / SPM, tok.model_proto)
        return _write_meta(
            out, "sentencepiece", tok.config_dict(), tokenizer_id("sentencepiece", tok.model_proto), extra
        )
    state = tok.state_dict()
    save_safetensors_atomic(state, out / WEIGHTS, metadata={"format": FORMAT, "kind": tok.kind})
    if teacher_state is not None:
        save_safetensors_atomic(teacher_state, out / TEACHER_WEIGHTS, metadata={"format": FORMAT})
    return _write_meta(out, tok.kind, tok.config_dict(), tokenizer_id(tok.kind, state), extra)


def read_meta(tok_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a tokenizer directory, checked."""
    path = Path(tok_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{tok_dir}: not a tokenizer directory (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("kind", "config"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def load(tok_dir: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Loads any saved tokenizer: a frozen :class:`VisualTokenizer` (dVAE, VQ-KD) or a ``TextTokenizer``."""
    from mdm.tokenizers import TOKENIZERS
    from mdm.tokenizers.text import TextTokenizer

    tok_dir = Path(tok_dir)
    meta = read_meta(tok_dir)
    source = str(tok_dir / CONFIG)
    if meta["kind"] == "sentencepiece":
        text = TextTokenizer((tok_dir / SPM).read_bytes(), **meta["config"])
        text.tokenizer_id = meta.get("tokenizer_id", "")
        return text
    cls = TOKENIZERS.get(meta["kind"])
    tok: VisualTokenizer = cls.from_config(meta["config"], source=source)
    weights = tok_dir / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{tok_dir}: missing {WEIGHTS}")
    missing, unexpected = tok.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match {source}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tok.tokenizer_id = meta.get("tokenizer_id", "")
    return tok.freeze().to(map_location)


def load_teacher(tok_dir: str | Path) -> Any:
    """The teacher a VQ-KD directory was trained with (``None`` if it cannot be rebuilt from the files)."""
    from mdm.config import from_dict
    from mdm.tokenizers.config import TeacherConfig
    from mdm.tokenizers.teacher import build_teacher

    tok_dir = Path(tok_dir)
    meta = read_meta(tok_dir)
    if "teacher" not in meta:
        return None
    cfg = from_dict(TeacherConfig, meta["teacher"], source=str(tok_dir / CONFIG), prefix="teacher.")
    if cfg.kind == "none":
        return None
    weights = tok_dir / TEACHER_WEIGHTS
    return build_teacher(cfg, weights=load_file(str(weights)) if weights.exists() else None)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (loaded with ``weights_only=True``, so no code
    runs); a ``{"model": ...}`` or ``{"state_dict": ...}`` container is unwrapped."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a plain state dict (weights_only load failed: {e})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- DALL-E pickles


class PickleRefused(RuntimeError):
    """Raised when a pickle would have to be unpickled without the user's explicit consent."""


class _PickledModule(nn.Module):
    """Stand-in for the ``dall_e`` classes: receives their pickled state, exposes ``state_dict()``."""

    def forward(self, *args: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("a stand-in for an unpickled dall_e module cannot run")


_TORCH_GLOBALS = {"device", "Size", "dtype"}


class _DalleUnpickler(pickle.Unpickler):
    """Resolves ``dall_e.*`` to a stand-in and only the torch/collections globals a module pickle needs."""

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "dall_e":
            return type(name, (_PickledModule,), {"__module__": "mdm.tokenizers.io"})
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set")}:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("Storage") or name in _TORCH_GLOBALS):
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild"):
            return super().find_class(module, name)
        if module.startswith("torch.nn.modules."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                return obj
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a DALL-E pickle")


class _PickleModule:
    """The ``pickle_module`` handed to ``torch.load``: the stdlib with our restricted unpickler."""

    Unpickler = _DalleUnpickler
    load = staticmethod(pickle.load)
    __name__ = "mdm.tokenizers.io._PickleModule"


def _unpickle_module(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path}: expected a pickled dall_e module, got {type(obj).__name__}")
    return {k: v.float() for k, v in obj.state_dict().items()}


def _groups(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    groups = {k.split(".")[1] for k in sd if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")}
    return len(groups), len(blocks)


def load_dall_e_pickles(
    encoder: str | Path, decoder: str | Path | None, allow_pickle: bool, img_size: int = 112
) -> Any:
    """Builds a :class:`~mdm.tokenizers.dvae.DVAE` from DALL-E's ``encoder.pkl`` (and ``decoder.pkl``).

    The files are pickled ``nn.Module`` objects of the ``dall_e`` package. Unpickling can run arbitrary
    code, so it happens only with ``allow_pickle=True``; even then only the torch/collections globals a
    module pickle needs are resolved and the ``dall_e`` classes are replaced by inert stand-ins (the
    ``dall_e`` package need not be installed).

    Raises:
        PickleRefused: without ``allow_pickle``.
    """
    from mdm.tokenizers.dvae import DVAE

    if not allow_pickle:
        raise PickleRefused(
            f"{encoder}: DALL-E weights are Python pickles, and unpickling a file can run arbitrary code. "
            "Pass --allow-pickle (allow_pickle=True) only for files from a source you trust "
            "(e.g. the official cdn.openai.com/dall-e/{encoder,decoder}.pkl)."
        )
    enc = _unpickle_module(Path(encoder))
    n_groups, n_blocks = _groups(enc)
    cfg = DVAEConfig(
        img_size=img_size,
        with_decoder=decoder is not None,
        vocab_size=enc["blocks.output.conv.w"].shape[0],
        hidden_dim=enc["blocks.input.w"].shape[0],
        blocks_per_group=n_blocks,
        num_groups=n_groups,
    )
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    if decoder is not None:
        dec = _unpickle_module(Path(decoder))
        cfg.decoder_init_dim = dec["blocks.input.w"].shape[0]
        cfg.decoder_hidden_dim = dec["blocks.output.conv.w"].shape[1]
        if dec["blocks.input.w"].shape[1] != cfg.vocab_size or _groups(dec) != (n_groups, n_blocks):
            raise ValueError(f"{decoder}: decoder does not match the encoder {encoder}")
        sd.update({f"decoder.{k}": v for k, v in dec.items()})
    tok = DVAE(cfg)
    missing, unexpected = tok.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{encoder}: unexpected layout: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return tok


# --------------------------------------------------------------------------- unilm VQ-KD, SentencePiece


def import_unilm_vqkd(path: Path, encoder_heads: int | None = None, decoder_heads: int | None = None) -> Any:
    """A :class:`~mdm.tokenizers.vqkd.VQKD` from a unilm BEiT v2 checkpoint (see :mod:`mdm.tokenizers.unilm`)."""
    from mdm.tokenizers.unilm import infer_vqkd_config, vqkd_from_unilm
    from mdm.tokenizers.vqkd import VQKD

    sd = vqkd_from_unilm(read_state_dict(path))
    try:
        cfg = infer_vqkd_config(sd, encoder_heads, decoder_heads)
    except KeyError as e:
        raise ValueError(f"{path}: not a VQ-KD checkpoint (missing {e.args[0]})") from None
    tok = VQKD(cfg)
    missing, unexpected = tok.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: unexpected VQ-KD layout: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return tok


def import_spm(path: Path, embedding_rows: int | None = None) -> Any:
    """A :class:`~mdm.tokenizers.text.TextTokenizer` from a SentencePiece model file (e.g. ``beit3.spm``)."""
    from mdm.tokenizers.text import TextTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SentencePiece model")
    try:
        return TextTokenizer(path.read_bytes(), embedding_rows=embedding_rows)
    except RuntimeError as e:  # sentencepiece reports a bad proto as RuntimeError
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
