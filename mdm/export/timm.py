"""The vision tower of a Multiway Transformer as a timm ``VisionTransformer`` (Wightman, timm).

An image-only forward uses only the vision expert of every multiway module, so the vision tower is a
plain pre-norm ViT:

* ``beit3_*`` (torchscale BEiT-3: per-modality attention, Sub-LN, eps 1e-5) → timm's own
  ``beit3_<size>_patch16_224`` entry point, i.e. ``VisionTransformer(scale_attn_norm=True,
  scale_mlp_norm=True)`` with LayerNorm eps 1e-5 — the same remap timm's ``_convert_beit3`` applies to
  unilm checkpoints (branch ``A`` kept; ``inner_attn_ln`` → ``attn.norm``; ``ffn_layernorm`` → ``mlp.norm``);
* ``vlmo_*`` (shared attention, vision FFN, layer scale, eps 1e-6) → ``vit_base_patch16_224``-style
  ``VisionTransformer(init_values=...)``: ``gamma_attn/gamma_ffn`` → ``ls1.gamma/ls2.gamma``.

Other sizes use the same entry points with ``embed_dim/depth/num_heads/mlp_ratio/img_size`` overridden;
the exact arguments are written to ``config.json`` in timm's hub format, so both
``timm.create_model(arch, checkpoint_path=<dir>/model.safetensors, **model_args)`` and
``timm.create_model("local-dir:<dir>", pretrained=True)`` rebuild the model. Position rows: mdm keeps
fairseq's layout (rows 0–1 unused, row 2 = [CLS]); timm's ``pos_embed`` is rows 2.. as (1, 1 + P, D).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mdm.models.config import ModelConfig
from mdm.models.layers.embeddings import POS_OFFSET

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: LayerNorm eps → timm entry point whose ``norm_layer`` has that eps (others are not expressible in a
#: JSON ``model_args``).
_ARCH_BY_EPS = {1e-5: "beit3_base_patch16_224", 1e-6: "vit_base_patch16_224"}
_CLASSIFIER = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
# mdm keys of the text / vision-language branches and of MIM-only tensors: not part of the vision tower.
_NOT_VISION = (
    "text_embed.",
    "text_pos_embed.",
    "vision_embed.mask_token",
    "norm.text.",
    "audio_embed.",
    "audio_pos_embed",
    "norm.audio.",
)


def _is_vision_key(k: str) -> bool:
    return not (k.startswith(_NOT_VISION) or ".text." in k or ".vl." in k or ".audio." in k)


def _layer_map(cfg: ModelConfig, i: int) -> dict[str, str]:
    """mdm → timm names of layer ``i``'s vision path (weights and biases listed separately)."""
    a = ".vision" if not cfg.shared_attention else ""  # multiway attention modules carry an expert name
    src, dst = f"layers.{i}.", f"blocks.{i}."
    pairs = {
        f"attn_norm{a}": "norm1",
        f"attn.qkv{a}": "attn.qkv",
        f"attn.out_proj{a}": "attn.proj",
        "ffn.vision.norm": "norm2",
        "ffn.vision.fc1": "mlp.fc1",
        "ffn.vision.fc2": "mlp.fc2",
    }
    if cfg.subln:
        pairs.update({f"attn.inner_norm{a}": "attn.norm", "ffn.vision.sub_norm": "mlp.norm"})
    out = {}
    for s, d in pairs.items():
        out[f"{src}{s}.weight"] = f"{dst}{d}.weight"
        if not (s.startswith("attn.qkv") and not cfg.qkv_bias):
            out[f"{src}{s}.bias"] = f"{dst}{d}.bias"
    if cfg.layer_scale_init > 0:
        out[f"{src}gamma_attn"] = f"{dst}ls1.gamma"
        out[f"{src}gamma_ffn"] = f"{dst}ls2.gamma"
    return out


def _has_classifier(heads: Mapping[str, torch.Tensor]) -> bool:
    return all(k in heads for k in _CLASSIFIER) and heads["head.weight"].ndim == 2


def timm_model_args(cfg: ModelConfig, heads: Mapping[str, torch.Tensor] | None = None) -> tuple[str, dict]:
    """The timm entry point and ``create_model`` keyword arguments that rebuild this vision tower.

    With a unilm-style image-classification head (``fc_norm`` + ``head`` over the mean of the patch
    tokens) it is kept as timm's ``fc_norm``/``head``; otherwise the model has no classifier
    (``num_classes=0``) and, when the backbone normalises its output, timm's final ``norm``.

    Raises:
        ValueError: when the structure has no timm equivalent.
    """
    if not cfg.has_vision:
        raise ValueError(
            f"a {cfg.arch} model has no vision tower to export to timm (modalities {cfg.modalities}); "
            "use --format safetensors"
        )
    arch = _ARCH_BY_EPS.get(cfg.norm_eps)
    if arch is None:
        raise ValueError(
            f"LayerNorm eps {cfg.norm_eps} has no timm VisionTransformer entry point: the timm export "
            "supports eps 1e-5 (beit3_* → timm beit3_*) and 1e-6 (vlmo_* → timm vit_*)"
        )
    ratio = cfg.ffn_dim / cfg.embed_dim
    if int(cfg.embed_dim * ratio) != cfg.ffn_dim:
        raise ValueError(f"ffn_dim {cfg.ffn_dim} is not reachable as int(embed_dim * mlp_ratio) in timm")
    args: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=ratio,
        qkv_bias=cfg.qkv_bias,
        scale_attn_norm=cfg.subln,
        scale_mlp_norm=cfg.subln,
        init_values=cfg.layer_scale_init if cfg.layer_scale_init > 0 else None,
        class_token=True,
        global_pool="avg",
    )
    heads = heads or {}
    if _has_classifier(heads):
        if cfg.normalize_output:
            raise ValueError(
                "the backbone has a final norm and the head an fc_norm: timm's VisionTransformer has one or "
                "the other (unilm's image classifier uses normalize_output=False)"
            )
        args.update(num_classes=int(heads["head.weight"].shape[0]), fc_norm=True, final_norm=True)
    else:
        args.update(num_classes=0, fc_norm=False, final_norm=cfg.normalize_output)
    return arch, args


def mdm_to_timm(
    cfg: ModelConfig, backbone: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The vision tower's weights under timm ``VisionTransformer`` names.

    Raises:
        ValueError: a vision-path tensor that has no place in the timm model, or a missing one.
    """
    names = {
        "vision_embed.cls_token": "cls_token",
        "vision_embed.proj.weight": "patch_embed.proj.weight",
        "vision_embed.proj.bias": "patch_embed.proj.bias",
    }
    for i in range(cfg.depth):
        names.update(_layer_map(cfg, i))
    if cfg.normalize_output:
        names.update({"norm.vision.weight": "norm.weight", "norm.vision.bias": "norm.bias"})
    out: dict[str, torch.Tensor] = {}
    for src, dst in names.items():
        if src not in backbone:
            raise ValueError(f"the backbone has no {src!r}, needed for timm's {dst!r}")
        out[dst] = backbone[src]
    out["pos_embed"] = backbone["vision_pos_embed.weight"][POS_OFFSET:].unsqueeze(0)  # (1, 1 + P, D)
    used = set(names) | {"vision_pos_embed.weight"}
    extra = [k for k in backbone if k not in used and _is_vision_key(k)]
    if extra:
        raise ValueError(f"vision-path tensors with no timm VisionTransformer equivalent: {extra[:8]}")
    if heads and _has_classifier(heads):
        out.update({k: heads[k] for k in _CLASSIFIER})
    return out


def export_timm(
    cfg: ModelConfig,
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, torch.Tensor] | None,
    out_dir: str | Path,
) -> tuple[Path, str, dict[str, Any]]:
    """Writes ``model.safetensors`` (timm names) and ``config.json`` (timm hub format) into ``out_dir``.

    Returns:
        The directory, the timm entry point and its ``model_args``.
    """
    from mdm.models.io import atomic_write_bytes, save_safetensors_atomic

    arch, args = timm_model_args(cfg, heads)
    sd = mdm_to_timm(cfg, backbone, heads)
    skipped = sorted(k for k in (heads or {}) if k not in sd)
    if skipped:
        log.warning("not part of the timm vision tower, dropped: %s", skipped[:8])
    out = Path(out_dir)
    save_safetensors_atomic(sd, out / WEIGHTS)
    size = cfg.img_size
    config = {
        "architecture": arch,
        "num_classes": args["num_classes"],
        "num_features": cfg.embed_dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [cfg.in_chans, size, size],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": [0.5, 0.5, 0.5],  # BEiT-3 vision-language transforms (IMAGENET_INCEPTION)
            "std": [0.5, 0.5, 0.5],
            "num_classes": args["num_classes"],
            "tag": f"mdm_{cfg.arch}",
        },
    }
    atomic_write_bytes(out / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return out, arch, args


def load_timm_export(out_dir: str | Path) -> torch.nn.Module:
    """Rebuilds an exported vision tower with ``timm.create_model(arch, checkpoint_path=..., **model_args)``
    (strict load)."""
    import timm

    out = Path(out_dir)
    config = json.loads((out / CONFIG).read_text())
    return timm.create_model(
        config["architecture"], checkpoint_path=str(out / WEIGHTS), **config["model_args"]
    )
