"""What ``mdm evaluate`` and ``mdm predict`` share: arguments, config resolution, model and data loading.

Config precedence (later wins): the fine-tuned model's saved ``task``/``data`` sections, the ``task`` and
``data`` sections of ``--config`` (a ``configs/finetune`` YAML), ``--task``, then ``key=value`` overrides
such as ``data.root=/data/vqav2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mdm.config import ConfigError, from_dict, parse_overrides, read_yaml, to_dict
from mdm.models.io import atomic_write_bytes
from mdm.tasks.common import RecordError, TextTokenizer
from mdm.tasks.config import TaskConfig, TaskDataConfig

log = logging.getLogger(__name__)

#: Errors printed for people (no traceback) by the commands.
USER_ERRORS = (ConfigError, FileNotFoundError, RecordError, ValueError, KeyError)


@dataclass
class Sections:
    """The config sections these commands read."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments of both commands."""
    p.add_argument("--checkpoint", help="fine-tuned model directory (written by `mdm finetune`)")
    p.add_argument("--config", help="a configs/finetune YAML; its task: and data: sections are used")
    p.add_argument(
        "--task", help="vqav2 | nlvr2 | retrieval | captioning | classification | audio_classification"
    )
    p.add_argument("--split", help="train/val/test or a published split name (val2014, dev, test1, ...)")
    p.add_argument(
        "--tokenizer",
        help="text tokenizer: a tokenizer directory, a SentencePiece model file, "
        "or hash:<vocab> (default: the one recorded with the checkpoint)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: data.num_workers)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/data/vqav2")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_sections(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Sections:
    """The task and data configs from the saved model, ``--config``, ``--task`` and overrides."""
    data: dict[str, Any] = {k: saved[k] for k in ("task", "data") if saved and k in saved}
    if args.config:
        from_file = read_yaml(args.config)
        data = _merge(data, {k: from_file[k] for k in ("task", "data") if k in from_file})
    if args.task:
        data = _merge(data, {"task": {"name": args.task}})
    bad = [o for o in args.overrides if not o.split("=", 1)[0].startswith(("task.", "data."))]
    if bad:
        raise ConfigError(f"command line: only task.* and data.* overrides apply here, got {bad}")
    data = _merge(data, parse_overrides(args.overrides, Sections))
    return from_dict(
        Sections, data, source="command line" if not args.config else f"{args.config} + command line"
    )


def load_text_tokenizer(spec: Any) -> TextTokenizer | None:
    """A text tokenizer from a recorded spec: ``None``, ``"hash:<vocab>"`` / ``{"kind": "hash", ...}``,
    a tokenizer directory (``mdm.tokenizers.load``) or a SentencePiece model file."""
    if spec in (None, ""):
        return None
    if isinstance(spec, dict) and spec.get("kind") == "hash":
        spec = f"hash:{spec.get('vocab_size', 1024)}"
    if isinstance(spec, dict) and "path" in spec:
        spec = spec["path"]
    if not isinstance(spec, str):
        raise ValueError(f"cannot build a text tokenizer from {spec!r}")
    if spec.startswith("hash:"):
        from mdm.tasks.fixtures import HashTokenizer

        return HashTokenizer(int(spec.split(":", 1)[1]))
    path = Path(spec)
    if path.is_dir():
        import mdm.tokenizers

        return mdm.tokenizers.load(path)
    if path.is_file():
        from mdm.tokenizers.text import TextTokenizer as SentencePieceTokenizer

        return SentencePieceTokenizer(path.read_bytes())
    raise FileNotFoundError(f"text tokenizer {spec}: no such file or directory")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def maybe_init_distributed(device: torch.device) -> tuple[int, int]:
    """Joins the process group when launched by torchrun (rank, world size); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def make_loader(task: Any, dataset: Any, args: argparse.Namespace, num_workers: int) -> DataLoader:
    """An in-order loader (sharded over ranks under torchrun)."""
    sampler = None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=False, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=task.collate,
    )


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically (parent directories are created)."""
    atomic_write_bytes(
        Path(path), (json.dumps(obj, indent=None if isinstance(obj, list) else 2) + "\n").encode()
    )


def describe(sections: Sections) -> str:
    return json.dumps({"task": to_dict(sections.task), "data": to_dict(sections.data)})
