"""The fine-tuned model directory read by ``mdm evaluate`` and ``mdm predict``.

It is an ordinary mdm model directory (``mdm.models.from_pretrained`` loads its backbone, ``mdm export``
converts it with its head to unilm's format): ``model.safetensors`` holds the backbone (mdm names),
``heads.safetensors`` the task's own tensors under unilm's names (``head.0.weight``, ``logit_scale``...),
and ``config.json`` holds ``{"format": "mdm-model", "format_version": 1, "model": <ModelConfig>, "task":
<TaskConfig>, "data": <TaskDataConfig>, "task_state": {"answers"|"classes": ...}, "text_tokenizer": <spec
or null>, ...}``. Everything is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mdm.config import from_dict, to_dict
from mdm.models.io import (
    FORMAT,
    FORMAT_VERSION,
    atomic_write_bytes,
    read_meta,
    read_model_config,
    save_safetensors_atomic,
)
from mdm.models.multiway import MultiwayTransformer
from mdm.tasks.base import Task, TaskModel, build_task, unwrap
from mdm.tasks.config import TaskConfig, TaskDataConfig

WEIGHTS = "model.safetensors"
HEADS = "heads.safetensors"
CONFIG = "config.json"
BACKBONE = "backbone."


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
    backbone = {k[len(BACKBONE) :]: v.detach().cpu() for k, v in sd.items() if k.startswith(BACKBONE)}
    heads = {k: v.detach().cpu() for k, v in sd.items() if not k.startswith(BACKBONE)}
    save_safetensors_atomic(backbone, out / WEIGHTS, metadata={"format": FORMAT})
    save_safetensors_atomic(heads, out / HEADS, metadata={"format": FORMAT})
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
    if getattr(module.backbone, "family", "multiway") != "multiway":  # e.g. an imported BEATs encoder
        meta["family"] = module.backbone.family
    meta.update(extra or {})
    atomic_write_bytes(out / CONFIG, (json.dumps(meta, indent=2) + "\n").encode())
    return out


def read_task_meta(model_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a fine-tuned model directory (checked)."""
    try:
        meta = read_meta(model_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir}: not a fine-tuned mdm model directory (no {CONFIG})") from None
    for key in ("task", "data"):
        if key not in meta:
            raise ValueError(f"{Path(model_dir) / CONFIG}: missing key {key!r} (not a fine-tuned model?)")
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
    saved_task = from_dict(TaskConfig, meta["task"], source=src, prefix="task.")
    if task_cfg is not None and task_cfg.name != saved_task.name:
        raise ValueError(f"{model_dir} is a {saved_task.name!r} model, not {task_cfg.name!r}")
    task_cfg = task_cfg or saved_task
    data_cfg = (
        data if data is not None else from_dict(TaskDataConfig, meta["data"], source=src, prefix="data.")
    )
    task = build_task(task_cfg, data_cfg, meta.get("task_state") or None)
    if meta.get("family", "multiway") == "beats":
        from mdm.models.beats import BEATsEncoder, beats_config_from_meta

        backbone: torch.nn.Module = BEATsEncoder(beats_config_from_meta(meta, src))
    else:
        backbone = MultiwayTransformer(read_model_config(model_dir)[0])
    model = task.build_model(backbone)
    sd: dict[str, torch.Tensor] = {}
    for name, prefix in ((WEIGHTS, BACKBONE), (HEADS, "")):
        path = Path(model_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"{model_dir}: missing {name}")
        sd.update({prefix + k: v for k, v in load_file(str(path)).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return task, model.to(map_location), meta
