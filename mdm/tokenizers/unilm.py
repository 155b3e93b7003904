"""Key map between unilm BEiT v2 VQ-KD checkpoints and :class:`~mdm.tokenizers.vqkd.VQKD`.

unilm (``beit2/modeling_vqkd.py``, checkpoint container ``{"model": state_dict}``) and mdm use the same
names inside the encoder and decoder ViTs. The rest maps as follows (facts: ``beit-family.md`` §4.1):

=====================================  ==================================
unilm                                  mdm
=====================================  ==================================
``encode_task_layer.{0,2}.*``          ``encode_proj.{0,2}.*``
``decode_task_layer.{0,2}.*``          ``decode_proj.{0,2}.*``
``quantize.embedding.weight``          ``quantizer.codebook``
``quantize.cluster_size``              ``quantizer.cluster_size``
``quantize.embedding.initted``         ``quantizer.initted`` (shape (1,) ↔ ())
``quantize.embedding.cluster_size``    — (unused by unilm's norm-EMA path; zeros on export)
``quantize.embedding.embed_avg``       — (unused; the codebook on export)
``teacher_model.*``, ``scaling_layer.*``, ``loss*``   dropped (``as_tokenzer=True`` does the same)
=====================================  ==================================

mdm's ``quantizer.steps`` and ``quantizer.window_counts`` (dead-code bookkeeping) have no unilm
counterpart (zeros on import, dropped on export). Head counts are not stored in a
state dict; they default to ``embed_dim / 64`` (12 for ViT-B) and can be given.
"""

from __future__ import annotations

import math

import torch

from mdm.tokenizers.config import ViTConfig, VQKDConfig

__all__ = ["vqkd_from_unilm", "vqkd_to_unilm", "infer_vqkd_config"]

_RENAMES = (
    ("encode_task_layer.", "encode_proj."),
    ("decode_task_layer.", "decode_proj."),
    ("quantize.embedding.weight", "quantizer.codebook"),
    ("quantize.cluster_size", "quantizer.cluster_size"),
    ("quantize.embedding.initted", "quantizer.initted"),
)
_DROPPED = (
    "teacher_model.",
    "scaling_layer.",
    "loss",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
)


def vqkd_from_unilm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """unilm VQ-KD state dict → mdm :class:`VQKD` state dict (teacher and unused keys dropped)."""
    out: dict[str, torch.Tensor] = {"quantizer.steps": torch.tensor(0, dtype=torch.long)}
    if "quantize.embedding.weight" in sd:
        out["quantizer.window_counts"] = torch.zeros(sd["quantize.embedding.weight"].shape[0])
    for key, value in sd.items():
        if key.startswith(_DROPPED):
            continue
        new = key
        for a, b in _RENAMES:
            if key.startswith(a):
                new = b + key[len(a) :]
                break
        out[new] = value.reshape(()) if new == "quantizer.initted" else value
    return out


def vqkd_to_unilm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mdm :class:`VQKD` state dict → unilm layout (loadable with ``as_tokenzer=True``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in ("quantizer.steps", "quantizer.window_counts"):
            continue
        new = key
        for a, b in _RENAMES:
            if key.startswith(b):
                new = a + key[len(b) :]
                break
        out[new] = value.reshape(1) if key == "quantizer.initted" else value
    codebook = sd["quantizer.codebook"]
    out["quantize.embedding.cluster_size"] = torch.zeros(codebook.shape[0], dtype=codebook.dtype)
    out["quantize.embedding.embed_avg"] = codebook.clone()
    return out


def _vit_config(sd: dict[str, torch.Tensor], prefix: str, num_heads: int | None) -> ViTConfig:
    dim = sd[f"{prefix}.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith(f"{prefix}.blocks.")})
    hidden = sd[f"{prefix}.blocks.0.mlp.fc1.weight"].shape[0]
    return ViTConfig(
        embed_dim=dim, depth=depth, num_heads=num_heads or max(1, dim // 64), mlp_ratio=hidden / dim
    )


def infer_vqkd_config(
    sd: dict[str, torch.Tensor], encoder_heads: int | None = None, decoder_heads: int | None = None
) -> VQKDConfig:
    """The :class:`VQKDConfig` of an mdm-layout VQ-KD state dict, read off the tensor shapes."""
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["encoder.pos_embed"].shape[1] - 1)
    codebook = sd["quantizer.codebook"]
    return VQKDConfig(
        img_size=grid * patch,
        patch_size=patch,
        encoder=_vit_config(sd, "encoder", encoder_heads),
        decoder=_vit_config(sd, "decoder", decoder_heads),
        codebook_size=codebook.shape[0],
        code_dim=codebook.shape[1],
        teacher_dim=sd["decode_proj.2.weight"].shape[0],
    )
