"""VQ-KD, the BEiT v2 visual tokenizer (Peng et al., 2022, "BEiT v2: Masked Image Modeling with
Vector-Quantized Visual Tokenizers", §2.2; reference anchors ``beit-family.md`` §4.1).

ViT encoder → ``encode_proj`` (Linear, Tanh, Linear to ``code_dim``) → l2-normalised codebook with EMA
updates (:class:`~mdm.tokenizers.quantizer.NormEMAQuantizer`) → ViT decoder on the code grid (patch
size 1) → ``decode_proj`` → features regressed onto a frozen teacher's patch features with a cosine
loss. Only the encoder and the codebook are needed to tokenize; the decoder exists for training and
for the "teacher cosine" evaluation. There is no pixel decoder, so :meth:`VQKD.decode` raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.config import from_dict, to_dict
from mdm.tokenizers.base import VisualTokenizer
from mdm.tokenizers.config import VQKDConfig
from mdm.tokenizers.quantizer import NormEMAQuantizer
from mdm.tokenizers.vit import ViT

__all__ = ["VQKD", "cosine_loss"]


def _task_layer(dim: int, out: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out))
    for m in layer:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return layer


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(pred, target))`` over the last dimension."""
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


class VQKD(VisualTokenizer):
    """Vector-quantized knowledge-distillation tokenizer.

    Args:
        cfg: architecture; ``cfg.teacher_dim`` must be set (the width of the teacher's features).
    """

    kind = "vqkd"

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.teacher_dim <= 0:
            raise ValueError("VQKDConfig.teacher_dim must be set (the width of the teacher's patch features)")
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.encoder = ViT(cfg.encoder, cfg.img_size, cfg.patch_size, in_chans=3)
        self.encode_proj = _task_layer(cfg.encoder.embed_dim, cfg.code_dim)
        self.quantizer = NormEMAQuantizer(
            cfg.codebook_size,
            cfg.code_dim,
            decay=cfg.decay,
            beta=cfg.beta,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            restart_every=cfg.restart_every,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        self.decoder = ViT(cfg.decoder, grid, 1, in_chans=cfg.code_dim)
        self.decode_proj = _task_layer(cfg.decoder.embed_dim, cfg.teacher_dim)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.cfg.img_size // self.cfg.patch_size
        return side, side

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def quantize(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocessed images → (z_q (B, h, w, d), codes (B, h, w), commitment loss)."""
        h, w = self.grid_size
        feats = self.encoder(x)  # (B, P, D)
        z = self.encode_proj(feats.float()).view(x.shape[0], h, w, -1)  # (B, h, w, d)
        return self.quantizer(z, generator)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[1]

    def _decode_quantized(self, z_q: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, h, w, d) → predicted teacher features (B, h, w, teacher_dim)."""
        B, h, w, _ = z_q.shape
        feats = self.decoder(z_q.permute(0, 3, 1, 2))  # (B, h*w, D)
        return self.decode_proj(feats).view(B, h, w, -1)

    @torch.no_grad()
    def decode_features(self, codes: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features (B, h, w, teacher_dim) of codes (B, h, w)."""
        return self._decode_quantized(self.quantizer.lookup(codes.long()))

    def forward(
        self, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            images: float (B, C, H, W) in [0, 1].
            target: teacher features (B, h, w, teacher_dim) on the code grid.
            generator: randomness of k-means initialisation and dead-code restarts.

        Returns:
            ``{"loss", "rec_loss", "quant_loss", "cosine", "codes"}``; ``loss = rec_loss + quant_loss``.
        """
        z_q, codes, quant_loss = self.quantize(self.prepare(images), generator)
        rec = self._decode_quantized(z_q)
        rec_loss = cosine_loss(rec, target)
        return {
            "loss": rec_loss + quant_loss,
            "rec_loss": rec_loss,
            "quant_loss": quant_loss,
            "cosine": (1 - rec_loss).detach(),
            "codes": codes.detach(),
        }

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay (besides biases and norms)."""
        return {f"{part}.{n}" for part in ("encoder", "decoder") for n in ("pos_embed", "cls_token")}

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "<config>") -> VQKD:
        return cls(from_dict(VQKDConfig, config, source=source))
