"""Next-token scorers for caption generation: the full forward, and the same with a key/value cache.

Decoding follows unilm/beit3 (``BEiT3ForCaptioning``, UniLM's "predict the mask"): the text so far is
``[bos] y_1 .. y_{t-1}`` and a [MASK] is appended at position t; the model, under the seq2seq mask
(:func:`~mdm.models.layers.attention.seq2seq_mask`), predicts the token at the [MASK].

:class:`FullScorer` runs the whole ``[image, text, [MASK]]`` sequence through the backbone at every step.
:class:`CachedScorer` computes the image keys/values of every layer once, keeps the keys/values of the
decided text tokens, and each step runs only two tokens through the layers: the token decided last
(whose keys/values join the cache) and the new [MASK] (read, then dropped). Under the seq2seq mask a
token's states depend only on the image and the text before it, so both scorers compute the same numbers.
Routing is the full forward's: the sequence is joint (image + text), so in layers with a VL expert both
the image and the text tokens use it (``Multiway.expert(kind, joint=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdm.models.layers.attention import seq2seq_mask
from mdm.models.layers.embeddings import POS_OFFSET
from mdm.models.layers.multiway import TEXT, VISION, Multiway


def _expert(module: nn.Module, kind: str) -> nn.Module:
    """The module joint input of ``kind`` uses (its VL expert if it has one)."""
    return module.expert(kind, joint=True) if isinstance(module, Multiway) else module


def _layer_step(
    layer: nn.Module,
    x: torch.Tensor,
    kind: str,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One :class:`~mdm.models.multiway.MultiwayBlock` (eval mode) on new tokens of one kind.

    Args:
        layer: the block.
        x: (B, n, D) the new tokens' residual stream.
        kind: their modality.
        past: cached (B, H, L, hd) keys and values they attend to besides themselves.
        mask: bool (n, L + n), True where attention is allowed; None = everything.

    Returns:
        (the block's output (B, n, D), the new tokens' keys and values (B, H, n, hd)).
    """
    attn = layer.attn
    B, n, D = x.shape
    h = _expert(layer.attn_norm, kind)(x)
    qkv = _expert(attn.qkv, kind)(h)  # (B, n, 3D)
    q, k, v = (t.view(B, n, attn.num_heads, attn.head_dim).transpose(1, 2) for t in qkv.split(D, dim=-1))
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, n, hd)
    o = o.transpose(1, 2).reshape(B, n, D)
    if attn.inner_norm is not None:
        o = _expert(attn.inner_norm, kind)(o)
    o = _expert(attn.out_proj, kind)(o)
    x = x + (o if layer.gamma_attn is None else o * layer.gamma_attn)
    f = _expert(layer.ffn, kind)(x)
    return x + (f if layer.gamma_ffn is None else f * layer.gamma_ffn), k, v


class FullScorer:
    """Next-token logits from the full forward of ``[image, text, [MASK]]`` (the reference; O(t) per step).

    Args:
        backbone: the Multiway Transformer.
        head: hidden state (…, D) → logits (…, V).
        image: (B, 3, H, W).
        mask_id: the [MASK] token id.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, image: torch.Tensor, mask_id: int) -> None:
        self.backbone, self.head, self.image, self.mask_id = backbone, head, image, mask_id

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps rows ``index`` of the batch (beam search's surviving hypotheses)."""
        self.image = self.image.index_select(0, index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, t) decided tokens ([bos] first) → (B, V) logits of token t."""
        B, t = tokens.shape
        text = torch.cat([tokens, tokens.new_full((B, 1), self.mask_id)], 1)  # (B, t + 1)
        n_image = 1 + (self.image.shape[-1] // self.backbone.cfg.patch_size) ** 2  # [CLS] + patches
        x = self.backbone(image=self.image, text=text, attn_mask=seq2seq_mask(n_image, t + 1, text.device))
        return self.head(x[:, -1])  # (B, V)


class CachedScorer:
    """:class:`FullScorer` with image keys/values computed once and text keys/values cached.

    Args: as :class:`FullScorer`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, image: torch.Tensor, mask_id: int) -> None:
        if backbone.training:
            raise ValueError(
                "CachedScorer runs the layers in eval mode (no dropout, no drop path): call .eval()"
            )
        self.backbone, self.head, self.mask_id = backbone, head, mask_id
        x = backbone.embed_image(image)  # (B, n_image, D)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in backbone.layers:  # image ↛ text: the image part does not depend on the caption
            x, k, v = _layer_step(layer, x, VISION, None, None)
            self.cache.append((k, v))  # (B, H, n_image, hd)
        self.length = 0  # text tokens in the cache

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps rows ``index`` of the batch (beam search's surviving hypotheses)."""
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """(B, n) ids at text positions start.. → (B, n, D), as ``embed_text``."""
        bb = self.backbone
        bb._check_text_length(start + ids.shape[1])
        pos = bb.text_pos_embed.weight[POS_OFFSET + start : POS_OFFSET + start + ids.shape[1]]
        return bb.text_embed(ids) + pos

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, t) decided tokens → (B, V) logits of token t; only tokens ``[t-1]`` and a [MASK] are run."""
        B, t = tokens.shape
        if t != self.length + 1:
            raise ValueError(f"CachedScorer.step expects one new token: cache holds {self.length}, got {t}")
        ids = torch.cat([tokens[:, -1:], tokens.new_full((B, 1), self.mask_id)], 1)  # (B, 2)
        x = self._embed(ids, t - 1)  # (B, 2, D)
        L = self.cache[0][0].shape[2]
        # the decided token sees the cache and itself; the [MASK] sees the cache, the token and itself
        mask = torch.ones(2, L + 2, dtype=torch.bool, device=x.device)
        mask[0, -1] = False
        for i, layer in enumerate(self.backbone.layers):
            x, k, v = _layer_step(layer, x, TEXT, self.cache[i], mask)
            past_k, past_v = self.cache[i]
            self.cache[i] = (torch.cat([past_k, k[:, :, :1]], 2), torch.cat([past_v, v[:, :, :1]], 2))
        self.length = t
        if self.backbone.norm is not None:
            x = _expert(self.backbone.norm, TEXT)(x)
        return self.head(x[:, -1])  # (B, V)
