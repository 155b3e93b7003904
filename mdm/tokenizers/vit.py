"""The BEiT-style Vision Transformer used as VQ-KD encoder and decoder (Peng et al., 2022, BEiT v2).

Layout of unilm ``beit2/modeling_finetune.py::VisionTransformer`` with ``use_mean_pooling=True`` and
no classifier: pre-LN blocks (eps 1e-6), a bias-free ``qkv`` projection with separate ``q_bias`` and
``v_bias`` (the key bias is fixed at zero), GELU MLP, learned absolute positions including a CLS slot,
and ``fc_norm`` applied to the patch tokens. Parameter names match unilm's, so a VQ-KD checkpoint maps
onto :class:`~mdm.tokenizers.vqkd.VQKD` by renaming only the task layers and the quantizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mdm.tokenizers.config import ViTConfig

__all__ = ["ViT"]

_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN transformer block without layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: (B, C, H, W) → (B, H/p · W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Images or feature maps → patch features (B, P, D).

    Args:
        cfg: width, depth, heads.
        img_size: input side.
        patch_size: patch side.
        in_chans: input channels (3 for images, the code dimension for the VQ-KD decoder).
    """

    def __init__(self, cfg: ViTConfig, img_size: int, patch_size: int, in_chans: int = 3) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.fc_norm = nn.LayerNorm(dim, eps=_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # BEiT's depth rescaling of the residual output projections
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, P, D)
        if x.shape[1] != self.grid**2:
            raise ValueError(
                f"expected {self.grid}x{self.grid} patches, got {x.shape[1]} (input size mismatch)"
            )
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + P, D)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])  # (B, P, D)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}
