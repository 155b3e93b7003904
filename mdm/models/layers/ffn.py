"""Feed-forward experts (pre-norm included) and stochastic depth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """``norm → fc1 → GELU → [sub_norm] → fc2``: one FFN expert with its own pre-LayerNorm.

    Keeping the pre-norm inside the expert matches VLMo (``norm2_imag``/``norm2_text``/``norm2_vl``) and
    BEiT-3 (``final_layer_norm.A/B``): every expert normalises its input with its own parameters.

    Args:
        dim: model width.
        hidden: hidden width.
        subln: Sub-LN on the hidden activations (Magneto / BEiT-3 ``ffn_layernorm``).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, hidden: int, subln: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.sub_norm = nn.LayerNorm(hidden, eps=norm_eps) if subln else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.norm(x)))  # exact (erf) GELU, as torchscale and timm
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.fc2(h)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    return x * drop_path_scale(x, p)


def drop_path_scale(x: torch.Tensor, p: float, batch: int | None = None) -> torch.Tensor:
    """The per-sample factor of :func:`drop_path`, (B, 1, ..., 1): 0 with probability ``p``, else 1/(1-p).

    Draw it once and apply it to every modality part of a residual branch, so that a sample's vision and
    text tokens are dropped together.

    Args:
        x: a tensor of the branch: its dtype and device (and, without ``batch``, its B and rank) set
            the factor's.
        p: drop probability.
        batch: B when ``x`` is a packed (n_real, D) part, whose first axis is not the batch; the factor
            is then (B, 1, 1), the same draw as for the padded (B, L, D) part.
    """
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if batch is None else (batch, 1, 1)
    return x.new_empty(shape).bernoulli_(keep).div_(keep)
