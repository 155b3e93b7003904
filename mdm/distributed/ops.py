"""Cross-rank collectives that keep the autograd graph, for losses that need every rank's batch.

The contrastive loss of CLIP-style dual encoders (BEiT-3 retrieval, VLMo ITC) uses the whole global batch
as negatives. :func:`all_gather_with_grad` concatenates a tensor from all ranks; its backward sums the
incoming gradients over ranks and returns this rank's slice. With the usual data-parallel gradient
*averaging* (DDP, DeepSpeed), the parameter gradients then equal those of the same loss computed in one
process on the concatenated batch (checked by ``tests/test_tasks_dist.py``).

Every function is the identity (or its single-process equivalent) when ``torch.distributed`` is not
initialised, so task code can call them unconditionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_gather_object", "all_gather_with_grad", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """Concatenation along dim 0 of every rank's tensor; ranks may hold different numbers of rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        counts = [int(s.item()) for s in all_sizes]
        longest = max(counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts = counts
        ctx.rank = dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)  # (sum(counts), ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on this rank's rows: sum the gradients over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` (B_r, ...) from all ranks in rank order → (sum_r B_r, ...), differentiably.

    Args:
        x: this rank's rows; the other dimensions must agree across ranks.

    Returns:
        The gathered tensor; ``x`` itself when not distributed.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` (B_r, ...) from all ranks in rank order, without a graph (any dtype; ranks may
    hold different numbers of rows). ``x`` itself when not distributed."""
    if not is_distributed():
        return x
    with torch.no_grad():
        return _GatherWithGrad.apply(x.detach())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable) in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
