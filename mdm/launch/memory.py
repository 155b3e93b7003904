"""Analytic per-rank memory of a training run: model states under ZeRO stages 0–3 and activations.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, §3 and §5): with Ψ trainable parameters and
N data-parallel ranks, mixed precision (bf16/fp16) keeps 2Ψ bytes of 16-bit parameters, 2Ψ of 16-bit
gradients and 12Ψ of optimizer state (fp32 master weights, Adam m and v); fp32 training keeps 4Ψ + 4Ψ + 8Ψ.
Stage 1 partitions the optimizer state, stage 2 also the gradients, stage 3 also the parameters (each
divided by N). DeepSpeed's communication buckets, the CUDA context and allocator fragmentation are not
counted; frozen weights (the visual tokenizer) are replicated on every rank in the compute dtype.

Activations are counted per token and per layer from what autograd saves in a Multiway layer
(see :func:`layer_activation_elems`), assuming fused attention (flash / memory-efficient SDPA: no N×N
matrix is stored) and no dropout; loss heads add their logits. With activation checkpointing each
layer keeps only its input, and one layer's working set is rebuilt at a time during backward.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from mdm.models.config import ModelConfig

GiB = 1024**3


@dataclass
class EncoderPass:
    """One forward of the encoder (or of extra blocks) per micro-batch on one rank.

    Attributes:
        name: what it is (``"image stream: mim"``).
        batch: sequences per micro-batch.
        tokens: tokens per sequence.
        layers: layers it runs through.
        dim: their width.
        ffn_dim: their FFN hidden width.
        logits: (positions per sequence, classes) of each loss head on this pass.
    """

    name: str
    batch: int
    tokens: int
    layers: int
    dim: int
    ffn_dim: int
    subln: bool = False
    layer_scale: bool = False
    logits: list[tuple[float, int]] = field(default_factory=list)


def layer_activation_elems(dim: int, ffn_dim: int, subln: bool, layer_scale: bool) -> int:
    """Elements autograd keeps per token for one pre-norm layer.

    Attention block: LayerNorm input D, its output (qkv input) D, SDPA's q, k, v and output 4D, the
    out-projection input D (+ D for the Sub-LN input) → 7D (+D). FFN block: LayerNorm input D, fc1
    input D, GELU input F, fc2 input F (+ F for the Sub-LN input) → 2D + 2F (+F). Layer scale saves each
    branch output (+2D). beit3_base: 10D + 3F = 16,896 elements/token/layer (≈33 KB in bf16).
    """
    elems = 7 * dim + 2 * dim + 2 * ffn_dim
    if subln:
        elems += dim + ffn_dim
    if layer_scale:
        elems += 2 * dim
    return elems


def pass_activation_bytes(p: EncoderPass, bytes_per_elem: int, checkpointing: bool) -> float:
    """Activation bytes of one pass: layers (all, or inputs + one layer when checkpointing) + logits.

    Logits of a cross-entropy head cost ``bytes_per_elem`` (head output) + 8 bytes (fp32 copy and
    log-softmax) per class per predicted position.
    """
    per_layer = layer_activation_elems(p.dim, p.ffn_dim, p.subln, p.layer_scale) * p.batch * p.tokens
    if checkpointing:
        layers = p.layers * p.dim * p.batch * p.tokens + per_layer  # inputs + one rebuilt layer
    else:
        layers = p.layers * per_layer
    logits = sum(pos * classes for pos, classes in p.logits) * p.batch * (bytes_per_elem + 8)
    return layers * bytes_per_elem + logits


@dataclass
class StateBytes:
    """Per-rank bytes of parameters, gradients and optimizer state for one ZeRO stage."""

    stage: int
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_state_bytes(trainable: int, world_size: int, precision: str, stage: int) -> StateBytes:
    """Model-state bytes per rank of ``trainable`` parameters under ZeRO ``stage`` (Adam/AdamW)."""
    if precision == "fp32":
        p, g, o = 4.0, 4.0, 8.0  # weights, grads, Adam m + v
    else:
        p, g, o = 2.0, 2.0, 12.0  # 16-bit weights and grads; fp32 master + m + v
    n = float(world_size)
    params = trainable * p / (n if stage >= 3 else 1)
    grads = trainable * g / (n if stage >= 2 else 1)
    optim = trainable * o / (n if stage >= 1 else 1)
    return StateBytes(stage, params, grads, optim)


# ----------------------------------------------------------------------------------- parameter counts
_EXPERT_RE = re.compile(r"\.(vision|text|vl)(\.|$)")


def _component(name: str) -> str:
    if name.startswith(("text_embed", "text_pos_embed")):
        return "embeddings"
    if name.startswith(("vision_embed", "vision_pos_embed")):
        return "embeddings"
    if re.match(r"layers\.\d+\.(attn|attn_norm)\.", name):
        return "attention"
    if re.match(r"layers\.\d+\.ffn\.", name):
        return "ffn"
    if re.match(r"layers\.\d+\.gamma_", name):
        return "layer_scale"
    if name.startswith("norm."):
        return "final_norm"
    return "other"


def _expert(name: str) -> str:
    if name.startswith(("text_embed", "text_pos_embed")):
        return "text"
    if name.startswith(("vision_embed", "vision_pos_embed")):
        return "vision"
    m = _EXPERT_RE.search(name)
    return m.group(1) if m else "shared"


def backbone_parameter_table(backbone: nn.Module) -> dict[tuple[str, str], int]:
    """``{(component, expert): parameters}`` of a Multiway Transformer; expert is ``vision``, ``text``,
    ``vl`` or ``shared`` (used by every token, e.g. VLMo's attention)."""
    table: dict[tuple[str, str], int] = defaultdict(int)
    for name, p in backbone.named_parameters():
        table[(_component(name), _expert(name))] += p.numel()
    return dict(table)


def path_parameters(table: dict[tuple[str, str], int]) -> dict[str, int]:
    """Parameters each kind of input actually runs through: image-only (vision experts + shared),
    text-only (text + shared) and joint image-text (both, plus VL-FFN where present)."""
    by_expert: dict[str, int] = defaultdict(int)
    for (_, expert), n in table.items():
        by_expert[expert] += n
    vl = by_expert["vl"]
    return {
        "image-only": by_expert["vision"] + by_expert["shared"],
        "text-only": by_expert["text"] + by_expert["shared"],
        "image-text": by_expert["vision"] + by_expert["text"] + by_expert["shared"] + vl,
    }


def encoder_pass(cfg: ModelConfig, name: str, batch: int, tokens: int, logits: Iterable = ()) -> EncoderPass:
    """An :class:`EncoderPass` through the whole backbone ``cfg``."""
    return EncoderPass(
        name,
        batch,
        tokens,
        cfg.depth,
        cfg.embed_dim,
        cfg.ffn_dim,
        cfg.subln,
        cfg.layer_scale_init > 0,
        list(logits),
    )
