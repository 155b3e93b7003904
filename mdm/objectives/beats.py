"""BEATs masked acoustic-token prediction (Chen et al., 2023, "BEATs: Audio Pre-Training with Acoustic
Tokenizers", §3.3), on the audio stream.

75 % of the spectrogram patches are hidden (``audio_mask`` from the data pipeline) and dropped from the
encoder, which sees only the visible ones (the MAE speed-up the paper adopts). A light Transformer
label predictor takes the visible outputs at their positions and zeros at the hidden ones (the paper's
``{r_t : t ∉ M} ∪ {0 : t ∈ M}``), adds fixed sine-cosine positions (BEATs' own encoder carries
convolutional positions into the predictor; ours gets explicit ones), and predicts the acoustic token
of every hidden patch: cross-entropy against the codes of a frozen acoustic tokenizer
(:mod:`mdm.tokenizers.acoustic`; random projection in iteration 1, self-distilled after).

The paper calls the predictor light and Transformer-based without a depth in what we could check (the
pretraining code is not released); ``beats_predictor_depth`` defaults to 3, like the tokenizer's
estimator, and is a config key.

The acoustic codes come in the batch as ``audio_tokens`` (B, P) long — precomputed, or filled by the
engine with :func:`fill_audio_tokens` before the model runs (the tokenizer stays outside the optimizer
and outside DDP/ZeRO, as the visual tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from mdm.models.config import ModelConfig
from mdm.models.layers.embeddings import audio_pos_table
from mdm.objectives.audio_common import (
    MaskedBlock,
    audio_grid,
    key_mask,
    patch_padding,
    read_audio_batch,
    scatter_visible,
    visible_index,
)
from mdm.objectives.base import Objective, check_shape, entries, masked_cross_entropy, require
from mdm.objectives.heads import trunc_normal_init


class AcousticTokenizer(Protocol):
    """What :func:`fill_audio_tokens` needs from a tokenizer."""

    def encode(self, audio: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, F) normalised fbank → (B, P) long codes, time-major."""
        ...


def fill_audio_tokens(batch: Mapping[str, Any], tokenizer: AcousticTokenizer) -> dict[str, Any]:
    """A copy of ``batch`` with ``audio_tokens`` (B, P) from the frozen ``tokenizer`` (under no_grad).

    Batches that already carry ``audio_tokens`` are returned unchanged (as a copy).

    Raises:
        KeyError: the batch has no ``audio``.
        ValueError: the codes are not (B, P) integers.
    """
    out = dict(batch)
    if out.get("audio_tokens") is not None:
        return out
    if out.get("audio") is None:
        raise KeyError(f"fill_audio_tokens: batch has no 'audio' (keys: {sorted(out)})")
    audio = out["audio"]
    with torch.no_grad():
        codes = tokenizer.encode(audio, out.get("audio_padding_mask"))
    if codes.ndim != 2 or codes.shape[0] != audio.shape[0] or codes.is_floating_point():
        raise ValueError(
            f"fill_audio_tokens: tokenizer.encode(batch['audio']) returned {tuple(codes.shape)} {codes.dtype}, "
            f"expected (B={audio.shape[0]}, P) integer codes"
        )
    out["audio_tokens"] = codes.long()
    return out


class LabelPredictor(nn.Module):
    """BEATs' label predictor: encoder rows at the visible patches, zeros at the hidden ones → logits.

    Args:
        embed_dim: backbone width.
        codebook_size: acoustic tokens (1024 in BEATs).
        dim: predictor width.
        depth: predictor blocks.
        num_heads: predictor heads.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self, embed_dim: int, codebook_size: int, dim: int, depth: int, num_heads: int, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.blocks = nn.ModuleList(
            MaskedBlock(dim, num_heads, 4 * dim, norm_eps=norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, codebook_size)
        trunc_normal_init(self)
        self.register_buffer("zero", torch.zeros(1, 1, dim), persistent=False)

    def forward(
        self,
        latent: torch.Tensor,
        visible: torch.Tensor,
        grid: tuple[int, int],
        select: torch.Tensor,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (M, codebook_size) of the patches under ``select`` (B, P) bool, row-major over (b, p).

        Args:
            latent: (B, 1 + K, D) encoder output ([CLS] first).
            visible: (B, K) which patch each latent row is.
            grid: (time, frequency) patches.
            select: (B, P) bool, the patches to classify (hidden, non-padded).
            padding: (B, P) bool, padded patches (not attended to).
        """
        t, f = grid
        x = scatter_visible(self.embed(latent), visible, t * f, self.zero)  # (B, 1 + P, d)
        x = x + audio_pos_table(t, f, x.shape[-1]).to(x)
        pad = None if padding is None else torch.cat([padding.new_zeros(x.shape[0], 1), padding], 1)
        mask = key_mask(pad)
        for block in self.blocks:
            x = block(x, mask)
        selected = x[:, 1:][select]  # (M, d), gathered before the vocabulary-sized matmul
        return self.head(self.norm(selected))


class MaskedAcousticModeling(Objective):
    """BEATs' masked audio modeling: returns ``beats_loss``, ``beats_acc``, ``beats_count``.

    Args:
        cfg: the backbone's config.
        codebook_size: acoustic tokens of the frozen tokenizer.
        predictor_dim: predictor width (0: the backbone's).
        predictor_depth: predictor blocks.
        predictor_heads: predictor heads (0: the backbone's).
        mask_ratio: fraction hidden when the batch carries no ``audio_mask`` (0.75 in BEATs).
    """

    name = "beats"
    stream = "audio"
    #: The batch must carry ``audio_tokens`` (acoustic codes of the frozen tokenizer).
    needs_audio_tokens = True

    def __init__(
        self,
        cfg: ModelConfig,
        codebook_size: int = 1024,
        predictor_dim: int = 0,
        predictor_depth: int = 3,
        predictor_heads: int = 0,
        mask_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if not cfg.has_audio:
            raise ValueError(f"beats: the backbone ({cfg.arch}) has no audio expert; use an audio preset")
        self.patch_size, self.mask_ratio, self.codebook_size = cfg.audio_patch_size, mask_ratio, codebook_size
        self.predictor = LabelPredictor(
            cfg.embed_dim,
            codebook_size,
            predictor_dim or cfg.embed_dim,
            predictor_depth,
            predictor_heads or cfg.num_heads,
            cfg.norm_eps,
        )
        #: Source of the hidden set when the batch has no ``audio_mask``; set and seed it yourself.
        self.generator: torch.Generator | None = None

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode the visible patches, predict the acoustic tokens of the hidden ones.

        Args:
            backbone: a Multiway Transformer with the audio expert.
            batch: ``audio`` (B, T, F), ``audio_tokens`` (B, P) long, ``audio_mask`` (B, P) bool (or
                ``audio_visible_index``), optional ``audio_padding_mask`` (B, T).
        """
        audio, padding = read_audio_batch(batch, self.name)
        (tokens,) = require(batch, ("audio_tokens",), self.name)
        grid = audio_grid(backbone, audio, self.name)
        B, P = audio.shape[0], grid[0] * grid[1]
        check_shape(tokens, (B, P), "audio_tokens", self.name)
        vis = visible_index(batch, B, P, self.mask_ratio, self.generator, audio.device, self.name)
        latent = backbone(audio=audio, audio_padding_mask=padding, audio_visible_index=vis)  # (B, 1 + K, D)
        pad = patch_padding(padding, grid, self.patch_size)
        hidden = torch.ones(B, P, dtype=torch.bool, device=audio.device).scatter(1, vis, False)
        if pad is not None:
            hidden &= ~pad
        logits = self.predictor(latent, vis, grid, hidden, pad)  # (M, K)
        return entries(self.name, *masked_cross_entropy(logits, tokens[hidden]))
