"""The Multiway Transformer backbone (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

One encoder for images, text and image-text pairs. The sequence is ``[image CLS, patches..., text...]``;
which tokens are vision and which text is the explicit argument ``n_vision`` passed down to every layer.
With ``ModelConfig.shared_attention=False, vl_ffn_layers=0, subln=True`` the computation is exactly
torchscale's ``BEiT3`` (checked by ``tests/test_parity_torchscale.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from mdm.models.config import ModelConfig
from mdm.models.layers.attention import MultiwayAttention
from mdm.models.layers.embeddings import POS_OFFSET, PatchEmbed, resize_vision_pos_table
from mdm.models.layers.ffn import FeedForward, drop_path_scale
from mdm.models.layers.multiway import (
    TEXT,
    VISION,
    Multiway,
    join_parts,
    maybe_multiway,
    part_kinds,
    route_parts,
    split_parts,
)


class MultiwayBlock(nn.Module):
    """Pre-norm layer: shared or multiway attention, then a V/L (and optionally VL) FFN expert.

    Args:
        cfg: the model config.
        drop_path_rate: stochastic depth of this layer.
        with_vl_ffn: this layer has a vision-language FFN that joint input uses.
    """

    def __init__(self, cfg: ModelConfig, drop_path_rate: float, with_vl_ffn: bool) -> None:
        super().__init__()
        multiway_attn = not cfg.shared_attention
        dim, eps = cfg.embed_dim, cfg.norm_eps
        self.attn_norm = maybe_multiway(lambda: nn.LayerNorm(dim, eps=eps), multiway_attn)
        self.attn = MultiwayAttention(
            dim, cfg.num_heads, multiway_attn, cfg.qkv_bias, cfg.subln, eps, cfg.attn_drop
        )
        self.ffn = Multiway(lambda: FeedForward(dim, cfg.ffn_dim, cfg.subln, eps), with_vl=with_vl_ffn)
        self.drop_path_rate = drop_path_rate
        if cfg.layer_scale_init > 0:
            self.gamma_attn = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
            self.gamma_ffn = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        else:
            self.gamma_attn = self.gamma_ffn = None

    def forward(
        self, x: torch.Tensor | list[torch.Tensor], n_vision: int, mask: torch.Tensor | None
    ) -> torch.Tensor | list[torch.Tensor]:
        """(B, N, D) → (B, N, D); ``mask`` as in :class:`MultiwayAttention`.

        ``x`` may also be the sequence's modality parts ``[vision (B, n_vision, D), text (B, T, D)]`` (or
        one of them), as the encoder keeps them between layers; the result is then parts alike.
        """
        if isinstance(x, torch.Tensor):
            parts, kinds = split_parts(x, n_vision)
            return join_parts(self.forward_parts(parts, kinds, mask))
        return self.forward_parts(list(x), part_kinds(len(x), n_vision), mask)

    def forward_parts(
        self, parts: list[torch.Tensor], kinds: tuple[str, ...], mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The layer on modality parts: ``x + attn(norm(x))``, then ``x + ffn(x)``, per part."""
        h = route_parts(self.attn_norm, parts, kinds)
        parts = self._residual(parts, self.attn.forward_parts(h, kinds, mask), self.gamma_attn)
        return self._residual(parts, route_parts(self.ffn, parts, kinds), self.gamma_ffn)

    def _residual(
        self, xs: list[torch.Tensor], branch: list[torch.Tensor], gamma: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """``x + drop_path(gamma * branch)`` per part, with one stochastic-depth draw per sample."""
        scale = None
        if self.training and self.drop_path_rate > 0.0:
            scale = drop_path_scale(xs[0], self.drop_path_rate)  # (B, 1, 1), shared by the parts
        out = []
        for x, b in zip(xs, branch):
            if gamma is not None:
                b = b * gamma
            if scale is not None:
                b = b * scale
            out.append(x + b)
        return out


class MultiwayTransformer(nn.Module):
    """Multiway Transformer encoder.

    Build it with :func:`mdm.models.create_model` or from a :class:`ModelConfig`.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.vision_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        # fairseq layout: row 0-1 unused, row 2 = [CLS], rows 3.. = patches in raster order.
        self.vision_pos_embed = nn.Embedding(cfg.num_patches + 1 + POS_OFFSET, D)
        self.text_pos_embed = nn.Embedding(cfg.max_text_positions, D)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_vl = cfg.depth - cfg.vl_ffn_layers
        self.layers = nn.ModuleList(
            MultiwayBlock(cfg, rates[i], with_vl_ffn=i >= first_vl) for i in range(cfg.depth)
        )
        self.norm = Multiway(lambda: nn.LayerNorm(D, eps=cfg.norm_eps)) if cfg.normalize_output else None
        self.grad_checkpointing = cfg.grad_checkpointing
        self.init_weights()

    # ------------------------------------------------------------------ init & timm-style API
    def init_weights(self) -> None:
        """BEiT-style init: truncated normal (std 0.02) for Linear, Conv and embeddings; LayerNorm 1/0;
        residual output projections of layer l scaled by 1/sqrt(2l) (BEiT ``fix_init_weight``)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name in ("cls_token", "mask_token"):
            nn.init.trunc_normal_(getattr(self.vision_embed, name), std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                scale = (2.0 * (i + 1)) ** -0.5
                for name, p in layer.named_parameters():
                    if name.endswith("weight") and ("out_proj" in name or "fc2" in name):
                        p.mul_(scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides biases and norms, which timm exempts)."""
        return {
            "vision_embed.cls_token",
            "vision_embed.mask_token",
            "vision_pos_embed.weight",
            "text_pos_embed.weight",
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (``param_groups_layer_decay``)."""
        return dict(
            # non-capturing: timm turns every captured group into a (numeric) ordinal
            stem=r"^(?:text_embed|vision_embed|vision_pos_embed|text_pos_embed)",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (saves activation memory)."""
        self.grad_checkpointing = enable

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ embeddings
    def _vision_pos(self, grid: int) -> torch.Tensor:
        table = self.vision_pos_embed.weight
        if grid != self.cfg.grid_size:  # another resolution: interpolate on the fly
            table = resize_vision_pos_table(table, grid)
        return table[POS_OFFSET:]  # (1 + g*g, D)

    def embed_image(
        self,
        image: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        visible_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image tokens with positions, (B, 1 + P, D) or (B, 1 + K, D) when ``visible_index`` is given.

        Args:
            image: (B, C, H, W) normalised pixels; H, W multiples of the patch size (square grid).
            image_mask: (B, P) bool, patches replaced by [MASK] (BEiT-style MIM).
            visible_index: (B, K) long, keep only these patches (MAE-style encoder).
        """
        B, _, H, W = image.shape
        p = self.cfg.patch_size
        if H % p or W % p or H != W:
            raise ValueError(f"image size {H}x{W} must be square and a multiple of the patch size {p}")
        x = self.vision_embed(image, image_mask)  # (B, 1+P, D)
        x = x + self._vision_pos(H // p).to(x.dtype)
        if visible_index is not None:
            idx = visible_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, D)
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, idx)], dim=1)
        return x

    def embed_text(self, text: torch.Tensor, text_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text tokens with positions, (B, T, D); padded positions are zeroed (as torchscale)."""
        T = text.shape[1]
        if T > self.cfg.max_text_positions - POS_OFFSET:
            raise ValueError(
                f"text length {T} exceeds the position table ({self.cfg.max_text_positions - POS_OFFSET})"
            )
        x = self.text_embed(text) + self.text_pos_embed.weight[POS_OFFSET : POS_OFFSET + T]
        if text_padding_mask is not None:
            x = x.masked_fill(text_padding_mask.unsqueeze(-1), 0.0)
        return x

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _attention_mask(
        B: int,
        n_vision: int,
        N: int,
        text_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Boolean (B, 1, N, N) or (B, 1, 1, N) mask, True where attention is allowed; None for none."""
        mask = None
        if text_padding_mask is not None and text_padding_mask.any():
            keep = ~text_padding_mask  # (B, T)
            if n_vision > 0:
                keep = torch.cat([keep.new_ones(B, n_vision), keep], dim=1)  # (B, N)
            mask = keep[:, None, None, :]  # (B, 1, 1, N)
        if attn_mask is not None:
            am = attn_mask.to(device=device, dtype=torch.bool)
            if am.shape[-2:] != (N, N):
                raise ValueError(f"attn_mask has shape {tuple(am.shape)}, expected (N, N) with N={N}")
            am = am.unsqueeze(0) if am.ndim == 2 else am  # (B|1, N, N)
            am = am.unsqueeze(1)  # (B|1, 1, N, N)
            mask = am if mask is None else (am & mask)
        return mask

    def forward_features(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        visible_index: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encodes image, text or both; see :meth:`forward`. With ``return_hidden`` also returns the
        output of every layer (before the final norm)."""
        parts: list[torch.Tensor] = []
        kinds: list[str] = []
        if image is not None:
            parts.append(self.embed_image(image, image_mask, visible_index))  # (B, n_vision, D)
            kinds.append(VISION)
        if text is not None:
            parts.append(self.embed_text(text, text_padding_mask))  # (B, T, D)
            kinds.append(TEXT)
        elif text_padding_mask is not None:
            raise ValueError("text_padding_mask given without text")
        if not parts:
            raise ValueError("give an image, a text, or both")
        # The residual stream stays split by modality (see mdm.models.layers.multiway); joined at the end.
        B, N = parts[0].shape[0], sum(p.shape[1] for p in parts)
        n_vision = parts[0].shape[1] if image is not None else 0
        mask = self._attention_mask(B, n_vision, N, text_padding_mask, attn_mask, parts[0].device)
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                parts = torch.utils.checkpoint.checkpoint(layer, parts, n_vision, mask, use_reentrant=False)
            else:
                parts = layer(parts, n_vision, mask)
            if return_hidden:
                hidden.append(join_parts(parts))
        if self.norm is not None:
            parts = route_parts(self.norm, parts, tuple(kinds))
        x = join_parts(parts)  # (B, N, D)
        return (x, hidden) if return_hidden else x

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        visible_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder output (B, N, D): image tokens ([CLS] first) then text tokens.

        Args:
            image: (B, C, H, W) normalised pixels, or None.
            text: (B, T) token ids, or None.
            text_padding_mask: (B, T) bool, True at padding.
            attn_mask: (N, N) or (B, N, N) bool, True where attention is allowed (the
                ``scaled_dot_product_attention`` convention), e.g. a captioning mask.
            image_mask: (B, P) bool, patches replaced by the [MASK] embedding (masked image modeling).
            visible_index: (B, K) long, encode only these patches (MAE).
        """
        return self.forward_features(image, text, text_padding_mask, attn_mask, image_mask, visible_index)  # type: ignore[return-value]
