"""The Multiway Transformer backbone (VLMo, Bao et al. 2022; BEiT-3, Wang et al. 2023).

One encoder for images, text and image-text pairs, and — with ``"audio"`` in ``ModelConfig.modalities`` —
audio clips and audio-text pairs (an audio expert beside the others, as ONE-PEACE, Wang et al. 2023).
The sequence is ``[image CLS, patches..., text...]`` or ``[audio CLS, spectrogram patches..., text...]``;
which tokens are which is explicit: the :class:`~mdm.models.layers.packing.Layout` built at the embedding
(one entry per modality part, with its kind) is passed down to every layer. Padded parts (text; audio
clips of different lengths) are computed on their real tokens only (``ModelConfig.unpad``, see
:mod:`mdm.models.layers.packing`); the encoder returns 0 at padded positions. With
``ModelConfig.shared_attention=False, vl_ffn_layers=0, subln=True`` the computation is exactly
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
from mdm.models.layers.grad_buffer import BufferedGradEmbedding
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
from mdm.models.layers.packing import Layout, Packing


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
        routing: int | Layout,
        mask: torch.Tensor | None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """(B, N, D) → (B, N, D); ``mask`` as in :class:`MultiwayAttention`.

        Args:
            x: the sequence (B, N, D), or its modality parts as the encoder keeps them between layers
                (dense (B, L_i, D) or packed (n_i, D), see :mod:`mdm.models.layers.packing`).
            routing: ``n_vision`` for a tensor (and for dense ``[vision, text]`` parts), or the parts'
                :class:`Layout`.
            mask: boolean attention mask, True where attention is allowed.

        Returns:
            A tensor for a tensor, parts alike for parts.
        """
        if isinstance(x, torch.Tensor):
            parts, kinds = split_parts(x, int(routing))
            return join_parts(self.forward_parts(parts, Layout.dense(kinds, parts), mask))
        parts = list(x)
        if not isinstance(routing, Layout):
            routing = Layout.dense(part_kinds(len(parts), routing), parts)
        return self.forward_parts(parts, routing, mask)

    def forward_parts(
        self, parts: list[torch.Tensor], layout: Layout, mask: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The layer on modality parts: ``x + attn(norm(x))``, then ``x + ffn(x)``, per part."""
        h = route_parts(self.attn_norm, parts, layout.kinds)
        parts = self._residual(parts, self.attn.forward_parts(h, layout, mask), self.gamma_attn, layout)
        return self._residual(parts, route_parts(self.ffn, parts, layout.kinds), self.gamma_ffn, layout)

    def _residual(
        self,
        xs: list[torch.Tensor],
        branch: list[torch.Tensor],
        gamma: torch.Tensor | None,
        layout: Layout,
    ) -> list[torch.Tensor]:
        """``x + drop_path(gamma * branch)`` per part, with one stochastic-depth draw per sample."""
        scale = None
        if self.training and self.drop_path_rate > 0.0:
            # (B, 1, 1), shared by the parts; a packed part takes its tokens' samples' factors, (n_i, 1)
            scale = drop_path_scale(xs[0], self.drop_path_rate, layout.batch)
        out = []
        for x, b, packing in zip(xs, branch, layout.packings):
            if gamma is not None:
                b = b * gamma
            if scale is not None:
                b = b * (scale if packing is None else packing.per_token(scale.view(-1, 1)))
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
            self.text_embed = BufferedGradEmbedding(cfg.vocab_size, D)  # vocab-sized: see grad_buffer
        if cfg.has_vision:
            self.vision_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
            # fairseq layout: row 0-1 unused, row 2 = [CLS], rows 3.. = patches in raster order.
            self.vision_pos_embed = nn.Embedding(cfg.num_patches + 1 + POS_OFFSET, D)
        if cfg.has_text:
            self.text_pos_embed = nn.Embedding(cfg.max_text_positions, D)
        if cfg.has_audio:
            self.audio_embed = AudioPatchEmbed(cfg.audio_patch_size, D)
            # row 0 = [CLS], rows 1.. = patches time-major (t · F/p + f); AudioMAE's pos_embed layout
            table = audio_pos_table(*cfg.audio_grid(), D) * cfg.audio_pos_scale  # (1 + P, D)
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
        self.unpad = cfg.unpad
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
        if hasattr(self, "audio_embed"):
            # AudioMAE (as MAE) initialises the patch projection like a Linear: xavier-uniform on the
            # flattened (D, 1·p·p) kernel, std ≈ 0.07 at D = 128 instead of 0.02. With 0.02 a patch's
            # content is ~17× smaller than its fixed sine-cosine position (measured on the sound world:
            # across-clip std 0.03 vs 0.54), the tokens are nearly the same for every clip, and a
            # classifier from scratch takes 3× the steps to fit its own training set.
            w = self.audio_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
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
        self._check_text_length(text.shape[1])
        x = self.text_embed(text) + self.text_pos_embed.weight[POS_OFFSET : POS_OFFSET + text.shape[1]]
        if text_padding_mask is not None:
            x = x.masked_fill(text_padding_mask.unsqueeze(-1), 0.0)
        return x

    def embed_text_packed(self, text: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The real tokens of :meth:`embed_text` only, packed: (n_real, D) (the same values)."""
        self._check_text_length(text.shape[1])
        ids = text.reshape(-1).index_select(0, packing.index)  # (n_real,)
        # Same module calls and the same autograd order as embed_text (token lookup first, then the
        # position table read, not called): under ZeRO-3 every rank must fetch the same modules and
        # reduce the same gradients in the same order, whether or not its batch has padding.
        tokens = self.text_embed(ids)
        return tokens + self.text_pos_embed.weight.index_select(0, packing.positions + POS_OFFSET)

    def _check_text_length(self, T: int) -> None:
        if T > self.cfg.max_text_positions - POS_OFFSET:
            raise ValueError(
                f"text length {T} exceeds the position table ({self.cfg.max_text_positions - POS_OFFSET})"
            )

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _attention_mask(layout: Layout, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B, 1, N, N) or (B, 1, 1, N) mask, True where attention is allowed; None for none."""
        mask = layout.key_mask  # (B, 1, 1, N) or None; the layout's own tensor (attention checks identity)
        if attn_mask is not None:
            N = layout.total
            am = attn_mask.to(dtype=torch.bool)
            if am.shape[-2:] != (N, N):
                raise ValueError(f"attn_mask has shape {tuple(am.shape)}, expected (N, N) with N={N}")
            am = am.unsqueeze(0) if am.ndim == 2 else am  # (B|1, N, N)
            am = am.unsqueeze(1)  # (B|1, 1, N, N)
            mask = am if mask is None else (am & mask)
        return mask

    def _embed(
        self,
        image: torch.Tensor | None,
        text: torch.Tensor | None,
        text_padding_mask: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        visible_index: torch.Tensor | None,
        audio: torch.Tensor | None = None,
        audio_padding_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        audio_visible_index: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], Layout]:
        """The embedded modality parts in sequence order and their :class:`Layout`; parts with padding
        (text, audio clips of different lengths) are packed (n_real, D) when the model unpads, the others
        are dense (B, L_i, D)."""
        if text is None and text_padding_mask is not None:
            raise ValueError("text_padding_mask given without text")
        if image is not None and audio is not None:
            raise ValueError("give an image or an audio clip, not both (the sequence has one non-text part)")
        if audio is None and (
            audio_padding_mask is not None or audio_mask is not None or audio_visible_index is not None
        ):
            raise ValueError("audio_padding_mask / audio_mask / audio_visible_index given without audio")
        if image is None and text is None and audio is None:
            raise ValueError("give an image, a text, or both (or an audio clip, with or without a text)")
        kinds, lengths, padding, first = [], [], [], None
        if image is not None:
            first = self.embed_image(image, image_mask, visible_index)  # (B, n_vision, D)
            kinds.append(VISION), lengths.append(first.shape[1]), padding.append(None)
        elif audio is not None:
            first, audio_pad = self.embed_audio(audio, audio_padding_mask, audio_mask, audio_visible_index)
            kinds.append(AUDIO), lengths.append(first.shape[1]), padding.append(audio_pad)  # (B, 1 + P|K)
        if text is not None:
            kinds.append(TEXT), lengths.append(text.shape[1]), padding.append(text_padding_mask)
        B = (first if first is not None else text).shape[0]
        # tracing (ONNX export) records one path for every input: the padded one, whose shapes are static
        unpad = self.unpad and not torch.jit.is_tracing()
        layout = Layout.build(kinds, lengths, B, padding, unpad)
        parts = []
        for kind, packing in zip(layout.kinds, layout.packings):
            if kind != TEXT:
                # image / audio tokens, dense (B, L, D) or the real (non-padded) audio patches (n_real, D)
                parts.append(first if packing is None else packing.pack(first))
            elif packing is not None:
                parts.append(self.embed_text_packed(text, packing))  # (n_real, D)
            else:
                parts.append(self.embed_text(text, text_padding_mask))  # (B, T, D)
        return parts, layout

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
        ``return_hidden`` also returns the output of every layer (before the final norm; 0 at padded
        positions too)."""
        parts, layout = self._embed(
            image,
            text,
            text_padding_mask,
            image_mask,
            visible_index,
            audio,
            audio_padding_mask,
            audio_mask,
            audio_visible_index,
        )
        # The residual stream stays split by modality, padded parts packed (mdm.models.layers.packing).
        mask = self._attention_mask(layout, attn_mask)
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                parts = torch.utils.checkpoint.checkpoint(layer, parts, layout, mask, use_reentrant=False)
            else:
                parts = layer(parts, layout, mask)
            if return_hidden:
                hidden.append(self._output(parts, layout))
        if self.norm is not None:
            parts = route_parts(self.norm, parts, layout.kinds)
        x = self._output(parts, layout)  # (B, N, D)
        return (x, hidden) if return_hidden else x

    @staticmethod
    def _output(parts: list[torch.Tensor], layout: Layout) -> torch.Tensor:
        """The parts joined into the padded sequence (B, N, D), 0 at every padded position."""
        return join_parts(layout.zero_padding(layout.to_padded(parts)))

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
