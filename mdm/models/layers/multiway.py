"""Modality routing for Multiway Transformers (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

The sequence is laid out vision first, then text. Routing is the integer ``n_vision``: tokens
``[:n_vision]`` go to the vision expert, the rest to the text expert. ``n_vision == N`` is image-only
input and ``n_vision == 0`` text-only. It is an argument of every ``forward``, never state set on modules
before a call (torchscale pushes a split position into modules with ``apply``; that is not re-entrant and
breaks under ``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Multiway(nn.Module):
    """A vision and a text copy of a module, and optionally a vision-language copy for joint input.

    Args:
        make: builds one copy; called once per expert so each has its own parameters.
        with_vl: add a ``vl`` expert that processes *all* tokens when the input is joint (VLMo's VL-FFN).
    """

    def __init__(self, make: Callable[[], nn.Module], with_vl: bool = False) -> None:
        super().__init__()
        self.vision = make()
        self.text = make()
        self.vl = make() if with_vl else None

    def forward(self, x: torch.Tensor, n_vision: int) -> torch.Tensor:
        """Routes ``x`` (B, N, ...) by position: ``[:n_vision]`` → vision, the rest → text."""
        n = x.shape[1]
        if n_vision >= n:
            return self.vision(x)
        if n_vision <= 0:
            return self.text(x)
        if self.vl is not None:
            return self.vl(x)
        return torch.cat([self.vision(x[:, :n_vision]), self.text(x[:, n_vision:])], dim=1)


def route(module: nn.Module, x: torch.Tensor, n_vision: int) -> torch.Tensor:
    """Applies ``module`` to ``x``: routed if it is :class:`Multiway`, shared by all tokens otherwise."""
    if isinstance(module, Multiway):
        return module(x, n_vision)
    return module(x)


def maybe_multiway(make: Callable[[], nn.Module], multiway: bool, with_vl: bool = False) -> nn.Module:
    """``Multiway(make)`` when ``multiway`` else a single shared ``make()``."""
    return Multiway(make, with_vl=with_vl) if multiway else make()
