"""mdm — masked data modeling for Multiway Transformers (BEiT, BEiT v2, BEiT-3, VLMo, MAE).

Pretrain with MIM / MLM / MVLM against dVAE or VQ-KD visual tokens, fine-tune on VQAv2, NLVR2 and
retrieval, and export checkpoints — on one config and checkpoint format.
"""

from __future__ import annotations

__version__ = "0.1.0"


def from_pretrained(model_dir, map_location="cpu", strict=True, **overrides):
    """Loads an mdm model directory (see :func:`mdm.models.io.from_pretrained`)."""
    from mdm.models.io import from_pretrained as _load

    return _load(model_dir, map_location=map_location, strict=strict, **overrides)


__all__ = ["__version__", "from_pretrained"]
