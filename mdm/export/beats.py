"""``mdm import beats <checkpoint.pt> <out_dir>``: a released BEATs checkpoint → an mdm model directory.

The release (microsoft/unilm ``beats/``) stores ``{"cfg": dict, "model": state_dict}``; the state dict's
names are :class:`mdm.models.beats.BEATsEncoder`'s, so the conversion is 1:1 and strict. Also accepted:
the weight-normed conv under PyTorch's newer parametrization names
(``encoder.pos_conv.0.parametrizations.weight.original0/1`` = ``weight_g``/``weight_v``) and checkpoints
that list the shared relative-position table under layer 0 only. ``cfg`` keys that the architecture does
not use are recorded in ``config.json`` (``ignored_cfg_keys``). The file is read with
``torch.load(weights_only=True)``: no code in it runs.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mdm.config import from_dict
from mdm.models.beats import BEATsConfig, BEATsEncoder
from mdm.models.io import save_pretrained

log = logging.getLogger(__name__)

_PARAMETRIZED = {
    "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
}


def read_beats_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg dict, state dict) of a released BEATs file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types; report them for people
        raise ValueError(
            f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a BEATs checkpoint (expected keys 'cfg' and 'model', got {keys})")
    cfg = ckpt["cfg"]
    if not isinstance(cfg, dict):  # some re-saves keep the BEATsConfig object's __dict__ only
        raise ValueError(f"{path}: 'cfg' is a {type(cfg).__name__}, expected a dict")
    return dict(cfg), dict(ckpt["model"])


def beats_config(cfg: dict[str, Any], source: str) -> tuple[BEATsConfig, list[str]]:
    """The :class:`BEATsConfig` of a released ``cfg`` dict and the keys it does not use."""
    known = {f.name for f in fields(BEATsConfig)}
    ignored = sorted(k for k in cfg if k not in known)
    return from_dict(
        BEATsConfig, {k: v for k, v in cfg.items() if k in known}, source=source, prefix="cfg."
    ), ignored


def convert_state_dict(
    sd: dict[str, torch.Tensor], model: BEATsEncoder, source: str
) -> dict[str, torch.Tensor]:
    """The release's names → ours (1:1; see the module docstring); raises naming missing/unexpected keys."""
    out = {_PARAMETRIZED.get(k, k): v for k, v in sd.items()}
    own = model.state_dict()
    table = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    if table in out:  # the table is shared: fill the other layers' names when a file lists layer 0 only
        for k in own:
            if k.endswith("self_attn.relative_attention_bias.weight") and k not in out:
                out[k] = out[table]
    missing = sorted(set(own) - set(out))
    unexpected = sorted(set(out) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the BEATs config: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in out.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the config: {wrong[:4]} (file, expected)")
    return out


def import_beats(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Converts a released BEATs checkpoint into an mdm model directory (``family: beats``)."""
    raw_cfg, sd = read_beats_checkpoint(checkpoint)
    cfg, ignored = beats_config(raw_cfg, str(checkpoint))
    with torch.device("meta"):
        model = BEATsEncoder(cfg)
    model.load_state_dict(convert_state_dict(sd, model, str(checkpoint)), strict=True, assign=True)
    if ignored:
        log.info("%s: cfg keys not used by the architecture: %s", checkpoint, ignored)
    extra = {"family": "beats", "source": str(checkpoint), "ignored_cfg_keys": ignored}
    return save_pretrained(model, out_dir, extra=extra)
