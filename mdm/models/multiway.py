"""The Multiway Transformer backbone (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

One encoder for images, text and image-text pairs, and — with ``"audio"`` in ``ModelConfig.modalities`` —
audio clips and audio-text pairs (an audio expert beside the others, as ONE-PEACE, Wang et al. 2023).
The sequence is ``[image CLS, patches..., text...]`` or ``[audio CLS, spectrogram patches..., text...]``;
which tokens are which is the explicit routing (``n_vision`` and the parts' ``kinds``) passed down to
every layer.
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
from mdm.models.layers.embeddings import (
    POS_OFFSET,
    AudioPatchEmbed,
    PatchEmbed,
    audio_pos_table,
    resize_audio_pos_table,
    resize_vision_pos_table,
)
from mdm.models.layers.ffn import FeedForward, drop_path_scale
from mdm.models.layers.multiway import (
    AUDIO,
    TEXT,
    VISION,
    Multiway,
    join_parts,
    maybe_multiway,
    ordered_kinds,
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
        kinds = ordered_kinds(cfg.modalities)
        self.attn_norm = maybe_multiway(lambda: nn.LayerNorm(dim, eps=eps), multiway_attn, kinds=kinds)
        self.attn = MultiwayAttention(
            dim, cfg.num_heads, multiway_attn, cfg.qkv_bias, cfg.subln, eps, cfg.attn_drop, kinds=kinds
        )
        self.ffn = Multiway(
            lambda: FeedForward(dim, cfg.ffn_dim, cfg.subln, eps), with_vl=with_vl_ffn, kinds=kinds
        )
        self.drop_path_rate = drop_path_rate
        if cfg.layer_scale_init > 0:
            self.gamma_attn = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
            self.gamma_ffn = nn.Parameter(torch.full((dim,), cfg.layer_scale_init))
        else:
            self.gamma_attn = self.gamma_ffn = None

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor],
        n_vision: int,
        mask: torch.Tensor | None,
        kinds: tuple[str, ...] | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """(B, N, D) → (B, N, D); ``mask`` as in :class:`MultiwayAttention`.

        ``x`` may also be the sequence's modality parts ``[vision (B, n_vision, D), text (B, T, D)]`` (or
        one of them), as the encoder keeps them between layers; the result is then parts alike. ``kinds``
        names the parts' modalities explicitly (needed for audio: ``(AUDIO,)`` or ``(AUDIO, TEXT)``);
        without it they follow from ``n_vision``.
        """
        if isinstance(x, torch.Tensor):
            parts, split_kinds = split_parts(x, n_vision)
            if kinds is not None and len(kinds) == len(parts):
                split_kinds = tuple(kinds)
            return join_parts(self.forward_parts(parts, split_kinds, mask))
        return self.forward_parts(list(x), kinds or part_kinds(len(x), n_vision), mask)

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
        if cfg.has_text:
            self.text_embed = nn.Embedding(cfg.vocab_size, D)
        if cfg.has_vision:
            self.vision_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
            # fairseq layout: row 0-1 unused, row 2 = [CLS], rows 3.. = patches in raster order.
            self.vision_pos_embed = nn.Embedding(cfg.num_patches + 1 + POS_OFFSET, D)
        if cfg.has_text:
            self.text_pos_embed = nn.Embedding(cfg.max_text_positions, D)
        if cfg.has_audio:
            self.audio_embed = AudioPatchEmbed(cfg.audio_patch_size, D)
            # row 0 = [CLS], rows 1.. = patches time-major (t · F/p + f); AudioMAE's pos_embed layout
            table = audio_pos_table(*cfg.audio_grid(), D)  # (1 + P, D)
            if cfg.audio_pos_trainable:
                self.audio_pos_embed = nn.Parameter(table)
            else:
                self.register_buffer("audio_pos_embed", table)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_vl = cfg.depth - cfg.vl_ffn_layers
        self.layers = nn.ModuleList(
            MultiwayBlock(cfg, rates[i], with_vl_ffn=i >= first_vl) for i in range(cfg.depth)
        )
        kinds = ordered_kinds(cfg.modalities)
        self.norm = (
            Multiway(lambda: nn.LayerNorm(D, eps=cfg.norm_eps), kinds=kinds) if cfg.normalize_output else None
        )
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
        for embed in ("vision_embed", "audio_embed"):
            if hasattr(self, embed):
                for name in ("cls_token", "mask_token"):
                    nn.init.trunc_normal_(getattr(getattr(self, embed), name), std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                scale = (2.0 * (i + 1)) ** -0.5
                for name, p in layer.named_parameters():
                    if name.endswith("weight") and ("out_proj" in name or "fc2" in name):
                        p.mul_(scale)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides biases and norms, which timm exempts)."""
        names = {
            "vision_embed.cls_token",
            "vision_embed.mask_token",
            "vision_pos_embed.weight",
            "text_pos_embed.weight",
            "audio_embed.cls_token",
            "audio_embed.mask_token",
            "audio_pos_embed",
        }
        params = {n for n, _ in self.named_parameters()}
        return names & params

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (``param_groups_layer_decay``)."""
        return dict(
            # non-capturing: timm turns every captured group into a (numeric) ordinal
            stem=r"^(?:text_embed|vision_embed|vision_pos_embed|text_pos_embed|audio_embed|audio_pos_embed)",
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

    def _audio_pos(self, time_patches: int) -> torch.Tensor:
        table = self.audio_pos_embed
        if table.shape[0] != 1 + time_patches * self.cfg.audio_grid()[1]:
            table = resize_audio_pos_table(table, self.cfg.audio_grid()[1], time_patches)
        return table  # (1 + t·f, D)

    def embed_audio(
        self,
        audio: torch.Tensor,
        audio_padding_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        audio_visible_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Audio tokens with positions and the padding of those tokens.

        Args:
            audio: (B, T, F) normalised log-mel filterbanks; T a multiple of the patch size, F =
                ``audio_mel_bins``.
            audio_padding_mask: (B, T) bool, True at padded frames.
            audio_mask: (B, P) bool, patches replaced by the audio [MASK] (BEATs-style, kept in place).
            audio_visible_index: (B, K) long, keep only these patches (MAE-style encoder).

        Returns:
            ``(x, padding)``: x (B, 1 + P, D) or (B, 1 + K, D), [CLS] first; padding (B, 1 + P|K) bool,
            True at patches made only of padded frames (the [CLS] never is), or None when nothing is padded.
        """
        B, T, Fr = audio.shape
        p = self.cfg.audio_patch_size
        if T % p or Fr != self.cfg.audio_mel_bins:
            raise ValueError(
                f"audio of shape {tuple(audio.shape)}: expected (B, T, {self.cfg.audio_mel_bins}) with T a "
                f"multiple of the patch size {p}"
            )
        t_patches, f_patches = T // p, Fr // p
        x = self.audio_embed(audio, audio_mask)  # (B, 1 + P, D)
        x = x + self._audio_pos(t_patches).to(x.dtype)
        padding = None
        if audio_padding_mask is not None and bool(audio_padding_mask.any()):
            if tuple(audio_padding_mask.shape) != (B, T):
                raise ValueError(
                    f"audio_padding_mask has shape {tuple(audio_padding_mask.shape)}, expected {(B, T)}"
                )
            # a patch is padding when all its frames are (BEATs' forward_padding_mask), time-major like x
            frames = audio_padding_mask.view(B, t_patches, p).all(dim=-1)  # (B, t)
            padding = frames.unsqueeze(-1).expand(B, t_patches, f_patches).reshape(B, -1)  # (B, P)
            padding = torch.cat([padding.new_zeros(B, 1), padding], dim=1)  # (B, 1 + P)
        if audio_visible_index is not None:
            idx = audio_visible_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, D)
            x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, idx)], dim=1)  # (B, 1 + K, D)
            if padding is not None:
                padding = torch.cat([padding[:, :1], torch.gather(padding[:, 1:], 1, audio_visible_index)], 1)
        return x, padding

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
        first_padding: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Boolean (B, 1, N, N) or (B, 1, 1, N) mask, True where attention is allowed; None for none.

        ``first_padding`` (B, n_vision) marks padded tokens of the first part (padded audio patches)."""
        mask = None
        text_pad = text_padding_mask is not None and bool(text_padding_mask.any())
        if text_pad or first_padding is not None:
            keeps = []
            if n_vision > 0:
                keeps.append(
                    ~first_padding
                    if first_padding is not None
                    else torch.ones(B, n_vision, dtype=torch.bool, device=device)
                )
            if N > n_vision:
                text_keep = (
                    ~text_padding_mask
                    if text_padding_mask is not None
                    else torch.ones(B, N - n_vision, dtype=torch.bool, device=device)
                )
                keeps.append(text_keep)  # (B, T)
            keep = torch.cat(keeps, dim=1)  # (B, N)
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
        *,
        audio: torch.Tensor | None = None,
        audio_padding_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        audio_visible_index: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encodes image, audio, text, image+text or audio+text; see :meth:`forward`. With
        ``return_hidden`` also returns the output of every layer (before the final norm)."""
        parts: list[torch.Tensor] = []
        kinds: list[str] = []
        first_padding = None
        if image is not None and audio is not None:
            raise ValueError("give an image or an audio clip, not both (the sequence has one non-text part)")
        if image is not None:
            parts.append(self.embed_image(image, image_mask, visible_index))  # (B, n_vision, D)
            kinds.append(VISION)
        elif audio is not None:
            x, first_padding = self.embed_audio(audio, audio_padding_mask, audio_mask, audio_visible_index)
            parts.append(x)  # (B, 1 + P|K, D)
            kinds.append(AUDIO)
        elif audio_padding_mask is not None or audio_mask is not None or audio_visible_index is not None:
            raise ValueError("audio_padding_mask / audio_mask / audio_visible_index given without audio")
        if text is not None:
            parts.append(self.embed_text(text, text_padding_mask))  # (B, T, D)
            kinds.append(TEXT)
        elif text_padding_mask is not None:
            raise ValueError("text_padding_mask given without text")
        if not parts:
            raise ValueError("give an image, a text, or both (or an audio clip, with or without a text)")
        # The residual stream stays split by modality (see mdm.models.layers.multiway); joined at the end.
        B, N = parts[0].shape[0], sum(p.shape[1] for p in parts)
        n_vision = parts[0].shape[1] if kinds[0] != TEXT else 0
        mask = self._attention_mask(
            B, n_vision, N, text_padding_mask, attn_mask, parts[0].device, first_padding
        )
        route = tuple(kinds)
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                parts = torch.utils.checkpoint.checkpoint(
                    layer, parts, n_vision, mask, route, use_reentrant=False
                )
            else:
                parts = layer(parts, n_vision, mask, route)
            if return_hidden:
                hidden.append(join_parts(parts))
        if self.norm is not None:
            parts = route_parts(self.norm, parts, route)
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
        *,
        audio: torch.Tensor | None = None,
        audio_padding_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        audio_visible_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder output (B, N, D): image or audio tokens ([CLS] first) then text tokens.

        Args:
            image: (B, C, H, W) normalised pixels, or None.
            text: (B, T) token ids, or None.
            text_padding_mask: (B, T) bool, True at padding.
            attn_mask: (N, N) or (B, N, N) bool, True where attention is allowed (the
                ``scaled_dot_product_attention`` convention), e.g. a captioning mask.
            image_mask: (B, P) bool, patches replaced by the [MASK] embedding (masked image modeling).
            visible_index: (B, K) long, encode only these patches (MAE).
            audio: (B, T_a, F) normalised log-mel filterbanks (models with the audio expert), or None.
            audio_padding_mask: (B, T_a) bool, True at padded frames; padded patches are not attended to.
            audio_mask: (B, P) bool, spectrogram patches replaced by the audio [MASK] (BEiT-style).
            audio_visible_index: (B, K) long, encode only these spectrogram patches (AudioMAE, BEATs).
        """
        return self.forward_features(  # type: ignore[return-value]
            image,
            text,
            text_padding_mask,
            attn_mask,
            image_mask,
            visible_index,
            audio=audio,
            audio_padding_mask=audio_padding_mask,
            audio_mask=audio_mask,
            audio_visible_index=audio_visible_index,
        )
