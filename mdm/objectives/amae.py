"""AudioMAE (Huang et al., 2022, "Masked Autoencoders that Listen"; reference facebookresearch/AudioMAE
``models_mae.py``): masked spectrogram patches reconstructed by a light decoder, on the audio stream.

The backbone encodes only the visible patches (``audio_visible_index``; 80 % hidden by default, drawn by
the data pipeline as ``audio_mask``: unstructured, or time / frequency / time-frequency masking). The
decoder embeds them (Linear D → d), puts a learned mask token at every hidden patch, adds fixed 2-D
sine-cosine positions over the time × frequency grid, runs a few blocks and predicts the 16 × 16
values of every patch. The loss is the MSE over the hidden patches against per-patch normalised
targets (``norm_pix_loss``: each patch minus its mean over sqrt(unbiased var + 1e-6), as AudioMAE).
Patches made only of padded frames count neither as targets nor as keys.

Decoder attention (``amae_decoder_attention``):

* ``global`` — plain transformer blocks over ``[CLS] + all patches`` (AudioMAE ``decoder_mode=0``).
* ``local`` — the paper's best variant (``decoder_mode=1``): attention inside non-overlapping
  time × frequency windows (4 × 4 patches), every other block shifted by half a window along time
  (AudioMAE shifts (2, 0)), with Swin's region mask so that the cyclic shift never lets a patch attend
  across the clip's ends; the [CLS] row is dropped, as AudioMAE does. AudioMAE uses timm's
  ``SwinTransformerBlock`` (with a relative position bias inside each window) and 16 blocks; ours are
  the same pre-LN blocks as ``global`` with the decoder's absolute positions only, and the depth is
  ``amae_decoder_depth``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdm.models.config import ModelConfig
from mdm.models.layers.embeddings import audio_pos_table
from mdm.objectives.audio_common import (
    MaskedBlock,
    audio_grid,
    audio_patches,
    key_mask,
    patch_padding,
    read_audio_batch,
    scatter_visible,
    visible_index,
)
from mdm.objectives.base import Objective
from mdm.objectives.heads import trunc_normal_init
from mdm.objectives.mae import normalize_patches


def window_regions(t: int, f: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Region id of every patch of a cyclically shifted (t, f) grid, (t, f) long (Swin's shifted-window
    mask): patches of one window attend to each other only within the same region."""

    def axis(n: int, w: int, s: int) -> torch.Tensor:
        ids = torch.zeros(n, dtype=torch.long)
        if s > 0:
            ids[n - w : n - s] = 1
            ids[n - s :] = 2
        return ids

    return axis(t, window[0], shift[0])[:, None] * 3 + axis(f, window[1], shift[1])[None, :]


def to_windows(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, t, f, ...) → (B · nW, wt · wf, ...): non-overlapping windows, row-major over the grid."""
    B, t, f = x.shape[:3]
    wt, wf = window
    rest = x.shape[3:]
    x = x.reshape(B, t // wt, wt, f // wf, wf, *rest)
    x = x.transpose(2, 3)  # (B, t/wt, f/wf, wt, wf, ...)
    return x.reshape(B * (t // wt) * (f // wf), wt * wf, *rest)


def from_windows(x: torch.Tensor, B: int, t: int, f: int, window: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B · nW, wt · wf, d) → (B, t, f, d)."""
    wt, wf = window
    d = x.shape[-1]
    x = x.reshape(B, t // wt, f // wf, wt, wf, d).transpose(2, 3)  # (B, t/wt, wt, f/wf, wf, d)
    return x.reshape(B, t, f, d)


class AudioMAEDecoder(nn.Module):
    """AudioMAE's decoder: visible latents + mask tokens → the values of every spectrogram patch.

    Args:
        embed_dim: backbone width (input).
        patch_values: p·p values predicted per patch.
        freq_patches: patches along frequency (F/p, 8 for 128 mel bins).
        dim: decoder width (512 in AudioMAE).
        depth: decoder blocks (8 in AudioMAE's global decoder).
        num_heads: decoder heads (16 in AudioMAE).
        attention: ``global`` or ``local`` (see the module docstring).
        window: (time, frequency) window of local attention, in patches.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        embed_dim: int,
        patch_values: int,
        freq_patches: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        attention: str = "global",
        window: tuple[int, int] = (4, 4),
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if attention not in ("global", "local"):
            raise ValueError(f"amae: decoder attention must be 'global' or 'local', got {attention!r}")
        self.attention, self.window, self.freq_patches = attention, tuple(window), freq_patches
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            MaskedBlock(dim, num_heads, 4 * dim, norm_eps=norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_values)
        trunc_normal_init(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def forward(
        self,
        latent: torch.Tensor,
        visible: torch.Tensor,
        grid: tuple[int, int],
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions (B, P, p·p) for every patch, time-major.

        Args:
            latent: (B, 1 + K, D) encoder output, [CLS] first, visible patches in ``visible`` order.
            visible: (B, K) long, which patch each latent row is.
            grid: (time patches, frequency patches) of the clip.
            padding: (B, P) bool, True at patches made only of padding (never attended to).
        """
        t, f = grid
        x = scatter_visible(self.embed(latent), visible, t * f, self.mask_token)  # (B, 1 + P, d)
        x = x + audio_pos_table(t, f, x.shape[-1]).to(x)  # fixed sin-cos, any clip length
        if self.attention == "global":
            pad = None if padding is None else torch.cat([padding.new_zeros(x.shape[0], 1), padding], 1)
            mask = key_mask(pad)
            for block in self.blocks:
                x = block(x, mask)
            return self.pred(self.norm(x))[:, 1:]
        x = self._local(x[:, 1:], grid, padding)  # (B, P, d); AudioMAE drops [CLS] in local mode
        return self.pred(self.norm(x))

    def _local(self, x: torch.Tensor, grid: tuple[int, int], padding: torch.Tensor | None) -> torch.Tensor:
        """Shifted-window blocks over the patch grid (B, P, d) → (B, P, d)."""
        B, _, d = x.shape
        t, f = grid
        wt, wf = min(self.window[0], t), min(self.window[1], f)
        pt, pf = -t % wt, -f % wf  # pad the grid to whole windows; the extra cells are never keys
        x = x.reshape(B, t, f, d)
        keep = torch.ones(B, t, f, dtype=torch.bool, device=x.device)
        if padding is not None:
            keep = ~padding.reshape(B, t, f)
        if pt or pf:
            x = nn.functional.pad(x, (0, 0, 0, pf, 0, pt))
            keep = nn.functional.pad(keep, (0, pf, 0, pt), value=False)
        T, Fq = t + pt, f + pf
        window = (wt, wf)
        for i, block in enumerate(self.blocks):
            shift = (wt // 2, 0) if i % 2 == 1 and T > wt else (0, 0)  # AudioMAE: (2, 0) on odd blocks
            xs, ks = x, keep
            if shift != (0, 0):
                xs = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
                ks = torch.roll(keep, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            regions = to_windows(window_regions(T, Fq, window, shift).to(x.device)[None], window)  # (nW, n)
            same = regions[:, :, None] == regions[:, None, :]  # (nW, n, n)
            kw = to_windows(ks, window)  # (B·nW, n)
            n = wt * wf
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            mask = (same.repeat(B, 1, 1) & kw[:, None, :]) | eye  # a query always sees itself (no empty rows)
            out = block(to_windows(xs, window), mask[:, None])  # (B·nW, n, d)
            out = from_windows(out, B, T, Fq, window)
            if shift != (0, 0):
                out = torch.roll(out, shifts=shift, dims=(1, 2))
            x = out
        return x[:, :t, :f].reshape(B, t * f, d)


class AudioMaskedAutoencoder(Objective):
    """AudioMAE reconstruction on the audio stream: returns ``amae_loss`` and ``amae_count`` (hidden,
    non-padded patches).

    Args:
        cfg: the backbone's config (width, audio patch size and mel bins).
        decoder_dim: decoder width (512).
        decoder_depth: decoder blocks (8).
        decoder_heads: decoder heads (16).
        decoder_attention: ``global`` or ``local``.
        window: local-attention window in patches (time, frequency).
        mask_ratio: fraction hidden when the batch carries no ``audio_mask`` (0.8 in AudioMAE).
        norm_pix_loss: per-patch normalised targets.
    """

    name = "amae"
    stream = "audio"

    def __init__(
        self,
        cfg: ModelConfig,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_attention: str = "global",
        window: tuple[int, int] = (4, 4),
        mask_ratio: float = 0.8,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not cfg.has_audio:
            raise ValueError(f"amae: the backbone ({cfg.arch}) has no audio expert; use an audio preset")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"amae: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.patch_size, self.mask_ratio, self.norm_pix_loss = cfg.audio_patch_size, mask_ratio, norm_pix_loss
        self.decoder = AudioMAEDecoder(
            cfg.embed_dim,
            cfg.audio_patch_size**2,
            cfg.audio_grid()[1],
            decoder_dim,
            decoder_depth,
            decoder_heads,
            decoder_attention,
            window,
            cfg.norm_eps,
        )
        #: Source of the hidden set when the batch has no ``audio_mask``; set and seed it yourself.
        self.generator: torch.Generator | None = None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"}

    def reconstruct(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encoder + decoder on one batch: ``pred`` and ``target`` (B, P, p·p) (normalised when
        ``norm_pix_loss``), ``hidden`` (B, P) bool (hidden and not padding), and the ``grid``."""
        audio, padding = read_audio_batch(batch, self.name)
        grid = audio_grid(backbone, audio, self.name)
        P = grid[0] * grid[1]
        B = audio.shape[0]
        vis = visible_index(batch, B, P, self.mask_ratio, self.generator, audio.device, self.name)
        latent = backbone(audio=audio, audio_padding_mask=padding, audio_visible_index=vis)  # (B, 1 + K, D)
        pad = patch_padding(padding, grid, self.patch_size)  # (B, P) or None
        pred = self.decoder(latent, vis, grid, pad)  # (B, P, p·p)
        target = audio_patches(audio, self.patch_size)  # (B, P, p·p)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        hidden = torch.ones(B, P, dtype=torch.bool, device=audio.device).scatter(1, vis, False)
        if pad is not None:
            hidden &= ~pad
        return {"pred": pred, "target": target, "hidden": hidden, "grid": torch.tensor(grid)}

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode the visible patches, decode all, MSE on the hidden ones.

        Args:
            backbone: a Multiway Transformer with the audio expert.
            batch: ``audio`` (B, T, F), optional ``audio_padding_mask`` (B, T), and ``audio_mask`` (B, P)
                (or ``audio_visible_index``, or the objective's generator).
        """
        r = self.reconstruct(backbone, batch)
        hidden = r["hidden"]
        per_patch = (r["pred"][hidden].float() - r["target"][hidden].float()).pow(2).mean(dim=-1)  # (M,)
        count = per_patch.numel()
        loss = per_patch.sum() / max(count, 1)
        return {"amae_loss": loss, "amae_count": torch.tensor(float(count), device=loss.device)}
