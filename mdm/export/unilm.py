"""Conversion between torchscale/unilm BEiT-3 state dicts and mdm's ``beit3_*`` layout.

torchscale names (``encoder.layers.{i}.self_attn.q_proj.A.weight``, ``A`` = vision, ``B`` = language)
map one-to-one onto ours (``layers.{i}.attn.qkv.vision.weight``) except that q, k and v are fused into
one ``qkv`` Linear per expert (concatenated in q, k, v order; split back on export, exactly).
Reference: microsoft/torchscale ``torchscale/model/BEiT3.py`` and unilm ``beit3/modeling_finetune.py``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mdm.models.config import SIZES, ModelConfig, make_config
from mdm.models.layers.embeddings import POS_OFFSET, resize_vision_pos_table

log = logging.getLogger(__name__)

EXPERT = {"A": "vision", "B": "text"}
EXPERT_BACK = {v: k for k, v in EXPERT.items()}

# torchscale sub-name inside a layer → mdm sub-name (``{e}`` = expert).
_LAYER_MAP = {
    "self_attn.out_proj.{E}": "attn.out_proj.{e}",
    "self_attn.inner_attn_ln.{E}": "attn.inner_norm.{e}",
    "self_attn_layer_norm.{E}": "attn_norm.{e}",
    "ffn.{E}.fc1": "ffn.{e}.fc1",
    "ffn.{E}.fc2": "ffn.{e}.fc2",
    "ffn.{E}.ffn_layernorm": "ffn.{e}.sub_norm",
    "final_layer_norm.{E}": "ffn.{e}.norm",
}
_TOP_MAP = {
    "text_embed.weight": "text_embed.weight",
    "vision_embed.mask_token": "vision_embed.mask_token",
    "vision_embed.cls_token": "vision_embed.cls_token",
    "vision_embed.proj.weight": "vision_embed.proj.weight",
    "vision_embed.proj.bias": "vision_embed.proj.bias",
    "encoder.embed_positions.A.weight": "vision_pos_embed.weight",
    "encoder.embed_positions.B.weight": "text_pos_embed.weight",
    "encoder.layer_norm.A.weight": "norm.vision.weight",
    "encoder.layer_norm.A.bias": "norm.vision.bias",
    "encoder.layer_norm.B.weight": "norm.text.weight",
    "encoder.layer_norm.B.bias": "norm.text.bias",
}
_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV_RE = re.compile(r"^self_attn\.([qkv])_proj\.([AB])$")


def _layer_key_to_mdm(i: int, sub: str, kind: str) -> str | None:
    for src, dst in _LAYER_MAP.items():
        for E, e in EXPERT.items():
            if sub == src.format(E=E):
                return f"layers.{i}.{dst.format(e=e)}.{kind}"
    return None


def unwrap_checkpoint(obj: Any, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The state dict inside a unilm checkpoint: ``{"model": sd}``, ``{"module": sd}`` or a bare sd."""
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError(
        f"{source}: not a BEiT-3 checkpoint: expected a state dict or a mapping with 'model'/'module'"
    )


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "beit3.") -> tuple[dict, dict]:
    """Splits ``sd`` into backbone keys (prefix removed) and the rest (task heads etc.)."""
    backbone, rest = {}, {}
    has_prefix = any(k.startswith(prefix) for k in sd)
    for k, v in sd.items():
        if has_prefix:
            (backbone if k.startswith(prefix) else rest)[k.removeprefix(prefix)] = v
        else:
            (backbone if (k in _TOP_MAP or k.startswith("encoder.")) else rest)[k] = v
    return backbone, rest


def torchscale_to_mdm(
    sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>"
) -> dict[str, torch.Tensor]:
    """Maps a torchscale ``BEiT3`` state dict (no ``beit3.`` prefix) to mdm ``beit3_*`` names.

    Raises:
        ValueError: on a key that is not part of torchscale's BEiT3 backbone, or an incomplete q/k/v set.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = v
            continue
        m = _LAYER_RE.match(k)
        if m is None:
            raise ValueError(f"{source}: unexpected key {k!r} in the BEiT-3 backbone")
        i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
        q = _QKV_RE.match(sub)
        if q is not None:
            qkv.setdefault((i, EXPERT[q.group(2)], kind), {})[q.group(1)] = v
            continue
        dst = _layer_key_to_mdm(i, sub, kind)
        if dst is None:
            raise ValueError(f"{source}: unexpected key {k!r} in the BEiT-3 backbone")
        out[dst] = v
    for (i, e, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{source}: layer {i} {e} attention has only {sorted(parts)} of q/k/v {kind}")
        out[f"layers.{i}.attn.qkv.{e}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def mdm_to_torchscale(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`torchscale_to_mdm` (exact)."""
    top_back = {v: k for k, v in _TOP_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in top_back:
            out[top_back[k]] = v
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None:
            raise ValueError(f"key {k!r} has no torchscale equivalent")
        i, sub, kind = int(m.group(1)), m.group(2), m.group(3)
        q = re.match(r"^attn\.qkv\.(vision|text)$", sub)
        if q is not None:
            E = EXPERT_BACK[q.group(1)]
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{name}_proj.{E}.{kind}"] = part.clone()
            continue
        for src, dst in _LAYER_MAP.items():
            for E, e in EXPERT.items():
                if sub == dst.format(e=e):
                    out[f"encoder.layers.{i}.{src.format(E=E)}.{kind}"] = v
                    break
            else:
                continue
            break
        else:
            raise ValueError(
                f"key {k!r} has no torchscale equivalent (only the beit3 layout — multiway attention, "
                "no VL-FFN, no layer scale — exports to unilm)"
            )
    return out


def infer_config(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None, source: str = "<checkpoint>"
) -> ModelConfig:
    """Reads the architecture off an mdm-named ``beit3`` state dict.

    The number of heads is not visible in the weights: it is taken from the standard size with the
    same width (768 → 12, 1024/1408 → 16) unless ``num_heads`` is given.
    """
    try:
        vocab, dim = sd["text_embed.weight"].shape
        patch = sd["vision_embed.proj.weight"].shape[-1]
        in_chans = sd["vision_embed.proj.weight"].shape[1]
        grid = math.isqrt(sd["vision_pos_embed.weight"].shape[0] - POS_OFFSET - 1)
        max_text = sd["text_pos_embed.weight"].shape[0]
        ffn = sd["layers.0.ffn.vision.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{source}: missing backbone key {e.args[0]!r}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    if num_heads is None:
        by_dim = {d: h for (_, d, h, _) in SIZES.values()}
        if dim not in by_dim:
            raise ValueError(f"{source}: width {dim} is not a standard size; pass num_heads explicitly")
        num_heads = by_dim[dim]
    return make_config(
        _arch_name(dim, depth),
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads,
        ffn_dim=ffn,
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        vocab_size=vocab,
        max_text_positions=max_text,
        normalize_output="norm.vision.weight" in sd,
    )


def _arch_name(dim: int, depth: int) -> str:
    for size, (d, w, _, _) in SIZES.items():
        if (d, w) == (depth, dim):
            return f"beit3_{size}"
    return "beit3_base"


def load_unilm_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads a ``.pth`` with ``weights_only=True`` (no code runs) and returns its state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint: {e}") from None
    return unwrap_checkpoint(obj, str(path))


def import_unilm(
    path: str | Path,
    out_dir: str | Path,
    num_heads: int | None = None,
    img_size: int | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Converts a torchscale/unilm BEiT-3 checkpoint into an mdm model directory.

    Args:
        path: ``.pth`` file: ``{"model": sd}`` or a bare state dict; keys with or without ``beit3.``.
        out_dir: where to write ``model.safetensors`` + ``config.json``.
        num_heads: attention heads, when the width is not a standard size.
        img_size: resize the vision position table to this resolution (bicubic).

    Returns:
        The output directory and the checkpoint's non-backbone tensors (task heads), which are saved
        as ``heads.safetensors`` beside the model.
    """
    from mdm.models.io import save_pretrained, save_safetensors_atomic
    from mdm.models.multiway import MultiwayTransformer

    raw = load_unilm_checkpoint(path)
    backbone, rest = strip_prefix(raw)
    sd = torchscale_to_mdm(backbone, str(path))
    cfg = infer_config(sd, num_heads, str(path))
    if img_size is not None and img_size != cfg.img_size:
        sd["vision_pos_embed.weight"] = resize_vision_pos_table(
            sd["vision_pos_embed.weight"], img_size // cfg.patch_size
        )
        cfg.img_size = img_size
    model = MultiwayTransformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: backbone does not match: missing {missing}, unexpected {unexpected}")
    out = save_pretrained(model, out_dir, extra={"source": {"format": "unilm", "path": str(path)}})
    if rest:
        save_safetensors_atomic(rest, Path(out) / "heads.safetensors")
        log.info("kept %d non-backbone tensors in heads.safetensors: %s", len(rest), sorted(rest)[:6])
    return out, rest


# ---------------------------------------------------------------------------------------------------------
# Whole unilm checkpoints (backbone + task heads) in both directions.
#
# unilm's task wrappers (``beit3/modeling_finetune.py``) hold the backbone as ``self.beit3`` and the heads
# under their own names; mdm's task models hold it as ``self.backbone`` with the *same* head names. So a
# unilm key is either ``beit3.<torchscale key>`` ↔ ``backbone.<mdm key>``, or a head key, unchanged.

UNILM_PREFIX = "beit3."
TASK_PREFIX = "backbone."

#: Head parameter prefixes of each unilm/beit3 model variant (``beit3_<size>_patch16_<res>_<suffix>``).
UNILM_VARIANT_HEADS: dict[str, tuple[str, ...]] = {
    "vqav2": ("pooler.norm.", "pooler.dense.", "head.0.", "head.1.", "head.3."),
    "nlvr2": ("head.norm1.", "head.dense1.", "head.norm2.", "head.dense2."),
    "retrieval": ("language_head.", "vision_head.", "logit_scale"),
    "imageclassification": ("fc_norm.", "head.weight", "head.bias"),
    "captioning": ("mlm_head.",),
}


#: mdm task heads that unilm/beit3 has no module for: retrieval's ITM head (VLMo's two-stage retrieval;
#: ``BEiT3ForRetrieval`` is a dual encoder only). Exporting to unilm leaves them out, with a log message.
NOT_IN_UNILM: dict[str, str] = {
    "itm_head.": "the retrieval model's ITM head (unilm's BEiT3ForRetrieval is a dual encoder without one)",
}


def unilm_variant(heads: Mapping[str, torch.Tensor]) -> str | None:
    """The unilm model variant whose head names match ``heads`` exactly (``None`` for a bare backbone
    or unknown heads). ``-itc`` checkpoints carry the retrieval heads."""
    if not heads:
        return None
    for name, prefixes in UNILM_VARIANT_HEADS.items():
        keys = set(heads)
        if all(any(k.startswith(p) for k in keys) for p in prefixes) and all(
            any(k.startswith(p) for p in prefixes) for k in keys
        ):
            return name
    return None


def check_unilm_layout(cfg: ModelConfig) -> None:
    """Raises ValueError, naming every difference, when ``cfg`` is not torchscale's BEiT3 architecture.

    Only the decoupled multiway layout (``beit3_*`` presets) exists in unilm: per-modality attention,
    Sub-LN, no VL-FFN, no layer scale, qkv bias, LayerNorm eps 1e-5.
    """
    wanted = {
        "shared_attention": False,
        "vl_ffn_layers": 0,
        "subln": True,
        "layer_scale_init": 0.0,
        "qkv_bias": True,
        "norm_eps": 1e-5,
    }
    bad = [f"{k}={getattr(cfg, k)!r} (unilm needs {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if list(cfg.modalities) != ["vision", "text"]:
        bad.append(f"modalities={list(cfg.modalities)!r} (unilm needs ['vision', 'text'])")
    if bad:
        raise ValueError(
            f"a {cfg.arch} model cannot be written in the unilm/torchscale BEiT-3 layout: "
            + ", ".join(bad)
            + ". Only beit3_* architectures export to unilm; use --format safetensors or timm instead."
        )


def unilm_to_mdm(sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> tuple[dict, dict]:
    """A unilm state dict → (mdm backbone weights, head tensors with unchanged names)."""
    backbone, heads = strip_prefix(sd, UNILM_PREFIX)
    return torchscale_to_mdm(backbone, source), heads


def mdm_to_unilm(
    backbone: Mapping[str, torch.Tensor], heads: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """mdm backbone weights (+ task heads) → a unilm state dict (``beit3.`` prefix, heads unchanged).

    Exact inverse of :func:`unilm_to_mdm`.
    """
    out = {UNILM_PREFIX + k: v for k, v in mdm_to_torchscale(backbone).items()}
    for k, v in (heads or {}).items():
        if k.startswith(UNILM_PREFIX) or k in out:
            raise ValueError(f"head tensor {k!r} collides with the backbone's 'beit3.' namespace")
        out[k] = v
    return out


def unilm_to_task_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> dict:
    """A unilm state dict → the state dict of the matching mdm task model (``backbone.*`` + heads)."""
    backbone, heads = unilm_to_mdm(sd, source)
    return {**{TASK_PREFIX + k: v for k, v in backbone.items()}, **heads}


def task_state_dict_to_unilm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mdm task-model state dict (``backbone.*`` + heads) → a unilm state dict."""
    backbone = {k[len(TASK_PREFIX) :]: v for k, v in sd.items() if k.startswith(TASK_PREFIX)}
    heads = {k: v for k, v in sd.items() if not k.startswith(TASK_PREFIX)}
    return mdm_to_unilm(backbone, heads)


def save_unilm_checkpoint(sd: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Writes ``{"model": sd}`` with ``torch.save`` atomically (temporary file, then rename) — the
    container unilm's ``load_model_and_may_interpolate`` reads."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": {k: v.detach().contiguous() for k, v in sd.items()}}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_unilm(
    cfg: ModelConfig,
    backbone: Mapping[str, torch.Tensor],
    heads: Mapping[str, torch.Tensor] | None,
    out_path: str | Path,
) -> tuple[Path, str | None]:
    """Writes an mdm ``beit3_*`` model (and its task heads) as an official unilm/beit3 checkpoint.

    Args:
        cfg: the backbone config (checked with :func:`check_unilm_layout`).
        backbone: mdm-named backbone weights.
        heads: task-head tensors named as in unilm (``head.*``, ``pooler.*``, ``vision_head.*``...).
        out_path: the ``.pth`` file to write.

    Returns:
        The file, and the unilm variant the heads belong to (``vqav2``, ``retrieval``...; None for a
        bare backbone or unrecognised heads), to name the matching unilm model.
    """
    check_unilm_layout(cfg)
    variant = unilm_variant(heads or {})
    if heads and variant is None:
        log.warning("heads %s match no unilm/beit3 task; written unchanged", sorted(heads)[:6])
    return save_unilm_checkpoint(mdm_to_unilm(backbone, heads), out_path), variant


def unilm_model_name(cfg: ModelConfig, variant: str | None) -> str:
    """The unilm/beit3 timm-registered model name for this size, resolution and task."""
    size = cfg.arch.split("_", 1)[-1] if cfg.arch.startswith("beit3_") else "base"
    name = f"beit3_{size}_patch{cfg.patch_size}_{cfg.img_size}"
    return f"{name}_{variant}" if variant else name
