"""Two-stage retrieval: the dual encoder's top-k re-ranked by the fusion encoder's ITM score.

VLMo (Bao et al., 2022) retrieves with the dual encoder and can re-rank its k best candidates with the
image-text matching head on the fusion pass (unilm/vlmo ``compute_irtr_recall_with_rerank``, ``k_test``).
As there, a re-ranked score is the ITM match logit plus the dual-encoder similarity inside the top k and
the similarity minus 100 outside it, separately for text retrieval (per image, its top-k captions) and
image retrieval (per caption, its top-k images). Recall counts ties against the model, as
:func:`mdm.tasks.retrieval.retrieval_recalls` does.

Evaluation images are kept in memory for the fusion passes as the uint8 pixels the evaluation transform
normalised (exactly invertible for mdm's Normalize(0.5, 0.5)), a quarter of the float size. Under
distributed evaluation every rank holds all of them and re-ranks a strided share of the queries; the
per-query ITM scores are then merged on every rank (:func:`rerank_recalls`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

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


def itm_weight(
    dual: torch.Tensor, reranked: dict[int, tuple[torch.Tensor, torch.Tensor]], scale: float | str
) -> float:
    """The weight ``w`` of the ITM logits in the re-ranked ``dual + w * itm``.

    ``scale`` is a number (VLMo and ALBEF add the logit as it is: 1.0) or ``"auto"``: the ratio of the
    pooled within-query standard deviations, ``sqrt(mean_q var(dual_q) / mean_q var(itm_q))`` over the
    queries' top-k candidates, so that both rankings count alike whatever the scale of each (on the demo
    a cosine similarity spreads by ~0.05 among the top k, a logit by ~1; added as they are, the logit
    alone decides). One weight for all queries: a per-query ratio would let the ITM logit overturn the
    dual order on every 2-candidate query. No labels are used; 0 when the ITM logits do not vary.
    """
    if scale != "auto":
        return float(scale)
    rows = [(dual[r, cols].double(), itm.double()) for r, (cols, itm) in reranked.items() if len(cols) >= 2]
    if not rows:
        return 0.0
    dual_var = torch.stack([d.var() for d, _ in rows]).mean()
    itm_var = torch.stack([i.var() for _, i in rows]).mean()
    return float((dual_var / itm_var).sqrt()) if itm_var > 0 else 0.0


def reranked_matrix(
    dual: torch.Tensor, reranked: dict[int, tuple[torch.Tensor, torch.Tensor]], scale: float | str = 1.0
) -> torch.Tensor:
    """VLMo's re-ranked scores: ``dual + w * itm`` inside each row's top k (``w``: :func:`itm_weight`
    of ``scale``, one for all rows; VLMo: 1), ``dual - 100`` outside.

    Should an ITM logit fall below -100 + the row's dual spread, the outside shift grows so that every
    top-k candidate still ranks above every other one: re-ranking reorders the top k and nothing else.
    """
    out = dual + OUTSIDE
    w = itm_weight(dual, reranked, scale)
    for r, (cols, itm) in reranked.items():
        inside = dual[r, cols] + w * itm.to(dual.dtype)
        shift = min(OUTSIDE, float(inside.min() - dual[r].max()) - 1.0) if len(cols) else OUTSIDE
        out[r] = dual[r] + shift
        out[r, cols] = inside
    return out


Match = Callable[[list[tuple[int, int]]], torch.Tensor]


class FusionMatcher:
    """``[(image, caption), ...]`` → (n,) ITM match logits of a retrieval model's fusion pass.

    Args:
        model: a :class:`~mdm.tasks.retrieval.RetrievalModel` with an ITM head (in eval mode, no grad).
        pixels: per image, its :func:`pack_images` pixels (3, H, W).
        tokens: per caption, its (T,) ids and (T,) padding mask.
        device: where the fusion passes run.
        every: log progress every this many seconds.
    """

    def __init__(
        self,
        model: Any,
        pixels: Sequence[torch.Tensor],
        tokens: Sequence[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        every: float = 30.0,
    ) -> None:
        self.model, self.pixels, self.tokens, self.device = model, pixels, tokens, device
        self.total = 0  #: pairs to score (set by the caller, for progress)
        self.done = 0
        self.every = every
        self._last = time.monotonic()

    def __call__(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        image = torch.stack([unpack_images(self.pixels[i]) for i, _ in pairs])  # (n, 3, H, W)
        # captions come from evaluation batches trimmed to different lengths: pad them to one (n, T)
        length = max(self.tokens[j][0].shape[0] for _, j in pairs)
        text = torch.zeros(len(pairs), length, dtype=torch.long)
        pad = torch.ones(len(pairs), length, dtype=torch.bool)
        for row, (_, j) in enumerate(pairs):
            ids, mask = self.tokens[j]
            text[row, : ids.shape[0]], pad[row, : ids.shape[0]] = ids, mask
        keep = int((~pad).sum(1).max().item())  # drop columns that are padding in every row
        logits = self.model.match_logits(
            image.to(self.device), text[:, :keep].to(self.device), pad[:, :keep].to(self.device)
        )
        self.done += len(pairs)
        if time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            log.info("re-ranking: %d / %d fusion pairs scored", self.done, self.total)
        return logits.cpu()


def rerank_recalls(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    text_image: torch.Tensor,
    match: Match,
    k: int,
    batch_size: int,
    ks: Sequence[int],
    rank: int = 0,
    world: int = 1,
    merge: Callable[[list[tuple[Any, Any]]], dict[Any, Any]] = dict,
    itm_scale: float | str = 1.0,
) -> dict[str, float]:
    """Recall of the dual encoder's top k re-ranked by the fusion ITM score (``rerank_*`` metrics).

    Args:
        image_feats: (I, E) and ``text_feats`` (T, E): dual-encoder features.
        text_image: (T,) index of each caption's image.
        match: ``[(image, caption), ...]`` → (n,) match logits (a :class:`FusionMatcher`).
        k: candidates re-ranked per query.
        batch_size: pairs per fusion pass.
        ks: the k of recall@k.
        rank: this process's index; it re-ranks queries ``rank, rank + world, ...`` of each direction.
        world: number of processes.
        merge: ``[(key, value), ...]`` of this rank → the dict of every rank's rows
            (:func:`mdm.tasks.base.gather_records`; ``dict`` on one process).
        itm_scale: the weight of the ITM logit beside the dual score, or ``"auto"`` (:func:`itm_weight`).
    """
    i2t = image_feats.float() @ text_feats.float().t()  # (I, T)
    t2i = i2t.t().contiguous()  # (T, I)
    n_img, n_txt = i2t.shape
    image_rows = list(range(rank, n_img, world))
    text_rows = list(range(rank, n_txt, world))
    pairs = len(image_rows) * min(k, n_txt) + len(text_rows) * min(k, n_img)
    if isinstance(match, FusionMatcher):
        match.total = pairs
    log.info("re-ranking the top %d of %d images and %d captions: %d fusion pairs on this rank", k, n_img,
             n_txt, pairs)  # fmt: skip
    t = time.perf_counter()
    text_retrieval = rerank_rows(i2t, k, image_rows, match, batch_size)  # rows = images, columns = texts
    image_retrieval = rerank_rows(  # rows = texts: the matcher takes (image, text)
        t2i, k, text_rows, lambda tc: match([(i, j) for j, i in tc]), batch_size
    )
    merged = merge(
        [(("i", r), v) for r, v in text_retrieval.items()]
        + [(("t", r), v) for r, v in image_retrieval.items()]
    )
    by_image = {r: merged[("i", r)] for r in range(n_img)}
    by_text = {r: merged[("t", r)] for r in range(n_txt)}
    log.info("re-ranked the top %d of %d images and %d captions in %.1f s", k, n_img, n_txt,
             time.perf_counter() - t)  # fmt: skip
    out = recalls_from_scores(
        reranked_matrix(i2t, by_image, itm_scale),
        reranked_matrix(t2i, by_text, itm_scale),
        text_image,
        ks,
        prefix="rerank_",
    )
    scores = torch.cat([itm for _, itm in by_image.values()])  # text retrieval's top-k pairs
    labels = torch.cat([text_image[cols] == r for r, (cols, _) in by_image.items()])
    out["rerank_itm_auc"] = match_auc(scores, labels)
    return out


def match_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC ×100 of ITM scores separating matching pairs from the other candidates (ties count half);
    50 = the ITM head tells nothing apart (NaN when a class is absent).

    Args:
        scores: (P,) ITM logits.
        labels: (P,) bool, True for a matching pair.
    """
    pos, neg = scores[labels].float(), scores[~labels].float().sort().values
    if not len(pos) or not len(neg):
        return float("nan")
    below = torch.searchsorted(neg, pos, right=False).float()
    ties = torch.searchsorted(neg, pos, right=True).float() - below
    return 100.0 * ((below + 0.5 * ties).sum() / (len(pos) * len(neg))).item()
