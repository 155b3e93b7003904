"""Probes of what masked data modeling learns on the demo world (the numbers in docs/demo.md).

- :func:`mim_accuracy_by_cell`: masked-image-modeling accuracy split into masked cells that hold an
  object and empty ones, from the image alone (MIM) and with the scene's caption in the same pass (the
  image side of MVLM). Objects sit in independent random cells, so from the image alone an object cell
  can only be guessed; with the caption it can be read.
- :func:`frozen_feature_probe`: how linearly readable shape and colour are from a backbone's pooled
  image features (single-object scenes), compared across backbones — e.g. pretrained vs random init.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mdm.data.demo.examples import MEAN, STD
from mdm.data.demo.language import captions
from mdm.data.demo.scenes import make_scenes, render
from mdm.tokenizers.data import to_tensor
from mdm.tokenizers.probe import demo_probe_sets, fit_linear_probe

__all__ = ["mim_accuracy_by_cell", "frozen_feature_probe"]


@torch.no_grad()
def mim_accuracy_by_cell(
    model: Any, tokenizer: Any, text_tokenizer: Any, n: int = 500, ratio: float = 0.4, seed: int = 7
) -> dict[str, float]:
    """MIM accuracy (%) on masked object cells and masked empty cells, without and with the caption.

    Args:
        model: the pretraining model (:func:`mdm.data.demo.examples.load_pretrain_model`), whose grid is
            the scene's 3×3 grid.
        tokenizer: the visual tokenizer of the pretraining.
        text_tokenizer: the text tokenizer.
        n: held-out scenes.
        ratio: fraction of the 9 cells masked per image (uniformly drawn).
        seed: scenes and masks.
    """
    size = model.backbone.cfg.img_size
    scenes = make_scenes(n, seed, tag="mim-probe")
    images = torch.stack([to_tensor(render(s, size=size)) for s in scenes])  # (N, 3, S, S)
    has_object = torch.zeros(n, 9, dtype=torch.bool)
    for i, s in enumerate(scenes):
        for o in s.objects:
            has_object[i, 3 * o.row + o.col] = True
    rng = random.Random(seed)
    k = max(1, round(ratio * 9))
    mask = torch.zeros(n, 9, dtype=torch.bool)
    for i in range(n):
        mask[i, rng.sample(range(9), k)] = True
    codes = tokenizer.encode(images).flatten(1)  # (N, 9)
    x = (images - MEAN) / STD
    head = model.heads["mim"]
    alone = head(model.backbone(image=x, image_mask=mask)[:, 1:]).argmax(-1)  # (N, 9)
    texts = [captions(s, 1, random.Random(i))[0] for i, s in enumerate(scenes)]
    ids, pad = text_tokenizer.encode(texts, 32)
    joint = model.backbone(image=x, image_mask=mask, text=ids, text_padding_mask=pad)
    with_text = head(joint[:, 1 : 1 + 9]).argmax(-1)  # (N, 9), patches of the joint pass
    out = {}
    for name, pred in (("image_only", alone), ("with_caption", with_text)):
        for cell, sel in (("object", mask & has_object), ("empty", mask & ~has_object)):
            out[f"{name}_{cell}"] = 100.0 * float((pred == codes)[sel].float().mean())
    out["masked_object_cells"] = float((mask & has_object).sum())
    return out


@torch.no_grad()
def frozen_feature_probe(backbone: Any, n: int = 600, seed: int = 0) -> dict[str, float]:
    """Linear-probe accuracy (%) of shape and colour from frozen pooled image features.

    Single-object scenes at the backbone's size; half fit the probe, half score it. Keys
    ``<pool>_<label>`` for ``cls`` (the [CLS] output) and ``mean`` (mean of the patch outputs).
    """
    data = demo_probe_sets(n, backbone.cfg.img_size, seed)
    h = backbone.eval()(image=(data.images - MEAN) / STD)  # (N, 1 + P, D)
    out = {}
    half = n // 2
    for pool, f in (("cls", h[:, 0]), ("mean", h[:, 1:].mean(1))):
        for label in ("shape", "colour"):
            y = data.labels[label]
            out[f"{pool}_{label}"] = 100.0 * fit_linear_probe(f[:half], y[:half], f[half:], y[half:])
    return out
