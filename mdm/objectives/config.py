"""Configuration of the pretraining objectives (the ``objectives:`` section of a pretraining config)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

#: Objective names a config may list (see :data:`mdm.objectives.OBJECTIVES`).
KNOWN = ("mim", "cls_mim", "mlm", "mvlm", "itc", "itm", "mae", "amae", "beats", "audio_itc")


@dataclass
class ObjectivesConfig:
    """Which objectives run, their weights and their heads.

    Attributes:
        objectives: names among ``mim``, ``cls_mim`` (MIM + BEiT v2's [CLS] head, replaces ``mim``),
            ``mlm``, ``mvlm``, ``itc`` (VLMo's image-text contrastive loss on the pair stream), ``itm``
            (VLMo's image-text matching with hard negatives from ITC's similarities; needs ``itc``),
            ``mae``, and for audio ``amae`` (AudioMAE), ``beats`` (BEATs' acoustic tokens), ``audio_itc``
            (audio-text contrastive on the audio_text stream).
            BEiT-3's masked data modeling is ``[mim, mlm, mvlm]``.
        weights: per-objective multiplier of every ``*_loss`` it returns (default 1.0).
        codebook_size: visual tokens of the frozen tokenizer (8192 for dVAE and VQ-KD).
        mlm_tie_embedding: MLM decoder weight = the backbone's text embedding (default: own weight).
        mlm_norm_eps: epsilon of the MLM head's LayerNorm (BERT: 1e-12).
        cls_pt_early_layer: 1-based layer whose patches feed the [CLS]-pretraining blocks
            (None: ``depth - 3``, i.e. 9 of 12 and 21 of 24 as BEiT v2).
        cls_pt_layers: extra blocks of the [CLS]-pretraining head (2 in BEiT v2).
        cls_pt_shared_head: reuse the final norm and MIM head for the [CLS] path (BEiT v2 default).
        mae_decoder_dim: width of the MAE decoder (512 in MAE).
        mae_decoder_depth: blocks of the MAE decoder (8 in MAE).
        mae_decoder_heads: heads of the MAE decoder (16 in MAE).
        mae_mask_ratio: fraction of patches removed when MAE draws its own visible set.
        mae_norm_pix_loss: per-patch normalised pixel targets.
        amae_decoder_dim: width of the AudioMAE decoder (512).
        amae_decoder_depth: its blocks (8).
        amae_decoder_heads: its heads (16).
        amae_decoder_attention: ``global``, or ``local`` shifted-window attention (AudioMAE's best).
        amae_window: local-attention window (time, frequency) in patches ((4, 4) in AudioMAE).
        amae_mask_ratio: fraction hidden when the audio batch carries no ``audio_mask`` (0.8).
        amae_norm_pix_loss: per-patch normalised spectrogram targets.
        audio_codebook_size: acoustic tokens of the frozen acoustic tokenizer (1024 in BEATs).
        beats_predictor_dim: width of BEATs' label predictor (0: the backbone's).
        beats_predictor_depth: its blocks.
        beats_predictor_heads: its heads (0: the backbone's).
        beats_mask_ratio: fraction hidden when the audio batch carries no ``audio_mask`` (0.75).
    """

    objectives: list[str] = field(default_factory=lambda: ["mim", "mlm", "mvlm"])
    weights: dict[str, float] = field(default_factory=dict)
    codebook_size: int = 8192
    mlm_tie_embedding: bool = False
    mlm_norm_eps: float = 1e-12
    cls_pt_early_layer: int | None = None
    cls_pt_layers: int = 2
    cls_pt_shared_head: bool = True
    mae_decoder_dim: int = 512
    mae_decoder_depth: int = 8
    mae_decoder_heads: int = 16
    mae_mask_ratio: float = 0.75
    mae_norm_pix_loss: bool = True
    amae_decoder_dim: int = 512
    amae_decoder_depth: int = 8
    amae_decoder_heads: int = 16
    amae_decoder_attention: Literal["global", "local"] = "global"
    amae_window: tuple[int, int] = (4, 4)
    amae_mask_ratio: float = 0.8
    amae_norm_pix_loss: bool = True
    audio_codebook_size: int = 1024
    beats_predictor_dim: int = 0
    beats_predictor_depth: int = 3
    beats_predictor_heads: int = 0
    beats_mask_ratio: float = 0.75

    def validate(self) -> None:
        """Raises ValueError on unknown or conflicting objectives and bad sizes."""
        if not self.objectives:
            raise ValueError("objectives: list at least one objective")
        for name in self.objectives:
            if name not in KNOWN:
                close = difflib.get_close_matches(name, KNOWN, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"objectives: unknown objective {name!r}{hint} (known: {', '.join(KNOWN)})")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives: {self.objectives} lists an objective twice")
        if "itm" in self.objectives and "itc" not in self.objectives:
            raise ValueError(
                "objectives: itm draws its hard negatives from the ITC similarities of the same step "
                "(VLMo computes them together); add itc to the objectives"
            )
        if "mim" in self.objectives and "cls_mim" in self.objectives:
            raise ValueError("objectives: cls_mim already computes the MIM loss; list cls_mim instead of mim")
        extra = set(self.weights) - set(self.objectives)
        if extra:
            raise ValueError(f"weights: {sorted(extra)} are not among the objectives {self.objectives}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be at least 2, got {self.codebook_size}")
        if self.cls_pt_layers < 1:
            raise ValueError(f"cls_pt_layers must be at least 1, got {self.cls_pt_layers}")
        if not 0.0 < self.mae_mask_ratio < 1.0:
            raise ValueError(f"mae_mask_ratio must be in (0, 1), got {self.mae_mask_ratio}")
        for name in ("amae_mask_ratio", "beats_mask_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.amae_decoder_dim % self.amae_decoder_heads or self.amae_decoder_dim % 4:
            raise ValueError(
                f"amae_decoder_dim {self.amae_decoder_dim} must be divisible by amae_decoder_heads "
                f"{self.amae_decoder_heads} and by 4"
            )
        if self.audio_codebook_size < 2:
            raise ValueError(f"audio_codebook_size must be at least 2, got {self.audio_codebook_size}")
        if self.mae_decoder_dim % self.mae_decoder_heads or self.mae_decoder_dim % 4:
            raise ValueError(
                f"mae_decoder_dim {self.mae_decoder_dim} must be divisible by mae_decoder_heads "
                f"{self.mae_decoder_heads} and by 4"
            )
