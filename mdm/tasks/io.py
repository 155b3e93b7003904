"""The fine-tuned model directory read by ``mdm evaluate`` and ``mdm predict``.

``model.safetensors`` holds the whole TaskModel state dict (``backbone.*`` plus the head, with unilm's
head names); ``config.json`` holds ``{"format": "mdm-task-model", "format_version": 1, "model":
<ModelConfig>, "task": <TaskConfig>, "data": <TaskDataConfig>, "task_state": {"answers"|"classes": ...},
"text_tokenizer": <spec or null>, ...}``. Both are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mdm.config import from_dict, to_dict
from mdm.models.config import ModelConfig
from mdm.models.io import atomic_write_bytes, save_safetensors_atomic
from mdm.models.multiway import MultiwayTransformer
from mdm.tasks.base import Task, TaskModel, build_task, unwrap
from mdm.tasks.config import TaskConfig, TaskDataConfig

FORMAT = "mdm-task-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_task_model(
    out_dir: str | Path,
    model: torch.nn.Module,
    task: Task,
    text_tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes a fine-tuned model directory.

    Args:
        out_dir: directory to create or overwrite.
        model: the TaskModel (wrappers are removed).
        task: its task (config and label vocabularies are saved).
        text_tokenizer: how to rebuild the text tokenizer (a path or a JSON-serialisable spec).
        extra: more JSON-serialisable metadata (metrics, git revision, source checkpoint...).
        state_dict: weights to write instead of ``model.state_dict()`` (e.g. gathered from ZeRO-3).
    """
    module = unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else module.state_dict()
    save_safetensors_atomic(
        {k: v.detach().cpu() for k, v in sd.items()}, out / WEIGHTS, metadata={"format": FORMAT}
    )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": to_dict(module.backbone.cfg),
        "task": to_dict(task.cfg),
        "data": to_dict(task.data),
        "task_state": task.state(),
        "text_tokenizer": text_tokenizer
        if text_tokenizer is None or isinstance(text_tokenizer, (str, dict))
        else str(text_tokenizer),
    }
    meta.update(extra or {})
    atomic_write_bytes(out / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def read_task_meta(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a fine-tuned model directory (checked)."""
    path = Path(model_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir}: not a fine-tuned mdm model directory (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "task", "data"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def load_task_model(
    model_dir: str | Path,
    task_cfg: TaskConfig | None = None,
    data: TaskDataConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[Task, TaskModel, dict[str, Any]]:
    """Rebuilds the task, the model (weights loaded strictly) and returns the metadata.

    Args:
        model_dir: a directory written by :func:`save_task_model`.
        task_cfg: a task config replacing the saved one (its ``name`` must match).
        data: a data config replacing the saved one (e.g. another ``data.root``).
        map_location: device of the weights.
    """
    meta = read_task_meta(model_dir)
    src = str(Path(model_dir) / CONFIG)
    model_cfg = from_dict(ModelConfig, meta["model"], source=src, prefix="model.")
    saved_task = from_dict(TaskConfig, meta["task"], source=src, prefix="task.")
    if task_cfg is not None and task_cfg.name != saved_task.name:
        raise ValueError(f"{model_dir} is a {saved_task.name!r} model, not {task_cfg.name!r}")
    task_cfg = task_cfg or saved_task
    data_cfg = (
        data if data is not None else from_dict(TaskDataConfig, meta["data"], source=src, prefix="data.")
    )
    task = build_task(task_cfg, data_cfg, meta.get("task_state") or None)
    model = task.build_model(MultiwayTransformer(model_cfg))
    weights = Path(model_dir) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{model_dir}: missing {WEIGHTS}")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return task, model.to(map_location), meta
