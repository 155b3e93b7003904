"""Image-text contrastive learning (ITC), VLMo's alignment objective (Bao et al., 2022), on the pair stream.

The image alone and the caption alone are encoded (the Multiway Transformer as a dual encoder: vision
experts for the image, language experts for the text), their first tokens (image [CLS], text [bos]) are
projected by :class:`ITCHead` and L2-normalised, and the symmetric InfoNCE loss of CLIP is taken over the
similarity matrix scaled by a learnable temperature. Negatives come from **every rank**: the projected
features are gathered with gradients flowing back to each rank's shard (open_clip's ``ClipLoss`` with
``local_loss``; VLMo's ``compute_itc``), and each rank scores its own B images against all N texts (and
its B texts against all N images) with its labels offset by the rows of the earlier ranks. Objectives
never talk to the process group (``docs/ARCHITECTURE.md``): the gather is injected
(:class:`~mdm.objectives.base.CrossRank`, wired by ``mdm pretrain`` for every strategy) and is the
identity in one process. With equal per-rank batches the mean of the ranks' losses is the loss of one
process holding the global batch, and so — after DDP / DeepSpeed average the gradients — are the
parameter gradients (``tests/test_objectives_dist.py``).

The objective also leaves the (detached) similarities of the step in ``context["itc"]``
(:class:`ContrastiveSimilarities`), from which VLMo's ITM draws its hard negatives.

The head's names match the retrieval task's (``vision_head``, ``language_head``, ``logit_scale``), so a
retrieval fine-tuning starts from the pretrained projections (``mdm finetune`` loads ``heads.itc.*`` from
the model directory when present).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass
class ContrastiveSimilarities:
    """What ITC leaves for ITM: the scaled similarities of this rank's pairs against the global batch.

    Attributes:
        image_to_text: (B, N) logits of this rank's images against all N texts (rank order).
        text_to_image: (B, N) logits of this rank's texts against all N images.
        offset: global index of this rank's first pair (its positives are ``offset + arange(B)``).
    """

    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    offset: int

    def positives(self) -> torch.Tensor:
        """(B,) global column of each row's own pair."""
        B = self.image_to_text.shape[0]
        return torch.arange(B, device=self.image_to_text.device) + self.offset


class ImageTextContrastive(Objective):
    """ITC on image-text pairs: two single-modality passes, symmetric InfoNCE.

    Reads the *uncorrupted* ``image`` and ``text`` of the pair batch (the masked views are MVLM's), so it
    can share the pair stream with MVLM. Returns ``itc_loss``, ``itc_acc`` (top-1 of image→text and
    text→image over the global batch, averaged) and ``itc_count`` (this rank's pairs). Negatives are
    gathered through :attr:`cross_rank` (see the module docstring).

    Args:
        head: the :class:`ITCHead`.
        max_logit_scale: 1/τ is clamped to this (100 in CLIP), against a runaway temperature.
    """

    name = "itc"
    stream = "pair"
    provides_context = True

    def __init__(self, head: ITCHead, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.share("head", head)
        self.max_log_scale = math.log(max_logit_scale)

    def forward(
        self, backbone: nn.Module, batch: Mapping[str, Any], context: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Args:
        backbone: the Multiway Transformer.
        batch: ``image`` (B, 3, H, W), ``text`` (B, T) long, optional ``text_padding_mask`` (B, T).
        context: when given, receives ``context["itc"]`` (:class:`ContrastiveSimilarities`).
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
        all_v = self.cross_rank.gather_with_grad(v)  # (N, E), this rank's rows keep their graph
        all_t = self.cross_rank.gather_with_grad(t)  # (N, E)
        i2t = scale * v @ all_t.t()  # (B, N): this rank's images vs every text
        t2i = scale * t @ all_v.t()  # (B, N): this rank's texts vs every image
        offset = self.cross_rank.offset(v.shape[0], v.device)
        target = torch.arange(v.shape[0], device=v.device) + offset
        loss = (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2
        with torch.no_grad():
            acc = ((i2t.argmax(1) == target).float().mean() + (t2i.argmax(1) == target).float().mean()) / 2
        if context is not None:
            context[self.name] = ContrastiveSimilarities(i2t.detach(), t2i.detach(), offset)
        return {
            "itc_loss": loss,
            "itc_acc": acc,
            "itc_count": torch.tensor(float(v.shape[0]), device=v.device),
        }
