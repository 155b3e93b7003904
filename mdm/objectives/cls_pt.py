"""BEiT v2's [CLS]-pretraining ("patch aggregation") head (Peng et al., 2022, §2.3; unilm
``beit2/modeling_pretrain.py``, ``VisionTransformerForMaskedImageModelingCLS``).

Besides the usual MIM loss, the last layer's [CLS] output is concatenated with the *early* layer's patch
outputs (layer ``early_layer``, 1-based: 9 of 12 for base, 21 of 24 for large) and passed through
``head_layers`` (2) extra blocks; the shared final norm and the shared MIM head then predict the masked
visual tokens again from these patches. To do so the [CLS] token must aggregate the image, which is the
point. The extra blocks are training machinery: they live in this objective, not in the backbone, and
are not part of :meth:`mdm.objectives.PretrainModel.pretrained_backbone_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdm.models.config import ModelConfig
from mdm.models.layers.multiway import route
from mdm.objectives.base import Objective, check_image_batch, entries, require
from mdm.objectives.heads import MIMHead, VisionBlock, trunc_normal_init
from mdm.objectives.masked import predict_image_tokens


def default_early_layer(depth: int) -> int:
    """BEiT v2's choice: three layers below the top (9 of 12, 21 of 24), at least layer 1."""
    return max(depth - 3, 1)


class ClsMaskedImageModeling(Objective):
    """MIM plus BEiT v2's [CLS]-pretraining loss, from one backbone pass.

    Returns ``mim_{loss,acc,count}`` (the main MIM) and ``cls_mim_{loss,acc,count}`` (the extra head);
    use it *instead of* :class:`~mdm.objectives.MaskedImageModeling`.

    Args:
        cfg: the backbone's config (sizes of the extra blocks, drop-path schedule).
        head: the shared visual-token head.
        early_layer: 1-based layer whose patch outputs feed the extra blocks (default ``depth - 3``).
        head_layers: number of extra blocks (2 in BEiT v2).
        shared_head: reuse the backbone's final norm and ``head`` (BEiT v2 default); otherwise this
            objective owns its own LayerNorm and :class:`MIMHead`.
        codebook_size: size of the own head when ``shared_head`` is False.
    """

    needs_visual_tokens = True

    name = "cls_mim"
    stream = "image"

    def __init__(
        self,
        cfg: ModelConfig,
        head: MIMHead,
        early_layer: int | None = None,
        head_layers: int = 2,
        shared_head: bool = True,
        codebook_size: int | None = None,
    ) -> None:
        super().__init__()
        self.early_layer = default_early_layer(cfg.depth) if early_layer is None else early_layer
        if not 1 <= self.early_layer < cfg.depth:
            raise ValueError(f"cls_mim: early_layer {self.early_layer} must be in [1, depth={cfg.depth})")
        # BEiT v2 gives the extra blocks the drop-path rates and init rescaling of layers early+1, early+2...
        rates = [
            cfg.drop_path_rate * (self.early_layer + i) / max(cfg.depth - 1, 1) for i in range(head_layers)
        ]
        self.blocks = nn.ModuleList(VisionBlock.like_backbone(cfg, min(r, cfg.drop_path_rate)) for r in rates)
        trunc_normal_init(self.blocks)
        for i, block in enumerate(self.blocks):
            block.rescale_residual(self.early_layer + i + 1)
        self.share("head", head)
        self.shared_head = shared_head
        if shared_head:
            self.share("cls_head", head)
            self.norm = None
        else:
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
            self.cls_head = MIMHead(cfg.embed_dim, codebook_size or head.proj.out_features)

    def _final_norm(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            return self.norm(x)
        if backbone.norm is None:  # the backbone has no final norm, so neither has the main MIM path
            return x
        return route(backbone.norm, x, x.shape[1])  # all tokens are vision tokens

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One image-only pass; CE of the main output and of the [CLS]-aggregation path.

        Args:
            backbone: the Multiway Transformer (needs ``forward_features(..., return_hidden=True)``).
            batch: ``image``, ``image_mask`` (B, P) bool, ``image_tokens`` (B, P) long.
        """
        image, image_mask, image_tokens = require(batch, ("image", "image_mask", "image_tokens"), self.name)
        check_image_batch(image, image_mask, image_tokens, backbone.cfg.patch_size, self.name)
        if self.early_layer >= backbone.num_layers:
            raise ValueError(f"cls_mim: early_layer {self.early_layer} needs a backbone deeper than it")
        x, hidden = backbone.forward_features(image=image, image_mask=image_mask, return_hidden=True)
        out = entries("mim", *predict_image_tokens(self.head, x[:, 1:], image_mask, image_tokens))
        # [last-layer CLS ‖ early-layer patches], both before the final norm as in BEiT v2.
        h = torch.cat([hidden[-1][:, :1], hidden[self.early_layer - 1][:, 1:]], dim=1)  # (B, 1 + P, D)
        for block in self.blocks:
            h = block(h)
        h = self._final_norm(backbone, h)
        out.update(
            entries(self.name, *predict_image_tokens(self.cls_head, h[:, 1:], image_mask, image_tokens))
        )
        return out
