"""``mdm import audiomae``: AudioMAE checkpoints (Huang et al., 2022, "Masked Autoencoders that Listen";
facebookresearch/AudioMAE) → an mdm audio model directory.

AudioMAE's encoder is timm's ``VisionTransformer`` with one input channel and a 1024 × 128
(time × frequency) input: ``patch_embed.proj`` (Conv2d 1 → D, 16 × 16), ``cls_token``, a fixed 2-D
sine-cosine ``pos_embed`` (1, 1 + 512, D) stored in the file, pre-LN ``blocks.N.*`` (``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; eps 1e-6, qkv bias, no layer scale) and
a final ``norm``. Pretraining files (``models_mae.py``) add the decoder (``decoder_*``, ``mask_token``),
which is dropped; fine-tuned files (``models_vit.py`` with ``global_pool``) have ``fc_norm`` + ``head``
instead of ``norm``, which are kept in ``heads.safetensors`` beside the model.

The encoder maps one-to-one onto an ``audiomae_*`` model (audio expert only). Two details:

* ``pos_embed`` is copied as it is. AudioMAE's table lays its sine-cosine grid out as 8 × 64 while the
  patches are flattened 64 × 8, so its rows do not follow (time, frequency) — it is still exactly
  the table the encoder was trained with, which is what matters for the features.
* AudioMAE's encoder never sees a [MASK] token (masked patches are dropped), so ``audio_embed.mask_token``
  has no source; it is written as zeros.

Files are read with ``torch.load(weights_only=True)``; the ``argparse.Namespace`` that AudioMAE's
``save_model`` stores under ``args`` is the one non-tensor global allowed.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mdm.models.config import ModelConfig, make_config

log = logging.getLogger(__name__)

#: timm block names → mdm layer names (audio expert; shared attention).
_BLOCK = {
    "norm1": "attn_norm",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "ffn.audio.norm",
    "mlp.fc1": "ffn.audio.fc1",
    "mlp.fc2": "ffn.audio.fc2",
}
_TOP = {
    "patch_embed.proj.weight": "audio_embed.proj.weight",
    "patch_embed.proj.bias": "audio_embed.proj.bias",
    "cls_token": "audio_embed.cls_token",
    "norm.weight": "norm.audio.weight",
    "norm.bias": "norm.audio.bias",
}
#: Tensors of AudioMAE files that are not the encoder: the pretraining decoder (dropped) and the
#: fine-tuning head (kept in heads.safetensors).
_DECODER = re.compile(r"^(decoder_|mask_token$)")
_HEADS = re.compile(r"^(fc_norm|head)\.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def load_audiomae_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an AudioMAE ``.pth`` (``{"model": sd, ...}`` or a bare state dict)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # pickle errors, truncated files, other globals
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({e}); re-save it as "
            "torch.save({'model': state_dict}, path)"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected {{'model': state_dict}} or a state dict of tensors")
    return dict(obj)


def audiomae_to_mdm(
    sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """AudioMAE names → (mdm backbone weights, kept head tensors, dropped decoder keys).

    Raises:
        ValueError: a key that is neither encoder, decoder nor head (names it), or no encoder at all.
    """
    out: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key == "pos_embed":
            if value.ndim != 3 or value.shape[0] != 1:
                raise ValueError(
                    f"{source}: pos_embed has shape {tuple(value.shape)}, expected (1, 1 + P, D)"
                )
            out["audio_pos_embed"] = value[0]  # (1 + P, D)
        elif (m := _BLOCK_KEY.match(key)) and m.group(2) in _BLOCK:
            out[f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif _DECODER.match(key):
            dropped.append(key)
        elif _HEADS.match(key):
            heads[key] = value
        else:
            raise ValueError(f"{source}: unexpected AudioMAE key {key!r} (not encoder, decoder or head)")
    if "audio_embed.proj.weight" not in out:
        raise ValueError(f"{source}: no patch_embed.proj.weight — not an AudioMAE checkpoint")
    return out, heads, dropped


def infer_audiomae_config(
    sd: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    mel_bins: int = 128,
    source: str = "<checkpoint>",
) -> ModelConfig:
    """The ``audiomae_*`` config of converted weights (depth, width, FFN, clip length from the tensors)."""
    dim, in_chans, p, q = sd["audio_embed.proj.weight"].shape
    if in_chans != 1 or p != q:
        raise ValueError(
            f"{source}: patch_embed.proj.weight is {(dim, in_chans, p, q)}, expected (D, 1, p, p)"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    ffn = sd["layers.0.ffn.audio.fc1.weight"].shape[0]
    patches = sd["audio_pos_embed"].shape[0] - 1
    freq = mel_bins // p
    if patches % freq:
        raise ValueError(
            f"{source}: pos_embed has {patches} patch rows, not a multiple of {freq} frequency patches"
        )
    heads = num_heads or max(dim // 64, 1)
    size = {768: "base", 1024: "large"}.get(dim, "base")
    return make_config(
        f"audiomae_{size}",
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        ffn_dim=ffn,
        audio_patch_size=p,
        audio_mel_bins=mel_bins,
        audio_frames=patches // freq * p,
        normalize_output="norm.audio.weight" in sd,
    )


def import_audiomae(
    path: str | Path, out_dir: str | Path, num_heads: int | None = None, mel_bins: int = 128
) -> tuple[Path, dict[str, Any]]:
    """Converts an AudioMAE checkpoint into an mdm model directory.

    Args:
        path: the ``.pth`` (pretrained or fine-tuned).
        out_dir: where to write ``model.safetensors`` + ``config.json`` (+ ``heads.safetensors``).
        num_heads: attention heads (default: width / 64, as every AudioMAE size).
        mel_bins: mel bins of the input (128 in AudioMAE).

    Returns:
        The directory and a summary (``config``, ``heads``: kept head names, ``dropped``: decoder keys).
    """
    from mdm.models.io import save_pretrained, save_safetensors_atomic
    from mdm.models.multiway import MultiwayTransformer

    sd, heads, dropped = audiomae_to_mdm(load_audiomae_checkpoint(path), str(path))
    cfg = infer_audiomae_config(sd, num_heads, mel_bins, str(path))
    sd["audio_embed.mask_token"] = torch.zeros(1, 1, cfg.embed_dim, dtype=sd["audio_embed.cls_token"].dtype)
    model = MultiwayTransformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: encoder does not match {cfg.arch}: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    out = save_pretrained(model, out_dir, extra={"source": {"format": "audiomae", "path": str(path)}})
    if heads:
        save_safetensors_atomic(heads, Path(out) / "heads.safetensors")
    if dropped:
        log.info("dropped %d pretraining-decoder tensors (e.g. %s)", len(dropped), dropped[:3])
    return Path(out), {"config": cfg, "heads": sorted(heads), "dropped": dropped}
