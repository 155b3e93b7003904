"""Audio-text contrastive learning (CLAP-style: Elizalde et al., 2023; Wu et al., 2023) on the
``audio_text`` stream: VLMo's ITC (:mod:`mdm.objectives.contrastive`) with the audio expert in place of
the vision expert.

The clip alone and the caption alone are encoded (the Multiway Transformer as a dual encoder: audio
experts for the clip, language experts for the text); the audio [CLS] and the text [bos] are projected
by :class:`AudioITCHead`, L2-normalised, and the symmetric InfoNCE loss is taken over the similarities
scaled by a learnable temperature. As for images, negatives come from every rank: the projected
features are gathered with gradients through the injected :class:`~mdm.objectives.base.CrossRank`
(the identity in one process) and each rank scores its B clips against all N captions and its B
captions against all N clips, with labels offset by the earlier ranks' rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.objectives.base import CrossRank, Objective, require
from mdm.objectives.heads import trunc_normal_init


class AudioITCHead(nn.Module):
    """Projections and temperature of audio-text ITC (``audio_head``, ``language_head``, ``logit_scale``,
    named as the image-text :class:`~mdm.objectives.contrastive.ITCHead`).

    Args:
        dim: backbone width.
        logit_scale_init: initial 1/τ (stored as its log; 1/0.07 as CLIP and CLAP).
    """

    def __init__(self, dim: int, logit_scale_init: float = 1.0 / 0.07) -> None:
        super().__init__()
        self.audio_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        trunc_normal_init(self)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))


def symmetric_info_nce(
    a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor, max_log_scale: float, cross_rank: CrossRank
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's loss over this rank's L2-normalised (B, d) embeddings against every rank's:
    ``(loss, top-1 accuracy of both directions)``."""
    scale = log_scale.clamp(max=max_log_scale).exp()
    all_a = cross_rank.gather_with_grad(a)  # (N, d), this rank's rows keep their graph
    all_b = cross_rank.gather_with_grad(b)  # (N, d)
    a2b = scale * a @ all_b.t()  # (B, N)
    b2a = scale * b @ all_a.t()  # (B, N)
    target = torch.arange(a.shape[0], device=a.device) + cross_rank.offset(a.shape[0], a.device)
    loss = (F.cross_entropy(a2b, target) + F.cross_entropy(b2a, target)) / 2
    with torch.no_grad():
        acc = ((a2b.argmax(1) == target).float().mean() + (b2a.argmax(1) == target).float().mean()) / 2
    return loss, acc


class AudioTextContrastive(Objective):
    """ITC on audio-caption pairs: two single-modality passes, symmetric InfoNCE. Returns
    ``audio_itc_loss``, ``audio_itc_acc`` and ``audio_itc_count`` (pairs).

    Args:
        head: the :class:`AudioITCHead` (owned by the pretraining model as ``heads.audio_itc``).
        max_logit_scale: 1/τ is clamped to this (100, as CLIP).
    """

    name = "audio_itc"
    stream = "audio_text"

    def __init__(self, head: AudioITCHead, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.share("head", head)
        self.max_log_scale = math.log(max_logit_scale)

    def forward(
        self, backbone: nn.Module, batch: Mapping[str, Any], context: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Args:
        backbone: a Multiway Transformer with audio and language experts.
        batch: ``audio`` (B, T, F), optional ``audio_padding_mask`` (B, T), ``text`` (B, L) long,
            optional ``text_padding_mask`` (B, L).
        """
        audio, text = require(batch, ("audio", "text"), self.name)
        if text.shape[0] != audio.shape[0]:
            raise ValueError(f"audio_itc: {audio.shape[0]} clips but {text.shape[0]} texts in the batch")
        sound = backbone(audio=audio, audio_padding_mask=batch.get("audio_padding_mask"))[:, 0]  # (B, D)
        words = backbone(text=text, text_padding_mask=batch.get("text_padding_mask"))[:, 0]  # (B, D)
        a = F.normalize(self.head.audio_head(sound).float(), dim=-1)
        t = F.normalize(self.head.language_head(words).float(), dim=-1)
        loss, acc = symmetric_info_nce(a, t, self.head.logit_scale, self.max_log_scale, self.cross_rank)
        return {
            "audio_itc_loss": loss,
            "audio_itc_acc": acc,
            "audio_itc_count": torch.tensor(float(a.shape[0]), device=a.device),
        }
