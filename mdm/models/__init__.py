"""Models: the Multiway Transformer and its presets.

>>> import mdm.models
>>> mdm.models.list_models()[:2]
['beit3_base', 'beit3_giant']
>>> model = mdm.models.create_model("vlmo_tiny", depth=2)
"""

from __future__ import annotations

from typing import Any

from mdm.models.config import PRESETS, ModelConfig, make_config
from mdm.models.io import from_pretrained, read_model_config, save_pretrained
from mdm.models.multiway import MultiwayBlock, MultiwayTransformer

__all__ = [
    "ModelConfig",
    "MultiwayBlock",
    "MultiwayTransformer",
    "create_model",
    "from_pretrained",
    "list_models",
    "read_model_config",
    "save_pretrained",
]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`: ``beit3_<size>`` and ``vlmo_<size>``."""
    return PRESETS.names()


def create_model(name: str, **overrides: Any) -> MultiwayTransformer:
    """Builds the preset ``name`` with ModelConfig fields in ``overrides`` changed.

    Args:
        name: one of :func:`list_models` (``beit3_base``, ``vlmo_large``, ...).
        **overrides: fields of :class:`ModelConfig`, e.g. ``depth=4, drop_path_rate=0.1``.
    """
    return MultiwayTransformer(make_config(name, **overrides))


def build_model(cfg: ModelConfig) -> MultiwayTransformer:
    """Builds a model from a (loaded) :class:`ModelConfig`."""
    return MultiwayTransformer(cfg)
