"""Training checkpoints: atomic, rotated, auto-resumable.

A checkpoint is a directory ``<run>/checkpoints/step-<NNNNNNNN>/`` holding what the strategy writes
(``state.pt`` for one process/DDP, a DeepSpeed tree for ZeRO), plus ``meta.json`` (step, resolved
config, git revision) written last, and ``rank-<r>.pt`` per rank (RNG states, data-stream position). Everything is first written under a
temporary name ``.step-<N>.tmp-<pid>`` and renamed when complete, so a crash mid-save leaves the
previous checkpoint as the newest complete one. ``resume=auto`` picks the newest directory that has a
``meta.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8})$")
META = "meta.json"


def git_revision() -> str | None:
    """The git commit of the mdm source tree, when it is a checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``meta.json``), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / META).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, ckpt_root: str | Path) -> Path | None:
    """``""``/``none`` → None; ``auto`` → newest complete checkpoint or None; else an explicit path."""
    if resume in ("", "none", "never"):
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume)
    if not (path / META).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete mdm checkpoint (no {META})")
    return path


class CheckpointManager:
    """Saves and rotates checkpoints of one run.

    Args:
        ckpt_root: the ``checkpoints`` directory of the run.
        keep_last: how many complete checkpoints to keep (older ones are deleted after a save).
        strategy: the run's strategy (writes model/optimizer state; rank 0 finalises).
    """

    def __init__(self, ckpt_root: str | Path, keep_last: int, strategy) -> None:
        self.root = Path(ckpt_root)
        self.keep_last = keep_last
        self.strategy = strategy

    def save(self, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Writes checkpoint ``step`` atomically on all ranks; returns its final path."""
        st = self.strategy
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if st.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        st.barrier()
        st.save(str(tmp))
        # RNG and data-stream positions differ per rank: each rank writes its own file.
        torch.save(client_state, tmp / f"rank-{st.rank:05d}.pt")
        st.barrier()
        if st.is_main:
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
            log.info("saved checkpoint %s", final)
        st.barrier()
        return final

    def load(self, path: Path) -> dict[str, Any]:
        """Restores model/optimizer through the strategy; returns this rank's client state."""
        self.strategy.load(str(path))
        rank_file = path / f"rank-{self.strategy.rank:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(
                f"{path}: no state for rank {self.strategy.rank} (was it written with a different world size?)"
            )
        return torch.load(rank_file, map_location="cpu", weights_only=False)

    def _rotate(self) -> None:
        ckpts = list_checkpoints(self.root)
        for _, path in ckpts[: max(len(ckpts) - self.keep_last, 0)]:
            shutil.rmtree(path, ignore_errors=True)
