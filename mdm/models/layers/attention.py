"""Self-attention over the joint sequence with shared or per-modality projections.

Computed with :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels
where available). Query, key and value projections are fused into one ``qkv`` Linear per expert;
torchscale's separate ``q_proj/k_proj/v_proj`` are concatenated on import (exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mdm.models.layers.multiway import (
    DEFAULT_KINDS,
    Multiway,
    join_parts,
    maybe_multiway,
    route_parts,
    split_parts,
)
from mdm.models.layers.packing import Layout


def per_sample_pays(x: torch.Tensor, layout: Layout) -> bool:
    """Whether a packed layout attends per sample (over each sample's real tokens, no mask) rather than
    over the padded batch with a key padding mask.

    The rule, on CPU: per sample skips ``(B·N² − Σ n_b²)·D`` of attention work (scores and their
    backward; n_b a sample's real tokens) and pays a fixed cost per sample (one small kernel, the copies
    of its q/k/v and output). Measured at 1 thread (``benchmarks/RESULTS.md``, 2026-12-03): ≈0.47 ms saved
    per 10⁶ of that work and ≈0.23 ms per sample paid, forward + backward; per sample is taken when the
    saving is at least ``PER_SAMPLE_WORK`` per sample, ≈4× the break-even. So a base-size text batch
    (lengths 11–86 padded to 86) goes per sample, image-caption pairs (197 patches + 10–16 tokens) and the
    demo's tiny models stay batched. On GPU the padded batch stays (one launch; varlen kernels are the
    better answer there).
    """
    if x.device.type != "cpu":
        return False
    return (layout.batch * layout.total**2 - layout.attention_area) * x.shape[-1] >= (
        layout.batch * PER_SAMPLE_WORK
    )


# Attention work (token pairs × width) skipped by per-sample attention, per sample, above which it is used.
PER_SAMPLE_WORK = 2_000_000


class MultiwayAttention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: model width D.
        num_heads: heads H (D must be divisible by H).
        multiway: per-modality ``qkv``/``out_proj``/``inner_norm`` (BEiT-3) instead of shared (VLMo).
        qkv_bias: bias on the fused qkv projection.
        subln: Sub-LN, a LayerNorm on the attention output before ``out_proj`` (Magneto).
        norm_eps: epsilon of that LayerNorm.
        attn_drop: dropout on attention probabilities (training only).
        kinds: the modalities that get a copy when ``multiway`` (vision and text by default).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        multiway: bool,
        qkv_bias: bool = True,
        subln: bool = False,
        norm_eps: float = 1e-5,
        attn_drop: float = 0.0,
        kinds: Sequence[str] = DEFAULT_KINDS,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = maybe_multiway(lambda: nn.Linear(dim, 3 * dim, bias=qkv_bias), multiway, kinds=kinds)
        self.inner_norm = (
            maybe_multiway(lambda: nn.LayerNorm(dim, eps=norm_eps), multiway, kinds=kinds) if subln else None
        )
        self.out_proj = maybe_multiway(lambda: nn.Linear(dim, dim), multiway, kinds=kinds)

    def forward(self, x: torch.Tensor, n_vision: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attends over all N tokens.

        Args:
            x: (B, N, D) normalised input.
            n_vision: routing (see :mod:`mdm.models.layers.multiway`).
            mask: boolean, broadcastable to (B, H, N, N); True where attention is allowed.
        """
        parts, kinds = split_parts(x, n_vision)
        return join_parts(self.forward_parts(parts, Layout.dense(kinds, parts), mask))

    def forward_parts(
        self, parts: list[torch.Tensor], layout: Layout, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """:meth:`forward` on the sequence held as modality parts, dense (B, L_i, D) or packed (n_i, D)
        as ``layout`` says (see :mod:`mdm.models.layers.packing`); returns parts alike."""
        if layout.packed and (mask is None or mask is layout.key_mask) and per_sample_pays(parts[0], layout):
            outs = self._per_sample(parts, layout)
            if self.inner_norm is not None:
                outs = route_parts(self.inner_norm, outs, layout.kinds)
            return route_parts(self.out_proj, outs, layout.kinds)
        if layout.packed:
            qkv = self._packed_qkv(parts, layout)  # (B, N, 3D), zeros at padding
        elif len(parts) > 1 and not isinstance(self.qkv, Multiway):
            qkv = self.qkv(torch.cat(parts, dim=1))  # shared: join the D-wide inputs, not 3D-wide outputs
        else:
            qkv = join_parts(route_parts(self.qkv, parts, layout.kinds))  # (B, N, 3D)
        B, N, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        # split, not view+permute+unbind: the backward is then one concatenation instead of stack + clone
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.split(D, dim=-1))
        # q, k, v: (B, H, N, hd) views of qkv
        drop = self.attn_drop if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, H, N, hd)
        o = o.transpose(1, 2)  # (B, N, H, hd), a view
        if layout.packed:
            outs = layout.gather(o.reshape(B, N, D))  # padded query rows are dropped here
        else:
            lens = layout.lengths
            outs = [c.reshape(B, n, D) for c, n in zip(o.split(lens, dim=1), lens)]  # one copy per part
        if self.inner_norm is not None:
            outs = route_parts(self.inner_norm, outs, layout.kinds)
        return route_parts(self.out_proj, outs, layout.kinds)

    def _per_sample(self, parts: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
        """Attention of each sample over its real tokens only, without a mask: the same result as the
        padded, key-masked batch, minus the padded query rows and keys (see :func:`per_sample_pays`)."""
        D, H, hd = parts[0].shape[-1], self.num_heads, self.head_dim
        rows = [p.reshape(-1, D) for p in parts]  # (B * L_i | n_i, D)
        if len(rows) > 1 and not isinstance(self.qkv, Multiway):
            qkv = self.qkv(torch.cat(rows)).split([r.shape[0] for r in rows])  # one GEMM for all parts
        else:
            qkv = route_parts(self.qkv, rows, layout.kinds)  # (B * L_i | n_i, 3D) each
        drop = self.attn_drop if self.training else 0.0
        outs: list[list[torch.Tensor]] = [[] for _ in parts]
        for slices in layout.sample_slices:
            pieces = [t[s] for t, s in zip(qkv, slices)]
            x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (n_b, 3D), this sample's tokens
            n = x.shape[0]
            q, k, v = (t.view(n, H, hd).transpose(0, 1) for t in x.split(D, dim=-1))  # (H, n_b, hd)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (H, n_b, hd)
            o = o.transpose(0, 1).reshape(n, D)  # (n_b, D)
            for out, piece in zip(outs, o.split([p.shape[0] for p in pieces])):
                out.append(piece)
        # dense parts back to (B, L_i, D), packed ones to (n_i, D)
        return [
            torch.cat(o) if packing is not None else torch.stack(o)
            for o, packing in zip(outs, layout.packings)
        ]

    def _packed_qkv(self, parts: list[torch.Tensor], layout: Layout) -> torch.Tensor:
        """qkv of the real tokens only, scattered into the padded sequence (B, N, 3D)."""
        rows = [p.reshape(-1, p.shape[-1]) for p in parts]  # (B * L_i | n_i, D)
        if len(rows) > 1 and not isinstance(self.qkv, Multiway):
            qkv = self.qkv(torch.cat(rows)).split([r.shape[0] for r in rows])  # one GEMM for all parts
        else:
            qkv = route_parts(self.qkv, rows, layout.kinds)
        return layout.scatter(qkv)


def seq2seq_mask(n_image: int, n_text: int, device: torch.device | None = None) -> torch.Tensor:
    """The uni-directional (seq2seq) mask of caption generation (UniLM; BEiT-3's ``BEiT3ForCaptioning``).

    Over ``[image tokens, text tokens]``: image tokens attend to image tokens only; text tokens attend to
    every image token and to the text up to and including themselves. Padding is not handled here: the
    encoder excludes padded keys itself (``text_padding_mask``).

    Returns:
        (N, N) bool, N = n_image + n_text, True where attention is allowed (the
        ``scaled_dot_product_attention`` convention that ``MultiwayTransformer.forward(attn_mask=)`` takes).
    """
    N = n_image + n_text
    allowed = torch.ones(N, N, dtype=torch.bool, device=device)
    allowed[:n_image, n_image:] = False  # image ↛ text
    allowed[n_image:, n_image:] = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
    return allowed
