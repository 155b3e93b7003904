"""Prediction heads and the small single-modality transformer blocks the objectives add on top of the
backbone.

* :class:`MIMHead` — BEiT's ``lm_head`` (Bao et al., 2022): one Linear D → codebook size applied to the
  backbone's (already normalised) output; trunc-normal(0.02) weights, zero bias.
* :class:`MLMHead` — BERT's prediction head (Devlin et al., 2019; also VLMo's ``MLMHead``): Dense + GELU +
  LayerNorm, then a decoder to the vocabulary with its own bias; the decoder weight can be tied to the
  backbone's text embedding.
* :class:`VisionBlock` — a pre-norm block built from the backbone's own attention and FFN layers with one
  set of parameters (the vision path of a Multiway block, without unused text experts). Used for BEiT v2's
  [CLS]-pretraining layers and, with its own width, for the MAE decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mdm.models.config import ModelConfig
from mdm.models.layers.attention import MultiwayAttention
from mdm.models.layers.ffn import FeedForward, drop_path
from mdm.models.layers.grad_buffer import BufferedGradLinear


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """Truncated normal (±2 std) for every Linear/Embedding weight under ``module``, zero biases,
    LayerNorm 1/0 (the init of the backbone)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MIMHead(nn.Module):
    """Visual-token classifier: Linear D → ``codebook_size``.

    Args:
        dim: backbone width.
        codebook_size: number of visual tokens (8192 for DALL-E's dVAE and BEiT v2's VQ-KD).
    """

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, codebook_size)
        trunc_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., codebook_size) logits."""
        return self.proj(x)


class MLMHead(nn.Module):
    """BERT-style masked-language-model head.

    Args:
        dim: backbone width.
        vocab_size: text vocabulary (rows of the backbone's ``text_embed``).
        tie_embedding: use the backbone's ``text_embed.weight`` as the decoder weight (passed to
            :meth:`forward`); the head then owns only the transform and the output bias.
        norm_eps: epsilon of the transform's LayerNorm (1e-12 in BERT).
    """

    def __init__(
        self, dim: int, vocab_size: int, tie_embedding: bool = False, norm_eps: float = 1e-12
    ) -> None:
        super().__init__()
        self.tie_embedding = tie_embedding
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder = None if tie_embedding else BufferedGradLinear(dim, vocab_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        trunc_normal_init(self)

    def forward(self, x: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) → (..., vocab_size) logits.

        Args:
            x: backbone outputs at the positions to predict.
            embedding_weight: (vocab_size, D), required when the head is tied.
        """
        h = self.norm(F.gelu(self.dense(x)))
        if self.decoder is not None:
            return self.decoder(h) + self.bias
        if embedding_weight is None:
            raise ValueError("MLMHead(tie_embedding=True) needs the text embedding weight")
        return F.linear(h, embedding_weight, self.bias)


class VisionBlock(nn.Module):
    """Pre-norm transformer block with one set of parameters (no modality routing).

    ``x + γ₁·attn(LN(x))`` then ``x + γ₂·ffn(x)`` where the FFN carries its own pre-LayerNorm, exactly the
    vision path of :class:`mdm.models.MultiwayBlock` without VL-FFN.

    Args:
        dim: width.
        num_heads: attention heads.
        ffn_dim: FFN hidden width.
        qkv_bias: bias on the fused qkv projection.
        subln: Sub-LN (Magneto) inside attention and FFN.
        norm_eps: LayerNorm epsilon.
        layer_scale_init: initial per-channel residual scale (0 disables it).
        drop_path_rate: stochastic depth of this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        qkv_bias: bool = True,
        subln: bool = False,
        norm_eps: float = 1e-6,
        layer_scale_init: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiwayAttention(
            dim, num_heads, multiway=False, qkv_bias=qkv_bias, subln=subln, norm_eps=norm_eps
        )
        self.ffn = FeedForward(dim, ffn_dim, subln, norm_eps)
        self.drop_path_rate = drop_path_rate
        if layer_scale_init > 0:
            self.gamma_attn = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_ffn = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma_attn = self.gamma_ffn = None

    @classmethod
    def like_backbone(cls, cfg: ModelConfig, drop_path_rate: float) -> VisionBlock:
        """A block with the sizes and options of the backbone described by ``cfg``."""
        return cls(
            cfg.embed_dim,
            cfg.num_heads,
            cfg.ffn_dim,
            qkv_bias=cfg.qkv_bias,
            subln=cfg.subln,
            norm_eps=cfg.norm_eps,
            layer_scale_init=cfg.layer_scale_init,
            drop_path_rate=drop_path_rate,
        )

    def rescale_residual(self, layer_id: int) -> None:
        """BEiT ``fix_init_weight``: divide the residual output projections by sqrt(2·layer_id)."""
        with torch.no_grad():
            self.attn.out_proj.weight.div_(math.sqrt(2.0 * layer_id))
            self.ffn.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        N = x.shape[1]
        a = self.attn(self.attn_norm(x), N, None)
        if self.gamma_attn is not None:
            a = a * self.gamma_attn
        x = x + drop_path(a, self.drop_path_rate, self.training)
        f = self.ffn(x)
        if self.gamma_ffn is not None:
            f = f * self.gamma_ffn
        return x + drop_path(f, self.drop_path_rate, self.training)
