"""Modality routing for Multiway Transformers (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

The sequence is laid out vision (or audio) first, then text. Routing is the integer ``n_vision``: tokens
``[:n_vision]`` go to the vision expert, the rest to the text expert. ``n_vision == N`` is image-only
input and ``n_vision == 0`` text-only. It is an argument of every ``forward``, never state set on modules
before a call (torchscale pushes a split position into modules with ``apply``; that is not re-entrant and
breaks under ``torch.compile``). Audio (the audio expert beside vision and text, as ONE-PEACE's modality
FFNs) is routed by the explicit ``kinds`` of the parts (:func:`route_parts`): ``(AUDIO,)`` or
``(AUDIO, TEXT)``; the integer form stays vision/text only.

Inside the encoder the residual stream of joint input is kept as two tensors, the vision and the text
tokens (``parts``), and each expert runs on its own contiguous tensor: no slice copies before the experts,
no concatenation after them. The tokens are joined only where they must meet, in attention. Which kind
each part is, and whether it is held packed (its real tokens only, when it has padding), is the
encoder's :class:`~mdm.models.layers.packing.Layout`; :func:`route_parts` works on dense and packed parts
alike, since every expert is per-token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

VISION, TEXT, AUDIO = "vision", "text", "audio"
#: Modality kinds in the order their experts are built (and their parameters initialised).
KINDS = (VISION, TEXT, AUDIO)
DEFAULT_KINDS = (VISION, TEXT)


def ordered_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` in the canonical order of :data:`KINDS` (unknown names raise ValueError)."""
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown modalities {sorted(bad)} (known: {', '.join(KINDS)})")
    return tuple(k for k in KINDS if k in kinds)


class Multiway(nn.Module):
    """One copy of a module per modality (vision and text by default; audio when asked), and optionally
    a vision-language copy for joint input.

    Args:
        make: builds one copy; called once per expert so each has its own parameters.
        with_vl: add a ``vl`` expert that processes *all* tokens when the input is joint (VLMo's VL-FFN;
            joint audio-text input uses it too: it is the fusion expert of the top layers).
        kinds: the modalities that get an expert, attributes named after them (``vision``, ``text``,
            ``audio``); built in the order of :data:`KINDS` whatever the order given.
    """

    def __init__(
        self, make: Callable[[], nn.Module], with_vl: bool = False, kinds: Sequence[str] = DEFAULT_KINDS
    ) -> None:
        super().__init__()
        self.kinds = ordered_kinds(kinds)
        for kind in self.kinds:
            setattr(self, kind, make())
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

    def expert(self, kind: str, joint: bool) -> nn.Module:
        """The expert for tokens of ``kind`` (``"vision"``/``"text"``/``"audio"``); joint input goes to
        ``vl`` if any."""
        if joint and self.vl is not None:
            return self.vl
        if kind not in self.kinds:
            raise ValueError(f"this model has no {kind} expert (its modalities: {', '.join(self.kinds)})")
        return getattr(self, kind)


def route(module: nn.Module, x: torch.Tensor, n_vision: int) -> torch.Tensor:
    """Applies ``module`` to ``x``: routed if it is :class:`Multiway`, shared by all tokens otherwise."""
    if isinstance(module, Multiway):
        return module(x, n_vision)
    return module(x)


def maybe_multiway(
    make: Callable[[], nn.Module], multiway: bool, with_vl: bool = False, kinds: Sequence[str] = DEFAULT_KINDS
) -> nn.Module:
    """``Multiway(make, kinds=kinds)`` when ``multiway`` else a single shared ``make()``."""
    return Multiway(make, with_vl=with_vl, kinds=kinds) if multiway else make()


def split_parts(x: torch.Tensor, n_vision: int) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """(B, N, ...) → its modality parts (views) and their kinds: ``[vision, text]`` for joint input."""
    n = x.shape[1]
    if n_vision >= n:
        return [x], (VISION,)
    if n_vision <= 0:
        return [x], (TEXT,)
    return [x[:, :n_vision], x[:, n_vision:]], (VISION, TEXT)


def join_parts(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_parts`: the parts concatenated along the sequence, (B, N, ...)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


def part_kinds(n_parts: int, n_vision: int) -> tuple[str, ...]:
    """Kinds of ``n_parts`` modality parts: ``(vision, text)`` for two, else by ``n_vision > 0``."""
    if n_parts == 2:
        return (VISION, TEXT)
    return (VISION,) if n_vision > 0 else (TEXT,)


def route_parts(module: nn.Module, parts: Sequence[torch.Tensor], kinds: Sequence[str]) -> list[torch.Tensor]:
    """Applies ``module`` to each part on its own: its expert for that kind if it is :class:`Multiway`
    (the VL expert for both parts of joint input when it has one), the shared module otherwise."""
    if isinstance(module, Multiway):
        joint = len(parts) > 1
        return [module.expert(kind, joint)(p) for p, kind in zip(parts, kinds)]
    return [module(p) for p in parts]
