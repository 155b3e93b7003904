"""What the audio objectives share: the visible set of spectrogram patches, patch targets, patch padding,
and a small transformer block with a key mask (decoders and label predictors).

Spectrogram patches are numbered time-major (``t · F/p + f``), as the backbone's audio patch embedding
(``docs/ARCHITECTURE.md``). Which patches are hidden is drawn by the data pipeline (``audio_mask``) or,
when the batch carries none, from an objective's own ``torch.Generator`` — never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdm.objectives.base import check_shape, require
from mdm.objectives.heads import VisionBlock
from mdm.objectives.mae import patchify


def audio_grid(backbone: nn.Module, audio: torch.Tensor, who: str) -> tuple[int, int]:
    """(time patches, frequency patches) of the batch's ``audio`` (B, T, F) for this backbone."""
    cfg = backbone.cfg
    if not cfg.has_audio:
        raise ValueError(f"{who}: the backbone ({cfg.arch}) has no audio expert (model.modalities)")
    if audio.ndim != 3:
        raise ValueError(f"{who}: batch['audio'] must be (B, T, F) log-mel frames, got {tuple(audio.shape)}")
    p = cfg.audio_patch_size
    return audio.shape[1] // p, audio.shape[2] // p


def audio_patches(audio: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, T, F) → (B, P, p·p): spectrogram patches time-major, values of a patch time-major then
    frequency (AudioMAE's ``patchify`` with one channel)."""
    return patchify(audio.unsqueeze(1), patch_size)


def patch_padding(
    audio_padding_mask: torch.Tensor | None, grid: tuple[int, int], patch_size: int
) -> torch.Tensor | None:
    """(B, P) bool, True at patches whose frames are all padding (as the backbone); None without padding."""
    if audio_padding_mask is None or not bool(audio_padding_mask.any()):
        return None
    B = audio_padding_mask.shape[0]
    t, f = grid
    frames = audio_padding_mask[:, : t * patch_size].reshape(B, t, patch_size).all(dim=-1)  # (B, t)
    return frames.unsqueeze(-1).expand(B, t, f).reshape(B, t * f)


def visible_from_mask(mask: torch.Tensor, who: str) -> torch.Tensor:
    """(B, K) long ascending indices of the unmasked patches of a (B, P) bool mask (True = hidden)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{who}: batch['audio_mask'] must be bool, got {mask.dtype}")
    kept = (~mask).sum(dim=1)
    if bool((kept != kept[0]).any()):
        raise ValueError(f"{who}: batch['audio_mask'] must hide the same number of patches in every clip")
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], -1)


def visible_index(
    batch: Mapping[str, Any],
    B: int,
    P: int,
    mask_ratio: float,
    generator: torch.Generator | None,
    device: torch.device,
    who: str,
) -> torch.Tensor:
    """(B, K) indices of the patches the encoder sees: ``audio_visible_index``, else the unmasked patches
    of ``audio_mask``, else ``round(P · (1 - mask_ratio))`` patches drawn with ``generator``."""
    if batch.get("audio_visible_index") is not None:
        vis = batch["audio_visible_index"]
        if vis.ndim != 2 or vis.shape[0] != B or vis.dtype != torch.long:
            raise ValueError(
                f"{who}: batch['audio_visible_index'] must be (B={B}, K) long, got {tuple(vis.shape)} {vis.dtype}"
            )
        return vis
    if batch.get("audio_mask") is not None:
        check_shape(batch["audio_mask"], (B, P), "audio_mask", who)
        return visible_from_mask(batch["audio_mask"], who)
    if generator is None:
        raise ValueError(
            f"{who}: the batch has no audio_mask or audio_visible_index and the objective has no generator "
            "(the audio streams draw audio_mask; or set objective.generator = torch.Generator().manual_seed(...))"
        )
    keep = max(1, int(round(P * (1 - mask_ratio))))
    noise = torch.rand(B, P, generator=generator, device=generator.device).to(device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, K)


def read_audio_batch(batch: Mapping[str, Any], who: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``audio`` (B, T, F) and the optional ``audio_padding_mask`` (B, T), checked."""
    (audio,) = require(batch, ("audio",), who)
    padding = batch.get("audio_padding_mask")
    if padding is not None:
        check_shape(padding, tuple(audio.shape[:2]), "audio_padding_mask", who)
    return audio, padding


class MaskedBlock(VisionBlock):
    """:class:`~mdm.objectives.heads.VisionBlock` whose attention takes a boolean mask (True = allowed),
    broadcastable to (B, H, N, N)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """(B, N, D) → (B, N, D)."""
        a = self.attn(self.attn_norm(x), x.shape[1], mask)
        if self.gamma_attn is not None:
            a = a * self.gamma_attn
        x = x + a
        f = self.ffn(x)
        if self.gamma_ffn is not None:
            f = f * self.gamma_ffn
        return x + f


def key_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) padding → (B, 1, 1, N) attention mask (True = attend), or None."""
    return None if padding is None else (~padding)[:, None, None, :]


def scatter_visible(
    x: torch.Tensor, visible: torch.Tensor, num_patches: int, fill: torch.Tensor
) -> torch.Tensor:
    """Decoder input (B, 1 + P, d): the [CLS] row, then ``fill`` (1, 1, d) at every patch except the
    visible ones, which take their encoder rows ``x[:, 1:]`` (B, K, d)."""
    B, _, d = x.shape
    idx = visible.unsqueeze(-1).expand(-1, -1, d)  # (B, K, d)
    full = fill.to(x.dtype).expand(B, num_patches, d).scatter(1, idx, x[:, 1:])  # (B, P, d)
    return torch.cat([x[:, :1], full], dim=1)
