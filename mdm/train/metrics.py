"""Metric sinks on rank 0: a JSONL log always; Weights & Biases and TensorBoard as options.

wandb runs offline unless credentials exist (``WANDB_API_KEY`` or a ``~/.netrc`` entry), so nothing
reaches the network by accident.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class LoggingConfig:
    """Where metrics go.

    Attributes:
        every: log every N optimizer steps.
        wandb: also log to Weights & Biases (offline unless credentials exist).
        wandb_project: the wandb project.
        tensorboard: also write TensorBoard event files under ``<run>/tensorboard``.
        progress: show a progress bar (rank 0).
    """

    every: int = 10
    wandb: bool = False
    wandb_project: str = "mdm"
    tensorboard: bool = False
    progress: bool = True


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class MetricSink:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and forwards to optional backends.

    Args:
        run_dir: the run directory.
        cfg: logging options.
        enabled: False on ranks other than 0 (then every call is a no-op).
        run_config: the resolved config, attached to wandb runs.
    """

    def __init__(
        self, run_dir: str | Path, cfg: LoggingConfig, enabled: bool, run_config: dict | None = None
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb:
            try:
                import wandb

                mode = "online" if _wandb_has_credentials() else "offline"
                self._wandb = wandb.init(
                    project=cfg.wandb_project, dir=str(run_dir), config=run_config or {}, mode=mode
                )
                log.info("wandb logging (%s)", mode)
            except ImportError:
                log.warning("logging.wandb=true but wandb is not installed: pip install 'mdm-toolkit[wandb]'")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("logging.tensorboard=true but tensorboard is not installed")

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Appends ``{"step": step, **values}`` (non-finite floats are written as null)."""
        if not self.enabled:
            return
        row = {"step": step}
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            row[k] = v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after ``step`` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self.path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
