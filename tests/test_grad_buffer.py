"""Vocabulary-sized layers that reuse one weight-gradient buffer (:mod:`mdm.models.layers.grad_buffer`).

Against the torch modules they replace: the same outputs and input gradients, and the same ``.grad`` after
one, two and three backward passes (the kept buffer must be added, never aliased into ``.grad``).
"""

from __future__ import annotations

import pytest
import torch

from mdm.models.layers.grad_buffer import BufferedGradEmbedding, BufferedGradLinear


def pair(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ref = torch.nn.Embedding(50, 8) if kind == "embedding" else torch.nn.Linear(8, 50, bias=False)
    ours = BufferedGradEmbedding(50, 8) if kind == "embedding" else BufferedGradLinear(8, 50)
    ours.load_state_dict(ref.state_dict())  # same parameter names
    return ref, ours


def batch(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, 50, (3, 7), generator=g)  # repeated ids are likely: they must add up
    return torch.randn(3, 7, 8, generator=g, requires_grad=True)


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_same_values_and_gradients_over_passes(kind):
    ref, ours = pair(kind)
    seen = []
    for seed in range(3):  # the first pass has .grad None, the later ones reuse the buffer
        x = batch(kind, seed)
        x2 = x.detach().clone().requires_grad_() if x.is_floating_point() else x
        w = torch.randn(
            3, 7, 50 if kind == "linear" else 8, generator=torch.Generator().manual_seed(9 + seed)
        )
        out_ref, out = ref(x), ours(x2)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
        (out_ref * w).sum().backward()
        (out * w).sum().backward()
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=0, atol=1e-6)
        if x.is_floating_point():
            torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-6)
        seen.append(ours.weight.grad.data_ptr())
    assert ours._grad_buffer.tensor is not None  # the later passes did use it
    assert ours._grad_buffer.tensor.data_ptr() not in seen  # ... without becoming .grad
    ours.zero_grad(set_to_none=True)  # after the optimizer's zero_grad the next pass starts fresh
    ours(batch(kind, 0)).sum().backward()
    assert ours.weight.grad.data_ptr() != ours._grad_buffer.tensor.data_ptr()


@pytest.mark.parametrize("kind", ["embedding", "linear"])
def test_plain_path_without_grad_and_for_double_backward(kind):
    ref, ours = pair(kind)
    x = batch(kind, 0)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    if kind == "linear":  # double backward through the input gradient
        x2 = x.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(ours(x2).pow(2).sum(), x2, create_graph=True)
        (gx_ref,) = torch.autograd.grad(ref(x).pow(2).sum(), x, create_graph=True)
        torch.testing.assert_close(gx, gx_ref)
