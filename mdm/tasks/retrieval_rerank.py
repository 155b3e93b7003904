"""Two-stage retrieval: the dual encoder's top-k re-ranked by the fusion encoder's ITM score.

VLMo (Bao et al., 2022) retrieves with the dual encoder and can re-rank its k best candidates with the
image-text matching head on the fusion pass (unilm/vlmo ``compute_irtr_recall_with_rerank``, ``k_test``).
As there, a re-ranked score is the ITM match logit plus the dual-encoder similarity inside the top k and
the similarity minus 100 outside it, separately for text retrieval (per image, its top-k captions) and
image retrieval (per caption, its top-k images). Recall counts ties against the model, as
:func:`mdm.tasks.retrieval.retrieval_recalls` does.

Evaluation images are kept in memory for the fusion passes as the uint8 pixels the evaluation transform
normalised (exactly invertible for mdm's Normalize(0.5, 0.5)), a quarter of the float size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Score given to candidates outside the top k (added to their dual similarity, as VLMo).
OUTSIDE = -100.0


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, H, W) images (mean = std = 0.5) → the uint8 pixels they came from; float32 kept
    when that is not exact (another normalisation)."""
    pixels = ((images * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels if torch.equal(unpack_images(pixels), images) else images


def unpack_images(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_images`: the same operations as ToTensor + Normalize(0.5, 0.5)."""
    if packed.dtype != torch.uint8:
        return packed
    return packed.float().div(255).sub(0.5).div(0.5)


def recalls_from_scores(
    i2t: torch.Tensor, t2i: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int], prefix: str = ""
) -> dict[str, float]:
    """Recall@k ×100 from explicit score matrices; ties count against the model.

    Args:
        i2t: (I, T) scores ranking the captions of each image (text retrieval).
        t2i: (T, I) scores ranking the images of each caption (image retrieval).
        text_image: (T,) index of each caption's image.
        ks: the k of recall@k.
        prefix: prepended to the metric names.
    """
    n_img, n_txt = i2t.shape
    is_gt = text_image[None, :] == torch.arange(n_img)[:, None]  # (I, T)
    best = i2t.masked_fill(~is_gt, float("-inf")).max(1).values  # (I,) best caption of each image
    image_rank = ((i2t >= best[:, None]) & ~is_gt).sum(1)  # wrong captions at least as high
    gt = t2i.gather(1, text_image[:, None])  # (T, 1)
    text_rank = ((t2i >= gt) & ~is_gt.t()).sum(1)  # wrong images at least as high
    out = {}
    for k in ks:
        out[f"{prefix}tr_r{k}"] = 100.0 * (image_rank < k).float().mean().item()
        out[f"{prefix}ir_r{k}"] = 100.0 * (text_rank < k).float().mean().item()
    out[f"{prefix}r_mean"] = sum(out.values()) / len(out)
    return out


def rerank_rows(
    dual: torch.Tensor,
    k: int,
    rows: Sequence[int],
    match: Callable[[list[tuple[int, int]]], torch.Tensor],
    batch_size: int,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """ITM scores of each row's top-k columns.

    Args:
        dual: (R, C) dual-encoder similarities (rows = queries).
        k: candidates re-ranked per row.
        rows: the rows to do (a rank's share).
        match: ``[(row, column), ...]`` → (n,) match logits of the fusion encoder for those pairs.
        batch_size: pairs per fusion pass.

    Returns:
        ``{row: (top-k columns, their ITM scores)}``.
    """
    k = min(k, dual.shape[1])
    top = {r: dual[r].topk(k).indices for r in rows}
    pairs = [(r, int(c)) for r in rows for c in top[r]]
    scores = [match(pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    flat = torch.cat(scores) if scores else torch.zeros(0)
    return {r: (top[r], flat[j * k : (j + 1) * k]) for j, r in enumerate(rows)}


def reranked_matrix(
    dual: torch.Tensor, reranked: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """VLMo's re-ranked scores: ``dual + itm`` inside each row's top k, ``dual - 100`` outside."""
    out = dual + OUTSIDE
    for r, (cols, itm) in reranked.items():
        out[r, cols] = dual[r, cols] + itm.to(dual.dtype)
    return out
