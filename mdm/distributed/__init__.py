"""How a model runs across processes: :func:`build_strategy` returns single / DDP / DeepSpeed."""

from mdm.distributed.strategy import DistributedConfig, Strategy, build_strategy

__all__ = ["DistributedConfig", "Strategy", "build_strategy"]
