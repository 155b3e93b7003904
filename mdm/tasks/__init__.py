"""Fine-tuning recipes: VQAv2, NLVR2, COCO/Flickr30k retrieval, COCO captioning, image and audio
classification.

Each recipe reads its dataset exactly as published, builds BEiT-3's head on a Multiway Transformer and
reports the official metrics; see :mod:`mdm.tasks.base` for the contract with the training engine and
``docs/finetune.md`` for the user guide.
"""

from mdm.tasks import (  # noqa: F401  (register the tasks)
    audio_classification,
    captioning,
    classification,
    nlvr2,
    retrieval,
    vqav2,
)
from mdm.tasks.base import TASKS, Task, TaskModel, build_task
from mdm.tasks.common import Problems, RecordError, TextTokenizer
from mdm.tasks.config import TaskConfig, TaskDataConfig
from mdm.tasks.io import load_task_model, save_task_model

__all__ = [
    "TASKS",
    "Problems",
    "RecordError",
    "Task",
    "TaskConfig",
    "TaskDataConfig",
    "TaskModel",
    "TextTokenizer",
    "build_task",
    "load_task_model",
    "save_task_model",
]
