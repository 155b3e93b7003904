"""MAE-style pixel reconstruction (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners";
reference: facebookresearch/mae ``models_mae.py``), the alternative vision objective to visual tokens.

The backbone encodes only the visible patches (``visible_index``, no [MASK] tokens in the encoder); a light
decoder of its own width embeds them, fills the removed positions with a learned mask token, adds a fixed
2-D sine-cosine position table, runs a few plain blocks and predicts the pixels of every patch. The loss is
the MSE on the removed patches against per-patch normalised pixels (``norm_pix_loss``: each patch's
target has its own mean subtracted and is divided by ``sqrt(var + 1e-6)``, unbiased variance, as MAE).

Which patches are visible is never drawn from the global RNG. In order of precedence: the batch's
``visible_index`` (B, K) long; the batch's ``mae_noise`` (B, P) float (MAE's shuffle: the ``K`` smallest
values stay visible); noise from the objective's ``generator`` (a ``torch.Generator`` the caller sets and
seeds); last, the batch's ``image_mask`` (B, P) bool, if it masks the same number of patches in every
image. (The last comes last because the image stream's ``image_mask`` is usually MIM's block-wise mask.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdm.models.config import ModelConfig
from mdm.objectives.base import Objective, check_shape, require
from mdm.objectives.heads import VisionBlock, trunc_normal_init


def sincos_pos_table(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions, (1 + grid², dim): row 0 ([CLS]) is zero, then raster order.

    Half of the channels encode the row, half the column; each half is ``[sin(pos·ω), cos(pos·ω)]`` with
    ``ω_k = 10000^(-k / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (g, g) each

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).double() * omega  # (g*g, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g*g, dim/2)

    table = torch.cat([enc(rows), enc(cols)], dim=1).float()  # (g*g, dim)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, P, p·p·C): patches in raster order (as the patch embedding), pixels of a patch
    row-major with channels last (MAE's ``nchpwq -> nhwpqc``)."""
    B, C, H, W = image.shape
    p = patch_size
    h, w = H // p, W // p
    x = image.reshape(B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of (B, P, p·p·C) pixel targets (MAE ``norm_pix_loss``)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
    return (target - mean) / (var + eps) ** 0.5


class MAEDecoder(nn.Module):
    """MAE's light decoder.

    Args:
        embed_dim: backbone width (input).
        patch_pixels: p·p·C values predicted per patch.
        grid_size: patches per side of the pretraining resolution (for the position table).
        dim: decoder width (512 in MAE).
        depth: decoder blocks (8 in MAE).
        num_heads: decoder heads (16 in MAE).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        embed_dim: int,
        patch_pixels: int,
        grid_size: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, num_heads, 4 * dim, norm_eps=norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_pixels)
        self.register_buffer("pos_table", sincos_pos_table(grid_size, dim), persistent=False)
        trunc_normal_init(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, latent: torch.Tensor, visible_index: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Pixel predictions for every patch.

        Args:
            latent: (B, 1 + K, D) encoder output, [CLS] first, visible patches in ``visible_index`` order.
            visible_index: (B, K) long, which patch each latent row is.
            num_patches: P.

        Returns:
            (B, P, p·p·C) predictions in raster order.
        """
        x = self.embed(latent)  # (B, 1 + K, d)
        B, _, d = x.shape
        idx = visible_index.unsqueeze(-1).expand(-1, -1, d)  # (B, K, d)
        full = self.mask_token.to(x.dtype).expand(B, num_patches, d).scatter(1, idx, x[:, 1:])  # (B, P, d)
        grid = int(round(num_patches**0.5))
        pos = self.pos_table if self.pos_table.shape[0] == 1 + num_patches else sincos_pos_table(grid, d)
        x = torch.cat([x[:, :1], full], dim=1) + pos.to(x)  # (B, 1 + P, d)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # (B, P, p·p·C)


class MaskedAutoencoder(Objective):
    """MAE pixel reconstruction on the image stream: returns ``mae_loss`` and ``mae_count`` (masked
    patches). There is no accuracy for a regression target.

    Args:
        cfg: the backbone's config (width, patch size, channels, grid).
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_heads: decoder heads.
        mask_ratio: fraction of patches removed when the visible set is drawn from noise (0.75 in MAE).
        norm_pix_loss: normalise each target patch by its own mean and variance.
    """

    name = "mae"
    stream = "image"

    def __init__(
        self,
        cfg: ModelConfig,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mae: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.patch_size = cfg.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        patch_pixels = cfg.patch_size**2 * cfg.in_chans
        self.decoder = MAEDecoder(
            cfg.embed_dim,
            patch_pixels,
            cfg.grid_size,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            cfg.norm_eps,
        )
        #: Source of the shuffle noise when the batch carries none; set and seed it (per rank) yourself.
        self.generator: torch.Generator | None = None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"}

    def _from_mask(self, mask: torch.Tensor, B: int, P: int) -> torch.Tensor:
        """Visible indices from a (B, P) bool mask (True = removed) with equal counts per image."""
        check_shape(mask, (B, P), "image_mask", self.name)
        kept = (~mask).sum(dim=1)
        if bool((kept != kept[0]).any()):
            raise ValueError(
                "mae: batch['image_mask'] must mask the same number of patches in every image "
                "(or give visible_index / mae_noise)"
            )
        return (~mask).nonzero()[:, 1].reshape(B, -1)  # (B, K), ascending per row

    def visible_index(self, batch: Mapping[str, Any], B: int, P: int, device: torch.device) -> torch.Tensor:
        """(B, K) long indices of the patches the encoder sees (see the module docstring for the order)."""
        if batch.get("visible_index") is not None:
            vis = batch["visible_index"]
            if vis.ndim != 2 or vis.shape[0] != B or vis.dtype != torch.long:
                raise ValueError(
                    f"mae: batch['visible_index'] must be (B={B}, K) long, got {tuple(vis.shape)} {vis.dtype}"
                )
            return vis
        if batch.get("mae_noise") is not None:
            noise = batch["mae_noise"]
            check_shape(noise, (B, P), "mae_noise", self.name)
        elif self.generator is not None:
            noise = torch.rand(B, P, generator=self.generator, device=self.generator.device).to(device)
        elif batch.get("image_mask") is not None:
            return self._from_mask(batch["image_mask"], B, P)
        else:
            raise ValueError(
                "mae: the batch has no visible_index, mae_noise or image_mask and the objective has no "
                "generator; set MaskedAutoencoder.generator = torch.Generator(device).manual_seed(...)"
            )
        keep = int(P * (1 - self.mask_ratio))
        return noise.argsort(dim=1)[:, :keep]  # (B, K)

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Encode visible patches, decode all, MSE on the removed ones.

        Args:
            backbone: the Multiway Transformer.
            batch: ``image`` (B, C, H, W) and one of the visible-set keys (module docstring).
        """
        (image,) = require(batch, ("image",), self.name)
        B = image.shape[0]
        target = patchify(image, self.patch_size)  # (B, P, p·p·C)
        P = target.shape[1]
        vis = self.visible_index(batch, B, P, image.device)
        latent = backbone(image=image, visible_index=vis)  # (B, 1 + K, D)
        pred = self.decoder(latent, vis, P)  # (B, P, p·p·C)
        removed = torch.ones(B, P, dtype=torch.bool, device=image.device).scatter(1, vis, False)  # (B, P)
        if self.norm_pix_loss:
            target = normalize_patches(target)
        per_patch = (pred[removed].float() - target[removed].float()).pow(2).mean(dim=-1)  # (M,)
        count = per_patch.numel()
        loss = per_patch.sum() / max(count, 1)
        return {"mae_loss": loss, "mae_count": torch.tensor(float(count), device=image.device)}
