"""Image-text contrastive learning (ITC), VLMo's alignment objective (Bao et al., 2022), on the pair stream.

The image alone and the caption alone are encoded (the Multiway Transformer as a dual encoder: vision
experts for the image, language experts for the text), their first tokens (image [CLS], text [bos]) are
projected by :class:`ITCHead` and L2-normalised, and the symmetric InfoNCE loss of CLIP is taken over the
B × B similarity matrix scaled by a learnable temperature. Negatives are the other pairs of the rank's own
batch: objectives never talk to other processes (``docs/ARCHITECTURE.md``), so with N ranks each rank
contrasts its own B pairs rather than N·B.

The head's names match the retrieval task's (``vision_head``, ``language_head``, ``logit_scale``), so a
retrieval fine-tuning starts from the pretrained projections (``mdm finetune`` loads ``heads.itc.*`` from
the model directory when present).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.objectives.base import Objective, require
from mdm.objectives.heads import trunc_normal_init


class ITCHead(nn.Module):
    """Projections and temperature of the contrastive objective.

    Args:
        dim: backbone width.
        logit_scale_init: initial 1/τ (stored as its log; CLIP and VLMo use 1/0.07).
    """

    def __init__(self, dim: int, logit_scale_init: float = 1.0 / 0.07) -> None:
        super().__init__()
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        trunc_normal_init(self)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))


class ImageTextContrastive(Objective):
    """ITC on image-text pairs: two single-modality passes, symmetric InfoNCE.

    Reads the *uncorrupted* ``image`` and ``text`` of the pair batch (the masked views are MVLM's), so it
    can share the pair stream with MVLM. Returns ``itc_loss``, ``itc_acc`` (top-1 of image→text and
    text→image, averaged) and ``itc_count`` (pairs).

    Args:
        head: the :class:`ITCHead`.
        max_logit_scale: 1/τ is clamped to this (100 in CLIP), against a runaway temperature.
    """

    name = "itc"
    stream = "pair"

    def __init__(self, head: ITCHead, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.share("head", head)
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Args:
        backbone: the Multiway Transformer.
        batch: ``image`` (B, 3, H, W), ``text`` (B, T) long, optional ``text_padding_mask`` (B, T).
        """
        image, text = require(batch, ("image", "text"), self.name)
        padding = batch.get("text_padding_mask")
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"itc: {image.shape[0]} images but {text.shape[0]} texts in the pair batch")
        vision = backbone(image=image)[:, 0]  # (B, D) image [CLS]
        words = backbone(text=text, text_padding_mask=padding)[:, 0]  # (B, D) text [bos]
        v = F.normalize(self.head.vision_head(vision).float(), dim=-1)
        t = F.normalize(self.head.language_head(words).float(), dim=-1)
        scale = self.head.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * v @ t.t()  # (B, B): image i vs text j
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        with torch.no_grad():
            acc = (
                (logits.argmax(1) == target).float().mean() + (logits.argmax(0) == target).float().mean()
            ) / 2
        return {
            "itc_loss": loss,
            "itc_acc": acc,
            "itc_count": torch.tensor(float(logits.shape[0]), device=logits.device),
        }
