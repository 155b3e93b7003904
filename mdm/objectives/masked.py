"""Masked data modeling on the three streams (BEiT-3, Wang et al. 2023; VL-BEiT, Bao et al. 2022):

* :class:`MaskedImageModeling` (``mim``, image stream) — BEiT (Bao et al., 2022): patches under
  ``image_mask`` are replaced by [MASK], the backbone encodes the image alone, and the patch outputs at
  masked positions predict the visual tokens of the frozen tokenizer (dVAE or VQ-KD).
* :class:`MaskedLanguageModeling` (``mlm``, text stream) — BERT (Devlin et al., 2019): the corrupted text
  ``text_input`` is encoded alone and the positions in ``text_mask`` predict the original ids ``text``.
* :class:`MaskedVisionLanguageModeling` (``mvlm``, pair stream) — one joint pass over the masked image and
  the corrupted text; the image head predicts masked visual tokens and the text head masked words, each
  side seeing the other (the VL-FFN of the top layers is used, as in VLMo/BEiT-3's fusion layers).

The masking itself (block-wise for images, 80/10/10 for text) is done by the data pipeline
(:mod:`mdm.data.masking`); these modules only read ``image_mask`` / ``text_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mdm.objectives.base import (
    Objective,
    check_image_batch,
    check_shape,
    entries,
    masked_cross_entropy,
    require,
)
from mdm.objectives.heads import MIMHead, MLMHead


def predict_image_tokens(
    head: nn.Module, patches: torch.Tensor, image_mask: torch.Tensor, image_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked-token cross-entropy on image patches.

    Args:
        head: D → codebook logits.
        patches: (B, P, D) patch outputs ([CLS] removed).
        image_mask: (B, P) bool, True = predict.
        image_tokens: (B, P) long visual codes.
    """
    selected = patches[image_mask]  # (M, D), row-major over (b, p), same order as the labels
    return masked_cross_entropy(head(selected), image_tokens[image_mask])


def predict_text_tokens(
    head: MLMHead,
    backbone: nn.Module,
    tokens: torch.Tensor,
    text_mask: torch.Tensor,
    text: torch.Tensor,
    text_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked-token cross-entropy on text positions (padding never predicted).

    Args:
        head: the MLM head (tied to ``backbone.text_embed`` if it says so).
        backbone: the encoder, for the tied embedding weight.
        tokens: (B, T, D) text outputs.
        text_mask: (B, T) bool, True = predict.
        text: (B, T) original ids (the labels).
        text_padding_mask: (B, T) bool, True at padding, or None.
    """
    if text_padding_mask is not None:
        text_mask = text_mask & ~text_padding_mask
    selected = tokens[text_mask]  # (M, D)
    weight = backbone.text_embed.weight if head.tie_embedding else None
    return masked_cross_entropy(head(selected, weight), text[text_mask])


def _text_batch(batch: Mapping[str, Any], who: str) -> tuple[torch.Tensor, ...]:
    text_input, text, text_mask = require(batch, ("text_input", "text", "text_mask"), who)
    padding = batch.get("text_padding_mask")
    check_shape(text, tuple(text_input.shape), "text", who)
    check_shape(text_mask, tuple(text_input.shape), "text_mask", who)
    if padding is not None:
        check_shape(padding, tuple(text_input.shape), "text_padding_mask", who)
    return text_input, text, text_mask, padding


class MaskedImageModeling(Objective):
    """BEiT masked image modeling on the image stream: returns ``mim_loss``, ``mim_acc``, ``mim_count``.

    Args:
        head: the (shared) visual-token head; held by reference, see :meth:`Objective.share`.
    """

    needs_visual_tokens = True

    name = "mim"
    stream = "image"

    def __init__(self, head: MIMHead) -> None:
        super().__init__()
        self.share("head", head)

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Image-only pass with [MASK]ed patches; CE on the masked patches.

        Args:
            backbone: the Multiway Transformer.
            batch: ``image`` (B, 3, H, W), ``image_mask`` (B, P) bool, ``image_tokens`` (B, P) long.
        """
        image, image_mask, image_tokens = require(batch, ("image", "image_mask", "image_tokens"), self.name)
        check_image_batch(image, image_mask, image_tokens, backbone.cfg.patch_size, self.name)
        x = backbone(image=image, image_mask=image_mask)  # (B, 1 + P, D)
        return entries(self.name, *predict_image_tokens(self.head, x[:, 1:], image_mask, image_tokens))


class MaskedLanguageModeling(Objective):
    """BERT masked language modeling on the text stream: ``mlm_loss``, ``mlm_acc``, ``mlm_count``.

    Args:
        head: the (shared) MLM head; held by reference.
    """

    name = "mlm"
    stream = "text"

    def __init__(self, head: MLMHead) -> None:
        super().__init__()
        self.share("head", head)

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Text-only pass on the corrupted ids; CE on ``text_mask`` positions against ``text``.

        Args:
            backbone: the Multiway Transformer.
            batch: ``text_input``, ``text`` (B, T) long, ``text_mask`` (B, T) bool, optional
                ``text_padding_mask`` (B, T) bool.
        """
        text_input, text, text_mask, padding = _text_batch(batch, self.name)
        x = backbone(text=text_input, text_padding_mask=padding)  # (B, T, D)
        return entries(self.name, *predict_text_tokens(self.head, backbone, x, text_mask, text, padding))


class MaskedVisionLanguageModeling(Objective):
    """Masked vision-language modeling on image-text pairs (one joint pass).

    Returns ``mvlm_image_{loss,acc,count}`` and ``mvlm_text_{loss,acc,count}``; both losses enter the total
    (BEiT-3 treats them as one "masked data modeling" objective). The heads are the ones MIM and MLM use.

    Args:
        image_head: the shared visual-token head.
        text_head: the shared MLM head.
    """

    needs_visual_tokens = True

    name = "mvlm"
    stream = "pair"

    def __init__(self, image_head: MIMHead, text_head: MLMHead) -> None:
        super().__init__()
        self.share("image_head", image_head)
        self.share("text_head", text_head)

    def forward(self, backbone: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Joint pass ``[CLS, patches, text]`` with masked image and corrupted text.

        Args:
            backbone: the Multiway Transformer.
            batch: the image keys of :class:`MaskedImageModeling` and the text keys of
                :class:`MaskedLanguageModeling`, for the same B pairs.
        """
        image, image_mask, image_tokens = require(batch, ("image", "image_mask", "image_tokens"), self.name)
        P = check_image_batch(image, image_mask, image_tokens, backbone.cfg.patch_size, self.name)
        text_input, text, text_mask, padding = _text_batch(batch, self.name)
        if text_input.shape[0] != image.shape[0]:
            raise ValueError(
                f"mvlm: {image.shape[0]} images but {text_input.shape[0]} texts in the pair batch"
            )
        x = backbone(image=image, text=text_input, text_padding_mask=padding, image_mask=image_mask)
        patches, words = x[:, 1 : 1 + P], x[:, 1 + P :]  # (B, P, D), (B, T, D)
        out = entries("mvlm_image", *predict_image_tokens(self.image_head, patches, image_mask, image_tokens))
        out.update(
            entries(
                "mvlm_text", *predict_text_tokens(self.text_head, backbone, words, text_mask, text, padding)
            )
        )
        return out
