"""Analytic FLOP counts of the Multiway Transformer, for throughput and MFU reporting.

Counts multiply-adds as 2 FLOPs; a training step costs 3× the forward (backward ≈ 2× forward). Only the
tokens the encoder actually sees are counted, so MAE's visible-only encoder is credited with its real
work (masking-aware MFU); tokenizer forwards are not model FLOPs and are excluded.
"""

from __future__ import annotations

from mdm.models.config import ModelConfig


def encoder_forward_flops(cfg: ModelConfig, n_tokens: int) -> float:
    """Forward FLOPs of the backbone for one sequence of ``n_tokens`` tokens.

    Per layer: q/k/v/out projections ``2·N·4D²``, attention scores and mixing ``2·2·N²·D``, FFN
    ``2·N·2·D·F``. Routing to experts does not change the count (each token meets one expert).
    """
    D, F, N = cfg.embed_dim, cfg.ffn_dim, n_tokens
    per_layer = 2 * N * 4 * D * D + 4 * N * N * D + 4 * N * D * F
    return float(cfg.depth * per_layer)


def train_step_flops(cfg: ModelConfig, sequence_lengths: list[tuple[int, int]]) -> float:
    """Forward+backward FLOPs for a list of ``(batch_size, sequence_length)`` encoder passes."""
    return 3.0 * sum(b * encoder_forward_flops(cfg, n) for b, n in sequence_lengths)
