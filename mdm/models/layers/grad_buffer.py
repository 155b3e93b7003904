"""Vocabulary-sized layers whose weight gradient reuses one kept buffer.

A BEiT-3 pretraining step runs one backward per stream (images, texts, pairs) before the optimizer step, so
the text embedding and the MLM decoder, each ``vocab × D`` (64010 × 768 = 197 MB at base size), get a
gradient in two backward passes. Autograd computes each one into a freshly allocated tensor and then adds
it to ``.grad``. On CPU a fresh allocation of that size comes from the OS as untouched pages, and the first
write to each page faults: measured on this project's VM, zero-filling a fresh 64010 × 768 tensor took
80–550 ms against 8 ms for a reused one (``benchmarks/RESULTS.md``, 2026-12-03).

:class:`BufferedGradEmbedding` and :class:`BufferedGradLinear` compute the weight gradient into a buffer
kept between backward passes **when the parameter already holds a gradient** (autograd then adds the
buffer into ``.grad`` in place, and nothing keeps a reference to it). When ``.grad`` is None autograd would
copy a kept buffer instead of taking it, so the first pass computes into a fresh tensor as before. Values
are the same as :class:`torch.nn.Embedding` / :class:`torch.nn.Linear` (same kernels, same summation order
for the Linear; the embedding sums repeated ids in index order). Under ``create_graph`` (double backward)
the plain path is used. The modules are still called (hooks, ZeRO-3 gathering) and keep the parameter
names of their torch bases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GradBuffer:
    """One kept tensor, reallocated when shape, dtype or device change (not module state)."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def get(self, like: torch.Tensor) -> torch.Tensor:
        t = self.tensor
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            t = self.tensor = torch.empty_like(like, memory_format=torch.contiguous_format)
        return t


def _reuse(weight: torch.Tensor) -> bool:
    """Whether the weight gradient may go into the kept buffer (see the module docstring)."""
    return weight.grad is not None and not torch.is_grad_enabled()


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, buffer: _GradBuffer) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.buffer = weight, buffer
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows = grad.reshape(-1, grad.shape[-1])  # (n, D)
        if _reuse(weight):
            out = ctx.buffer.get(weight).zero_()
        else:
            out = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        return out.index_add_(0, ids.reshape(-1), rows), None, None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, buffer: _GradBuffer) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.buffer = buffer
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, V), (M, D)
            if _reuse(weight):
                grad_w = torch.mm(g2.t(), x2, out=ctx.buffer.get(weight))
            else:
                grad_w = g2.t() @ x2
        return grad_x, grad_w, None


class BufferedGradEmbedding(nn.Embedding):
    """:class:`torch.nn.Embedding` (no padding index, max norm or sparse gradient) whose weight gradient
    reuses a kept buffer when ``.grad`` already holds one."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self._grad_buffer = _GradBuffer()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or torch.jit.is_tracing():
            return super().forward(ids)
        return _Lookup.apply(self.weight, ids, self._grad_buffer)


class BufferedGradLinear(nn.Linear):
    """A bias-free :class:`torch.nn.Linear` whose weight gradient reuses a kept buffer when ``.grad``
    already holds one."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self._grad_buffer = _GradBuffer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or torch.jit.is_tracing():
            return super().forward(x)
        return _Project.apply(x, self.weight, self._grad_buffer)
