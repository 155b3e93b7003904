"""Image-text matching (ITM) with hard negatives, VLMo's fusion objective (Bao et al., 2022).

The fusion encoder (image and caption in one pass; VL-FFN in the top layers) decides whether a caption
belongs to an image: a pooler on the first token (the image [CLS] of the joint sequence, as mdm's VQA
head pools) and a Linear(D, 2). Negatives are *hard*: for every text one negative image and for every
image one negative text are drawn with ``torch.multinomial`` in proportion to the softmax of the ITC
similarities, the positive excluded — VLMo's ``compute_itm_hardneg`` (unilm/vlmo ``objectives.py``). As
there, the candidates are the **global** batch: images, texts and padding masks are gathered from every
rank without gradient and the ITC similarity rows of this rank's pairs (against all N) pick among them.
Each step runs one fusion pass over 3B pairs: B positives, B texts with a negative image, B images with
a negative text; labels ``[1]*B + [0]*2B``; cross-entropy.

ITM needs ITC's similarities of the same step, so it is listed with ``itc`` (VLMo computes them
together; :class:`~mdm.objectives.ObjectivesConfig` refuses ``itm`` alone). Sampling uses the objective's
:attr:`ImageTextMatching.generator` (``mdm pretrain`` creates it and re-seeds it every step from the
checkpointed training RNG), never the global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.objectives.base import CrossRank, Objective, require
from mdm.objectives.contrastive import ContrastiveSimilarities
from mdm.objectives.heads import trunc_normal_init


def sample_hard_negatives(
    similarity: torch.Tensor,
    positive: torch.Tensor,
    generator: torch.Generator | None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """One negative column per row, drawn in proportion to ``softmax(similarity)`` without the positive.

    VLMo zeroes the positive's softmax weight and lets ``torch.multinomial`` renormalise; taking the
    softmax over the other columns (the positive set to -inf) is the same distribution, and it cannot
    underflow to an all-zero row when the positive dominates.

    Args:
        similarity: (B, N) scores of each row against N candidates.
        positive: (B,) long, the column of each row's own pair (never drawn).
        generator: the random source (its device is where sampling runs; ``None``: the global RNG, for
            code outside the objectives only).
        exclude: optional (B, N) bool, True at candidates that must not be drawn either (*false
            negatives*: another caption of the row's image, the same caption written for another image —
            ALBEF and BLIP mask the same image id). A row whose candidates would all be excluded keeps
            them (the positive stays out).

    Returns:
        (B,) long column indices on ``similarity``'s device.
    """
    B, N = similarity.shape
    if N < 2:
        raise ValueError(f"hard negatives need at least 2 candidates per row, got {N}")
    rows = torch.arange(B, device=similarity.device)
    logits = similarity.detach().float().clone()
    if exclude is not None:
        exclude = exclude.to(logits.device).clone()
        exclude[rows, positive] = True
        full = exclude.all(dim=1)  # nothing left to draw: keep the row's candidates
        exclude[full] = False
        logits = logits.masked_fill(exclude, float("-inf"))
    logits[rows, positive] = float("-inf")
    weights = torch.softmax(logits, dim=1)  # (B, N), 0 at the positive
    weights = weights.to(generator.device if generator is not None else weights.device)
    drawn = torch.multinomial(weights, 1, generator=generator)  # (B, 1)
    return drawn.squeeze(1).to(similarity.device)


def gather_text(
    text: torch.Tensor, padding: torch.Tensor | None, cross_rank: CrossRank
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts and padding masks of every rank, padded to the longest rank's length.

    Returns:
        (N, T) ids and (N, T) bool padding mask of the global batch in rank order.
    """
    if padding is None:
        padding = torch.zeros_like(text, dtype=torch.bool)
    length = int(cross_rank.gather(torch.tensor([text.shape[1]], device=text.device)).max().item())
    text, padding = pad_text(text, padding, length)
    return cross_rank.gather(text), cross_rank.gather(padding)


def pad_text(text: torch.Tensor, padding: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and padding mask extended with padding to (B, length)."""
    extra = length - text.shape[1]
    if extra <= 0:
        return text, padding
    return F.pad(text, (0, extra), value=0), F.pad(padding, (0, extra), value=True)


def false_negatives(
    image_id: torch.Tensor,
    all_id: torch.Tensor,
    positive: torch.Tensor,
    all_text: torch.Tensor,
    all_pad: torch.Tensor,
) -> torch.Tensor:
    """(B, N) True where global pair j is no negative for local pair i: it shows the same image
    (``image_id``) or has the same caption (the same ids at every real position).

    Args:
        image_id: (B,) this rank's image ids; ``all_id`` (N,) the global batch's.
        positive: (B,) global column of each local pair.
        all_text: (N, T) the global batch's captions, ``all_pad`` (N, T) their padding masks.
    """
    same_image = image_id[:, None] == all_id[None, :]
    ids = all_text.masked_fill(all_pad, -1)  # padding compares equal whatever its id
    own = ids[positive]  # (B, T)
    same_text = (own[:, None, :] == ids[None, :, :]).all(dim=2)  # (B, N)
    return same_image | same_text


def hard_negative_batch(
    image: torch.Tensor,
    text: torch.Tensor,
    padding: torch.Tensor | None,
    sims: ContrastiveSimilarities,
    cross_rank: CrossRank,
    generator: torch.Generator | None,
    image_id: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The 3B fusion pairs of VLMo's ITM: positives, texts with a hard negative image, images with a hard
    negative text; candidates from every rank (gathered without gradient).

    Args:
        image: (B, 3, H, W) this rank's images.
        text: (B, T) their captions; ``padding`` (B, T) True at padding (or None).
        sims: the ITC similarities of these pairs against the global batch.
        cross_rank: collectives for the gather.
        generator: random source of :func:`sample_hard_negatives`.
        image_id: optional (B,) long, which image each pair shows (retrieval fine-tuning has several
            captions per image). With it, false negatives are never drawn: a pair of the same image, or
            one whose caption is the same text (:func:`false_negatives`).

    Returns:
        ``image`` (3B, 3, H, W), ``text`` (3B, T'), ``text_padding_mask`` (3B, T'), ``labels`` (3B,) long
        (1 = match), ``negative_image`` / ``negative_text`` (B,) global indices that were drawn.
    """
    B = image.shape[0]
    with torch.no_grad():
        all_image = cross_rank.gather(image.detach())  # (N, 3, H, W)
        all_text, all_pad = gather_text(text, padding, cross_rank)  # (N, Tg)
        positive = sims.positives()
        exclude = None
        if image_id is not None:
            all_id = cross_rank.gather(image_id.detach().to(image.device))  # (N,)
            exclude = false_negatives(image_id.to(image.device), all_id, positive, all_text, all_pad)
        neg_image = sample_hard_negatives(sims.text_to_image, positive, generator, exclude)  # for each text
        neg_text = sample_hard_negatives(sims.image_to_text, positive, generator, exclude)  # for each image
    local_pad = torch.zeros_like(text, dtype=torch.bool) if padding is None else padding
    own_text, own_pad = pad_text(text, local_pad, all_text.shape[1])  # (B, Tg)
    images = torch.cat([image, all_image[neg_image], image])  # (3B, 3, H, W)
    texts = torch.cat([own_text, own_text, all_text[neg_text]])  # (3B, Tg)
    pads = torch.cat([own_pad, own_pad, all_pad[neg_text]])  # (3B, Tg)
    keep = int((~pads).sum(1).max().item())  # drop columns that are padding in every row
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(image.device)
    return {
        "image": images,
        "text": texts[:, :keep],
        "text_padding_mask": pads[:, :keep],
        "labels": labels,
        "negative_image": neg_image,
        "negative_text": neg_text,
    }


class Pooler(nn.Module):
    """BEiT-3's ``Pooler``: LayerNorm → Linear(D, D) → tanh (``norm``, ``dense``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, D)."""
        return torch.tanh(self.dense(self.norm(x)))


class ITMHead(nn.Module):
    """Pooler (LayerNorm → Linear(D, D) → tanh, BEiT-3's ``Pooler``) and the match classifier
    Linear(D, 2) (VLMo's ``itm_score``).

    Args:
        dim: backbone width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pooler = Pooler(dim)
        self.fc = nn.Linear(dim, 2)
        trunc_normal_init(self)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        """(B, D) first token of the fusion pass → (B, 2) logits (column 1 = match)."""
        return self.fc(self.pooler(first))

    def score(self, backbone: nn.Module, batch: Mapping[str, Any], pool: str = "image") -> torch.Tensor:
        """(B, 2) logits of the fusion pass over ``image`` / ``text`` / ``text_padding_mask``.

        ``pool``: which first token the head reads, ``image`` (x[:, 0], the image [CLS] of mdm's
        image-first sequence, as the pretraining objective) or ``text`` (the text [bos], VLMo's choice:
        its joint sequence starts with the text).
        """
        x = backbone(
            image=batch["image"], text=batch["text"], text_padding_mask=batch.get("text_padding_mask")
        )  # (B, 1 + P + T, D), image first
        if pool == "image":
            return self(x[:, 0])
        if pool == "text":
            return self(x[:, x.shape[1] - batch["text"].shape[1]])
        raise ValueError(f"ITM pool must be 'image' or 'text', got {pool!r}")


class ImageTextMatching(Objective):
    """VLMo's ITM with global hard negatives drawn from ITC's similarities (see the module docstring).

    Returns ``itm_loss`` (cross-entropy over the 3B pairs), ``itm_acc`` and ``itm_count`` (3B).

    Args:
        head: the :class:`ITMHead`.
    """

    name = "itm"
    stream = "pair"
    reads = ("itc",)

    def __init__(self, head: ITMHead) -> None:
        super().__init__()
        self.share("head", head)
        #: Random source of the negatives; set by the engine (a ``torch.Generator``).
        self.generator: torch.Generator | None = None

    def forward(
        self, backbone: nn.Module, batch: Mapping[str, Any], context: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Args:
        backbone: the Multiway Transformer.
        batch: ``image`` (B, 3, H, W), ``text`` (B, T), optional ``text_padding_mask`` (B, T).
        context: must hold ``context["itc"]`` from this step's ITC.
        """
        image, text = require(batch, ("image", "text"), self.name)
        sims = (context or {}).get("itc")
        if not isinstance(sims, ContrastiveSimilarities):
            raise ValueError(
                "itm draws its hard negatives from this step's ITC similarities: list itc among the "
                "objectives (PretrainModel runs it first)"
            )
        if self.generator is None:
            raise ValueError(
                "itm: no random source for the hard negatives; set ImageTextMatching.generator = "
                "torch.Generator().manual_seed(...)"
            )
        pairs = hard_negative_batch(
            image, text, batch.get("text_padding_mask"), sims, self.cross_rank, self.generator
        )
        logits = self.head.score(backbone, pairs).float()  # (3B, 2)
        loss = F.cross_entropy(logits, pairs["labels"])
        with torch.no_grad():
            acc = (logits.argmax(1) == pairs["labels"]).float().mean()
        return {
            "itm_loss": loss,
            "itm_acc": acc,
            "itm_count": torch.tensor(float(logits.shape[0]), device=logits.device),
        }
