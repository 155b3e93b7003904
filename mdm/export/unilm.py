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


def torchscale_to_mdm(sd: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
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


def infer_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None, source: str = "<checkpoint>") -> ModelConfig:
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
        sd["vision_pos_embed.weight"] = resize_vision_pos_table(sd["vision_pos_embed.weight"], img_size // cfg.patch_size)
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
