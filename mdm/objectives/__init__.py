"""Pretraining objectives: MIM, MLM, MVLM (BEiT-3's masked data modeling), VLMo's ITC and ITM, BEiT v2's
[CLS] head, MAE; for audio, AudioMAE (``amae``), BEATs (``beats``) and audio-text ITC (``audio_itc``).

>>> from mdm.models.config import make_config
>>> from mdm.objectives import ObjectivesConfig, build_pretrain_model
>>> model = build_pretrain_model(make_config("vlmo_tiny", depth=2), ObjectivesConfig(codebook_size=64))
>>> sorted(model.objectives)
['mim', 'mlm', 'mvlm']

See ``docs/objectives.md`` for the batch keys, the returned entries and the design.
"""

from __future__ import annotations

from mdm.objectives.amae import AudioMAEDecoder, AudioMaskedAutoencoder
from mdm.objectives.audio_contrastive import AudioITCHead, AudioTextContrastive
from mdm.objectives.base import LOCAL, STREAMS, CrossRank, Objective, masked_cross_entropy
from mdm.objectives.beats import LabelPredictor, MaskedAcousticModeling, fill_audio_tokens
from mdm.objectives.cls_pt import ClsMaskedImageModeling
from mdm.objectives.config import ObjectivesConfig
from mdm.objectives.contrastive import ContrastiveSimilarities, ImageTextContrastive, ITCHead
from mdm.objectives.heads import MIMHead, MLMHead, VisionBlock
from mdm.objectives.itm import ImageTextMatching, ITMHead, sample_hard_negatives
from mdm.objectives.mae import MAEDecoder, MaskedAutoencoder, normalize_patches, patchify
from mdm.objectives.masked import MaskedImageModeling, MaskedLanguageModeling, MaskedVisionLanguageModeling
from mdm.objectives.model import OBJECTIVES, PretrainModel, build_pretrain_model
from mdm.objectives.tokens import VisualTokenizer, fill_visual_tokens

__all__ = [
    "LOCAL",
    "OBJECTIVES",
    "STREAMS",
    "AudioITCHead",
    "AudioMAEDecoder",
    "AudioMaskedAutoencoder",
    "AudioTextContrastive",
    "LabelPredictor",
    "MaskedAcousticModeling",
    "fill_audio_tokens",
    "ClsMaskedImageModeling",
    "ContrastiveSimilarities",
    "CrossRank",
    "ITCHead",
    "ITMHead",
    "ImageTextContrastive",
    "ImageTextMatching",
    "MAEDecoder",
    "MIMHead",
    "MLMHead",
    "MaskedAutoencoder",
    "MaskedImageModeling",
    "MaskedLanguageModeling",
    "MaskedVisionLanguageModeling",
    "Objective",
    "ObjectivesConfig",
    "PretrainModel",
    "VisionBlock",
    "VisualTokenizer",
    "build_pretrain_model",
    "fill_visual_tokens",
    "masked_cross_entropy",
    "normalize_patches",
    "patchify",
    "sample_hard_negatives",
]
