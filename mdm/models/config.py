"""Configuration and presets of the Multiway Transformer.

Two layouts share one implementation:

* ``vlmo_*`` — the design of the VLMo and BEiT-3 papers (Bao et al., 2022; Wang et al., 2023):
  **shared** self-attention, a vision FFN and a language FFN in every layer, and a vision-language FFN
  that the joint (image+text) input uses in the top ``vl_ffn_layers`` layers. Our default for pretraining.
* ``beit3_*`` — the released BEiT-3 (torchscale ``BEiT3``): every Linear and LayerNorm, attention
  included, has a vision and a language copy; Sub-LN (Magneto); no VL-FFN. State dicts convert to and
  from torchscale/unilm checkpoints (see :mod:`mdm.export.unilm`).

Audio (``docs/audio.md``) is a third modality of the same layouts: ``modalities`` lists which experts
exist. ``audiomae_*`` is audio alone with AudioMAE's encoder shapes (a pre-LN ViT over 16×16
spectrogram patches; released checkpoints import with ``mdm import audiomae``); ``beats_*`` has
BEATs' shapes, trained here with the ``beats`` objective (released BEATs checkpoints, with their
post-LN, convolutional positions and gated relative bias, load into :class:`mdm.models.BEATsEncoder`
instead); ``vlmo_*_audio`` adds an audio expert to VLMo's vision and language experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mdm.registry import Registry

#: Preset name → function returning the preset's field values.
PRESETS: Registry = Registry("model")

# (depth, embed_dim, num_heads, ffn_dim) per size.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 128, 4, 512),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
    "giant": (40, 1408, 16, 6144),
}
# Top layers with a VL-FFN in the paper design: 2 of 12 (VLMo-base), 3 of 24 (VLMo-large / BEiT-3 paper).
VL_FFN_LAYERS = {"tiny": 1, "base": 2, "large": 3, "giant": 3}


@dataclass
class ModelConfig:
    """Architecture of a Multiway Transformer.

    Attributes:
        arch: the preset the other fields start from (``vlmo_base``, ``beit3_tiny``, ...).
        embed_dim: width D.
        depth: number of layers.
        num_heads: attention heads.
        ffn_dim: hidden width of each FFN expert.
        img_size: input resolution the vision position table is built for.
        patch_size: side of a square patch.
        in_chans: image channels.
        vocab_size: rows of the text embedding (64010 for BEiT-3's XLM-R SentencePiece).
        max_text_positions: rows of the text position table, including the two unused fairseq rows
            (so at most ``max_text_positions - 2`` text tokens).
        shared_attention: one attention block for all tokens (VLMo) instead of per-modality copies (BEiT-3).
        vl_ffn_layers: how many of the top layers have a vision-language FFN expert.
        subln: Sub-LN (Magneto): a LayerNorm before the attention output projection and inside each FFN.
        layer_scale_init: initial value of per-channel residual scales (0 disables them).
        norm_eps: LayerNorm epsilon.
        qkv_bias: bias on the query/key/value projections.
        normalize_output: a final (multiway) LayerNorm after the last layer.
        drop_path_rate: stochastic depth at the last layer (linearly increasing from 0).
        attn_drop: attention-probability dropout.
        grad_checkpointing: recompute layer activations in the backward pass.
        modalities: which experts and embeddings exist: ``vision``, ``text``, ``audio``.
        audio_frames: fbank frames T the audio position table is built for (1024 = AudioMAE's 10.24 s);
            other lengths crop it or interpolate it along time.
        audio_mel_bins: mel bins F of the audio input (128 in AudioMAE and BEATs).
        audio_patch_size: side of a square spectrogram patch (16 × 16 over time × frequency).
        audio_pos_trainable: learn the audio positions (initialised to 2-D sine-cosine); False keeps
            them fixed, as AudioMAE (a buffer, still saved, so an imported table is used as it is).
        audio_pos_scale: factor on the initial sine-cosine audio table (1 = AudioMAE's). The table's
            entries are ±1 whatever the input; a small model on low-contrast spectrograms can set it
            below 1 so that patch content is not drowned by positions (the tiny demo presets use 0.1,
            see docs/audio.md §7). Only the initial table: loaded weights keep their own.
        unpad: compute only on the real tokens of padded input (text with a padding mask): they are
            packed into one (n_real, D) matrix at the embedding and scattered to the padded layout for
            attention only (:mod:`mdm.models.layers.packing`). Outputs are the same as without it (the
            encoder returns 0 at padded positions either way); False runs the padded computation.
    """

    arch: str = "vlmo_tiny"
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    ffn_dim: int = 512
    img_size: int = 64
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 1024
    max_text_positions: int = 130
    shared_attention: bool = True
    vl_ffn_layers: int = 1
    subln: bool = False
    layer_scale_init: float = 0.1
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    normalize_output: bool = True
    drop_path_rate: float = 0.0
    attn_drop: float = 0.0
    grad_checkpointing: bool = False
    modalities: list[str] = field(default_factory=lambda: ["vision", "text"])
    audio_frames: int = 1024
    audio_mel_bins: int = 128
    audio_patch_size: int = 16
    audio_pos_trainable: bool = False
    audio_pos_scale: float = 1.0
    unpad: bool = True

    @classmethod
    def config_defaults(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults of the preset named by ``data["arch"]`` (used by the config loader)."""
        arch = data.get("arch", cls.arch)
        return preset_values(arch)

    def validate(self) -> None:
        """Raises ValueError on inconsistent sizes."""
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.vl_ffn_layers <= self.depth:
            raise ValueError(f"vl_ffn_layers {self.vl_ffn_layers} must be in [0, depth={self.depth}]")
        if self.max_text_positions < 3:
            raise ValueError("max_text_positions must be at least 3 (two rows are the fairseq offset)")
        known = ("vision", "text", "audio")
        bad = [m for m in self.modalities if m not in known]
        if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {self.modalities} must be distinct names among {list(known)}")
        if self.has_audio:
            p = self.audio_patch_size
            if self.audio_frames % p or self.audio_mel_bins % p:
                raise ValueError(
                    f"audio_frames {self.audio_frames} and audio_mel_bins {self.audio_mel_bins} must be "
                    f"multiples of audio_patch_size {p}"
                )
            if self.embed_dim % 4:
                raise ValueError(f"audio positions need embed_dim divisible by 4, got {self.embed_dim}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def has_vision(self) -> bool:
        return "vision" in self.modalities

    @property
    def has_text(self) -> bool:
        return "text" in self.modalities

    @property
    def has_audio(self) -> bool:
        return "audio" in self.modalities

    def audio_grid(self, frames: int | None = None) -> tuple[int, int]:
        """(time patches, frequency patches) of a clip of ``frames`` fbank frames (default
        ``audio_frames``): (64, 8) for AudioMAE's 1024 × 128."""
        p = self.audio_patch_size
        return (frames if frames is not None else self.audio_frames) // p, self.audio_mel_bins // p

    @property
    def audio_num_patches(self) -> int:
        """Patches of an ``audio_frames``-long clip (512 for 1024 × 128)."""
        t, f = self.audio_grid()
        return t * f


def preset_values(arch: str) -> dict[str, Any]:
    """Field values of the preset ``arch`` (raises KeyError with suggestions for unknown names)."""
    return dict(PRESETS.get(arch)(), arch=arch)


def _size(size: str) -> dict[str, Any]:
    depth, dim, heads, ffn = SIZES[size]
    out: dict[str, Any] = dict(depth=depth, embed_dim=dim, num_heads=heads, ffn_dim=ffn)
    if size == "tiny":
        out.update(img_size=64, patch_size=16, vocab_size=1024, max_text_positions=130)
    else:
        out.update(img_size=224, patch_size=16, vocab_size=64010, max_text_positions=1024)
    return out


def _register_presets() -> None:
    for size in SIZES:

        def beit3(size: str = size) -> dict[str, Any]:
            # torchscale EncoderConfig as used by unilm/beit3: multiway everywhere, Sub-LN, eps 1e-5.
            return dict(
                _size(size),
                shared_attention=False,
                vl_ffn_layers=0,
                subln=True,
                layer_scale_init=0.0,
                norm_eps=1e-5,
                qkv_bias=True,
                normalize_output=True,
            )

        def vlmo(size: str = size) -> dict[str, Any]:
            # VLMo: shared attention, V/L FFN experts, VL-FFN on top; pre-LN eps 1e-6, layer scale 0.1.
            return dict(
                _size(size),
                shared_attention=True,
                vl_ffn_layers=VL_FFN_LAYERS[size],
                subln=False,
                layer_scale_init=0.1 if size in ("tiny", "base") else 1e-5,
                norm_eps=1e-6,
                qkv_bias=True,
                normalize_output=True,
            )

        PRESETS.register(f"beit3_{size}")(beit3)
        PRESETS.register(f"vlmo_{size}")(vlmo)
        if size in AUDIO_SIZES:
            _register_audio_presets(size, vlmo)


# Sizes with audio presets, and the clip length their position table is built for (tiny: 5.12 s).
AUDIO_SIZES = {"tiny": 512, "base": 1024, "large": 1024}


def _register_audio_presets(size: str, vlmo: Any) -> None:
    frames = AUDIO_SIZES[size]
    audio = dict(audio_frames=frames, audio_mel_bins=128, audio_patch_size=16)

    def audiomae() -> dict[str, Any]:
        # AudioMAE's encoder (models_vit.py / models_mae.py): timm ViT blocks, pre-LN eps 1e-6, qkv bias,
        # no layer scale, fixed 2-D sine-cosine positions, one input channel, 1024 x 128 input.
        return dict(
            _size(size),
            **audio,
            modalities=["audio"],
            shared_attention=True,
            vl_ffn_layers=0,
            subln=False,
            layer_scale_init=0.0,
            norm_eps=1e-6,
            qkv_bias=True,
            normalize_output=True,
            audio_pos_trainable=False,
        )

    def beats() -> dict[str, Any]:
        # BEATs-base *shapes* (12 x 768, 12 heads, FFN 3072) in mdm's pre-LN block, eps 1e-5 as fairseq's
        # LayerNorm, learned positions (BEATs learns convolutional ones); trained with objectives: [beats].
        return dict(audiomae(), norm_eps=1e-5, audio_pos_trainable=True)

    def vlmo_audio() -> dict[str, Any]:
        # VLMo with a third FFN expert for audio beside vision and language; joint audio-text input uses
        # the VL-FFN of the top layers, as image-text does.
        return dict(vlmo(), **audio, modalities=["vision", "text", "audio"], audio_pos_trainable=False)

    PRESETS.register(f"audiomae_{size}")(audiomae)
    if size != "large":
        PRESETS.register(f"beats_{size}")(beats)
        PRESETS.register(f"vlmo_{size}_audio")(vlmo_audio)


_register_presets()


def make_config(arch: str, **overrides: Any) -> ModelConfig:
    """The config of preset ``arch`` with ``overrides`` applied (unknown fields raise TypeError)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = set(overrides) - names
    if bad:
        import difflib

        hints = {b: difflib.get_close_matches(b, names, n=1) for b in bad}
        raise TypeError(f"unknown ModelConfig fields {sorted(bad)}; closest: {hints}")
    cfg = ModelConfig(**{**preset_values(arch), **overrides})
    cfg.validate()
    return cfg
