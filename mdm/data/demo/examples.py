"""What the demo's tokenizer and pretrained model do on held-out scenes: the pictures and numbers of the report.

* :func:`code_atlas` — the mean 16×16 image patch of every VQ-KD code over many patches. VQ-KD has no pixel
  decoder (it reconstructs teacher features, BEiT v2, Peng et al. 2022), so the demo "reconstructs" an
  image by pasting each code's mean patch: it shows what a code stands for.
* :func:`masked_word_predictions` — BEiT-3's MVLM at work: colour and shape words of held-out captions are
  masked and predicted by the pretrained MLM head, once with the image (joint pass) and once from the
  text alone. The gap between the two is what the model learned to read off images.
* :func:`masked_patch_predictions` — MIM on held-out images: block-masked patches and the codes predicted
  for them.

Everything is deterministic: fixed inputs, fixed masks (``random.Random(seed)``), eval mode.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdm.data.demo.scenes import COLOURS, SHAPES

__all__ = [
    "load_pretrain_model",
    "image_batch",
    "code_atlas",
    "paint_codes",
    "WordPrediction",
    "masked_word_predictions",
    "masked_patch_predictions",
]

MEAN = STD = 0.5  # backbone normalisation of the demo (ViewConfig default)
CONTENT_WORDS = frozenset(COLOURS) | frozenset(SHAPES)


def load_pretrain_model(model_dir: str | Path, codebook_size: int) -> Any:
    """The pretraining model (backbone + MIM/MLM heads) from an exported model directory.

    Args:
        model_dir: ``mdm export --format safetensors`` output of the pretraining run
            (``model.safetensors`` + ``heads.safetensors`` with ``heads.mim.*`` / ``heads.mlm.*``).
        codebook_size: the visual tokenizer's number of codes.
    """
    from safetensors.torch import load_file

    from mdm.models.io import read_model_config
    from mdm.objectives import ObjectivesConfig, build_pretrain_model

    model_dir = Path(model_dir)
    cfg, _ = read_model_config(model_dir)
    heads = load_file(str(model_dir / "heads.safetensors"))
    names = ["mim", "mlm", "mvlm"] + (["itc"] if any(k.startswith("heads.itc.") for k in heads) else [])
    model = build_pretrain_model(cfg, ObjectivesConfig(objectives=names, codebook_size=codebook_size))
    state = {f"backbone.{k}": v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    state.update(heads)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: does not fit the pretraining model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return model.eval()


def image_batch(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Images in [0, 1] (B, 3, size, size) read from files."""
    from PIL import Image

    from mdm.data.transforms import to_tensor

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(to_tensor(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)))
    return torch.stack(out)


@torch.no_grad()
def code_atlas(
    tokenizer: Any, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean patch per code and how often each code occurs.

    Args:
        tokenizer: a visual tokenizer whose grid tiles its input (``img_size / grid`` pixel patches).
        images: (N, 3, S, S) in [0, 1] at the tokenizer's size.

    Returns:
        (atlas (K, 3, p, p), counts (K,)); codes never used have a grey patch.
    """
    k, gh = tokenizer.codebook_size, tokenizer.grid_size[0]
    p = tokenizer.img_size // gh
    sums, counts = torch.zeros(k, 3 * p * p), torch.zeros(k)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        codes = tokenizer.encode(x).flatten()  # (b·h·w,)
        patches = x.unfold(2, p, p).unfold(3, p, p)  # (b, 3, h, w, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)  # (b·h·w, 3·p·p), raster order
        sums.index_add_(0, codes, patches)
        counts.index_add_(0, codes, torch.ones_like(codes, dtype=torch.float))
    atlas = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], torch.full_like(sums, 0.5))
    return atlas.view(k, 3, p, p), counts


def paint_codes(codes: torch.Tensor, atlas: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, h·p, w·p) made of each code's atlas patch; ``masked`` (B, h·w) patches are grey."""
    b, h, w = codes.shape
    p = atlas.shape[-1]
    tiles = atlas[codes.flatten()].view(b, h, w, 3, p, p)
    if masked is not None:
        tiles[masked.view(b, h, w)] = 0.5
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, h * p, w * p)  # (B, 3, H, W)


@dataclass
class WordPrediction:
    """One caption with its colour and shape words masked, and what the model put back.

    Attributes:
        pieces: the caption's pieces (``▁`` marks word starts), masked ones included.
        masked: indices into ``pieces`` that were masked.
        with_image: predicted piece per masked index, joint image+text pass.
        text_only: predicted piece per masked index, text-only pass.
    """

    pieces: list[str]
    masked: list[int]
    with_image: list[str]
    text_only: list[str]

    def render(self, which: str) -> str:
        """The caption with masked words shown as ``[prediction]`` (``which``: with_image/text_only/truth)."""
        guesses = dict(
            zip(
                self.masked,
                getattr(self, which) if which != "truth" else [self.pieces[i] for i in self.masked],
            )
        )
        words = "".join(
            f"[{guesses[i].lstrip('▁')}]" if i in guesses else p for i, p in enumerate(self.pieces)
        )
        return words.replace("▁", " ").replace("[", " [").replace("  [", " [").strip()


def _piece(tok: Any, i: int) -> str:
    """The SentencePiece piece of an mdm text id (fairseq layout: piece id + 1); "" for bos/pad/eos."""
    if i in (tok.bos_id, tok.pad_id, tok.eos_id):
        return ""
    return tok.sp.IdToPiece(i - 1) if tok.unk_id < i < tok.mask_id else "?"


def _content_positions(tok: Any, ids: torch.Tensor) -> list[int]:
    pieces = [_piece(tok, int(i)) for i in ids.tolist()]
    return [j for j, p in enumerate(pieces) if p.lstrip("▁") in CONTENT_WORDS and p.startswith("▁")]


@torch.no_grad()
def masked_word_predictions(
    model: Any, tok: Any, images: torch.Tensor, texts: Sequence[str], max_len: int = 32
) -> tuple[list[WordPrediction], dict[str, float]]:
    """Masks every colour and shape word of ``texts`` and predicts them with and without the image.

    Args:
        model: the pretraining model (:func:`load_pretrain_model`).
        tok: the text tokenizer.
        images: (B, 3, S, S) in [0, 1], one per text.
        texts: captions of the images.
        max_len: text length with [bos]/[eos].

    Returns:
        One :class:`WordPrediction` per text, and accuracies ``with_image`` / ``text_only`` (%) over every
        masked word.
    """
    ids, pad = tok.encode(list(texts), max_len)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(len(texts)):
        mask[b, _content_positions(tok, ids[b])] = True
    text_input = ids.masked_fill(mask, tok.mask_id)
    x = model.backbone(image=(images - MEAN) / STD, text=text_input, text_padding_mask=pad)  # (B, 1+P+T, D)
    joint = x[:, -ids.shape[1] :]  # (B, T, D)
    alone = model.backbone(text=text_input, text_padding_mask=pad)  # (B, T, D)
    head = model.heads["mlm"]
    weight = model.backbone.text_embed.weight if head.tie_embedding else None
    pred_joint, pred_alone = head(joint, weight).argmax(-1), head(alone, weight).argmax(-1)  # (B, T)
    piece = lambda i: _piece(tok, int(i))  # noqa: E731
    out = []
    for b in range(len(texts)):
        pos = mask[b].nonzero().flatten().tolist()
        real = [piece(i) for i in ids[b][~pad[b]].tolist()]
        out.append(
            WordPrediction(
                real, pos, [piece(pred_joint[b, j]) for j in pos], [piece(pred_alone[b, j]) for j in pos]
            )
        )
    n = max(int(mask.sum()), 1)
    acc = {
        "with_image": 100.0 * float((pred_joint == ids)[mask].sum()) / n,
        "text_only": 100.0 * float((pred_alone == ids)[mask].sum()) / n,
        "masked_words": float(mask.sum()),
    }
    return out, acc


@torch.no_grad()
def masked_patch_predictions(
    model: Any, tokenizer: Any, images: torch.Tensor, ratio: float = 0.4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """BEiT MIM on ``images``: block masks, true codes, predicted codes (masked patches) and accuracy (%).

    Returns:
        (image_mask (B, P) bool, true codes (B, h, w), predicted codes (B, h, w) — equal to the true
        codes where nothing was masked —, accuracy on masked patches).
    """
    from mdm.data.masking import BlockMasking

    grid = model.backbone.cfg.grid_size
    masking = BlockMasking.from_ratio(grid, ratio, min_patches=1)
    rng = random.Random(seed)
    image_mask = torch.stack([masking(rng) for _ in range(len(images))])  # (B, P)
    codes = tokenizer.encode(images)  # (B, h, w)
    x = model.backbone(image=(images - MEAN) / STD, image_mask=image_mask)  # (B, 1 + P, D)
    logits = model.heads["mim"](x[:, 1:])  # (B, P, K)
    flat = codes.flatten(1)
    predicted = torch.where(image_mask, logits.argmax(-1), flat)
    acc = 100.0 * float((predicted == flat)[image_mask].float().mean()) if image_mask.any() else 0.0
    return image_mask, codes, predicted.view_as(codes), acc
