"""Image-text retrieval (COCO / Flickr30k) with a dual encoder, as unilm/beit3 ``BEiT3ForRetrieval``.

Images are encoded alone (vision experts) and texts alone (language experts); ``vision_head`` /
``language_head`` (Linear(D, D), no bias) project the first token (image [CLS], text [bos]) and the result
is L2-normalised. Training uses the symmetric InfoNCE loss of CLIP with a learnable temperature
``logit_scale`` (log(1/0.07) at init, ``exp`` without clamp) and negatives gathered from all ranks
(:func:`mdm.distributed.ops.all_gather_with_grad`), so the loss equals the one-process loss on the global
batch.

Recall@k (:func:`retrieval_recalls`) counts ties against the model: a ground truth is retrieved in the
top k only if fewer than k wrong candidates score **at least** as high as it (for an image, its best
caption counts). Constant features therefore score zero, not an arbitrary order-dependent value.

Two-stage retrieval (VLMo, Bao et al. 2022): with ``task.itm_weight > 0`` the model also has VLMo's ITM
head on the fusion encoder (image and caption in one pass, VL-FFN in the top layers) and trains it beside
the contrastive loss on VLMo's 3B pairs (positives, hard negative images, hard negative texts drawn from
the contrastive similarities of the global batch, :mod:`mdm.objectives.itm`). With ``task.rerank_k > 0``
evaluation re-ranks each query's k best candidates by the ITM score (:mod:`mdm.tasks.retrieval_rerank`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.distributed import ops
from mdm.distributed.ops import all_gather_with_grad
from mdm.objectives.base import CrossRank
from mdm.objectives.contrastive import ContrastiveSimilarities
from mdm.objectives.itm import ITMHead, hard_negative_batch
from mdm.tasks.base import (
    TASKS,
    Task,
    TaskModel,
    gather_records,
    model_device,
    run_inference,
    summarise,
    trunc_normal_init,
    unwrap,
)
from mdm.tasks.common import Problems, TextTokenizer, collate
from mdm.tasks.retrieval_data import (
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    collate_retrieval,
    read_karpathy,
)
from mdm.tasks.retrieval_rerank import FusionMatcher, pack_images, rerank_recalls

KS = (1, 5, 10)


#: The collectives of :mod:`mdm.distributed.ops` for the ITM hard-negative gather (identity on one process).
CROSS_RANK = CrossRank(gather_with_grad=all_gather_with_grad, gather=ops.all_gather, rank=ops.rank)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the global batch: (CE(image→text) + CE(text→image)) / 2.

    Every rank builds the full (N, N) logit matrix from gathered features, so its loss value equals the
    single-process loss; gradients reach the other ranks' features through the gather.
    """

    def forward(
        self,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        scale: torch.Tensor,
        context: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args: L2-normalised (B, E) features of matching pairs; ``scale`` = exp(logit_scale);
        ``context``: when given, ``context["itc"]`` receives this rank's rows of the logits
        (:class:`~mdm.objectives.contrastive.ContrastiveSimilarities`) for ITM's hard negatives."""
        all_image = all_gather_with_grad(image_feats)  # (N, E)
        all_text = all_gather_with_grad(text_feats)  # (N, E)
        logits = scale * all_image @ all_text.t()  # (N, N), row = image
        labels = torch.arange(logits.shape[0], device=logits.device)
        if context is not None:
            B = image_feats.shape[0]
            offset = CROSS_RANK.offset(B, logits.device)
            rows = slice(offset, offset + B)
            context["itc"] = ContrastiveSimilarities(logits[rows], logits.t()[rows], offset)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        with torch.no_grad():
            acc = (
                (logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean()
            ) * 50.0
        return {"loss": loss, "retrieval_loss": loss, "retrieval_acc": acc}


class RetrievalModel(TaskModel):
    """Backbone + projections + temperature of a dual-encoder retrieval model, and optionally VLMo's ITM
    head on the fusion encoder (``itm_head``: pooler + Linear(D, 2), :class:`~mdm.objectives.itm.ITMHead`).

    Args:
        backbone: the Multiway Transformer.
        logit_scale_init: initial 1/τ.
        pool: ``cls`` or ``mean`` (see :func:`~mdm.tasks.base.summarise`).
        itm: build the ITM head (for training with ``itm_weight`` or for re-ranking).
        itm_weight: weight of the ITM loss in ``loss`` (0: the head is not trained).
        itm_negatives: ``hard`` (VLMo: drawn by the contrastive similarities) or ``random`` (uniform over
            the other pairs of the global batch).
        itm_pool: the fusion pass's token the ITM head reads: ``image`` ([CLS], as pretraining) or
            ``text`` ([bos], as VLMo).
        itm_random_warmup: the first this many training forward passes draw random negatives, whatever
            ``itm_negatives`` says (a curriculum: easy pairs get the head off the class prior, hard ones
            follow). Counted by the model (micro-batches under gradient accumulation; restarts at 0
            when a run resumes).
        itm_false_negatives: ``skip``: pairs of the same image or with the same caption are never drawn
            as negatives (the batch's ``image_id``); ``keep``: they may be.
    """

    HEAD_PREFIXES = ("vision_head.", "language_head.", "logit_scale", "itm_head.")
    #: Task tensor ← pretraining head tensor (VLMo's ITC): ``mdm finetune`` starts from them when present.
    PRETRAINED_HEADS = {
        "vision_head.weight": "heads.itc.vision_head.weight",
        "language_head.weight": "heads.itc.language_head.weight",
        "logit_scale": "heads.itc.logit_scale",
    }
    #: The same for the ITM head (VLMo's ``itm_score`` and pooler), used when the model has one.
    PRETRAINED_ITM_HEAD = {
        f"itm_head.{name}": f"heads.itm.{name}"
        for name in ("pooler.norm.weight", "pooler.norm.bias", "pooler.dense.weight", "pooler.dense.bias")
        + ("fc.weight", "fc.bias")
    }

    def __init__(
        self,
        backbone: nn.Module,
        logit_scale_init: float = 1.0 / 0.07,
        pool: str = "cls",
        itm: bool = False,
        itm_weight: float = 0.0,
        itm_negatives: str = "hard",
        itm_pool: str = "image",
        itm_random_warmup: int = 0,
        itm_false_negatives: str = "skip",
    ) -> None:
        super().__init__(backbone)
        self.pool = pool
        D = backbone.cfg.embed_dim
        self.language_head = nn.Linear(D, D, bias=False)
        self.vision_head = nn.Linear(D, D, bias=False)
        trunc_normal_init(self.language_head)
        trunc_normal_init(self.vision_head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.criterion = ContrastiveLoss()
        if itm_negatives not in ("hard", "random"):
            raise ValueError(f"itm_negatives must be 'hard' or 'random', got {itm_negatives!r}")
        self.itm_weight = itm_weight
        self.itm_negatives = itm_negatives
        if itm_pool not in ("image", "text"):
            raise ValueError(f"itm_pool must be 'image' or 'text', got {itm_pool!r}")
        self.itm_pool = itm_pool
        self.itm_random_warmup = itm_random_warmup
        if itm_false_negatives not in ("skip", "keep"):
            raise ValueError(f"itm_false_negatives must be 'skip' or 'keep', got {itm_false_negatives!r}")
        self.itm_false_negatives = itm_false_negatives
        self.itm_passes = 0  # training forward passes with the ITM loss so far
        self.itm_head = ITMHead(D) if itm or itm_weight > 0 else None
        if self.itm_head is not None:  # an instance attribute: the class mapping stays ITC-only
            self.PRETRAINED_HEADS = {**type(self).PRETRAINED_HEADS, **self.PRETRAINED_ITM_HEAD}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale"}

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, D) unit vectors from the image [CLS] (or the mean patch, ``pool="mean"``)."""
        x = self.backbone(image=image)
        vision, _ = summarise(x, self.pool, x.shape[1])
        return F.normalize(self.vision_head(vision), dim=-1)

    def encode_text(self, text: torch.Tensor, text_padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, D) unit vectors from the text [bos] (or the mean real token, ``pool="mean"``)."""
        x = self.backbone(text=text, text_padding_mask=text_padding_mask)
        _, words = summarise(x, self.pool, 0, text_padding_mask)
        return F.normalize(self.language_head(words), dim=-1)

    def match_logits(
        self, image: torch.Tensor, text: torch.Tensor, text_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, 3, H, W) images with their (B, T) captions → (B,) ITM match logits of the fusion pass."""
        if self.itm_head is None:
            raise ValueError("this retrieval model has no ITM head (task.itm_weight = 0 and no re-ranking)")
        batch = {"image": image, "text": text, "text_padding_mask": text_padding_mask}
        return self.itm_head.score(self.backbone, batch, self.itm_pool)[:, 1].float()  # column 1 = match

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = self.encode_image(batch["image"]).float()
        text = self.encode_text(batch["text"], batch["text_padding_mask"]).float()
        if self.itm_weight <= 0:
            return self.criterion(image, text, self.logit_scale.exp())
        context: dict[str, Any] = {}
        out = self.criterion(image, text, self.logit_scale.exp(), context)
        out.update(self._itm(batch, context["itc"]))
        out["loss"] = out["retrieval_loss"] + self.itm_weight * out["itm_loss"]
        return out

    def _itm(self, batch: dict[str, Any], sims: ContrastiveSimilarities) -> dict[str, torch.Tensor]:
        """VLMo's ITM loss on 3B fusion pairs with hard negatives from this step's similarities; the
        global RNG draws them (seeded and checkpointed by the trainer, like dropout). ``random``
        negatives: equal similarities, so the draw is uniform over the other pairs."""
        warming_up = self.itm_passes < self.itm_random_warmup
        if self.training:
            self.itm_passes += 1
        if self.itm_negatives == "random" or warming_up:
            flat = torch.zeros_like(sims.image_to_text)  # (B, N)
            sims = ContrastiveSimilarities(flat, flat, sims.offset)
        image_id = batch.get("image_id") if self.itm_false_negatives == "skip" else None
        pairs = hard_negative_batch(
            batch["image"], batch["text"], batch.get("text_padding_mask"), sims, CROSS_RANK, None, image_id
        )
        logits = self.itm_head.score(self.backbone, pairs, self.itm_pool).float()  # (3B, 2)
        loss = F.cross_entropy(logits, pairs["labels"])
        with torch.no_grad():
            acc = (logits.argmax(1) == pairs["labels"]).float().mean() * 100.0
        return {"itm_loss": loss, "itm_acc": acc}

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        if "image" in batch:
            out["image_feats"] = self.encode_image(batch["image"]).float()
        if "text" in batch:
            out["text_feats"] = self.encode_text(batch["text"], batch["text_padding_mask"]).float()
        return out


def _gt_ranks(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: torch.Tensor, chunk: int):
    """Per image and per text: how many wrong candidates score at least as high as the ground truth."""
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    text_gt = torch.full((n_txt,), float("nan"))
    image_rank = torch.zeros(n_img, dtype=torch.long)
    text_rank = torch.zeros(n_txt, dtype=torch.long)
    for pass_ in (0, 1):  # pass 0: ground-truth scores of texts; pass 1: counts
        for start in range(0, n_img, chunk):
            idx = torch.arange(start, min(start + chunk, n_img))
            scores = image_feats[idx] @ text_feats.t()  # (c, Tn), same products in both passes
            is_gt = text_image[None, :] == idx[:, None]  # (c, Tn)
            if pass_ == 0:
                rows, cols = is_gt.nonzero(as_tuple=True)
                text_gt[cols] = scores[rows, cols]
                best = scores.masked_fill(~is_gt, float("-inf")).max(1).values  # (c,)
                image_rank[idx] = ((scores >= best[:, None]) & ~is_gt).sum(1)
            else:
                text_rank += ((scores >= text_gt[None, :]) & ~is_gt).sum(0)
    return image_rank, text_rank


def retrieval_recalls(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """Text retrieval (image → texts) and image retrieval (text → images) recall@k ×100 and their mean.

    Args:
        image_feats: (I, E) image features.
        text_feats: (T, E) text features.
        text_image: (T,) index of each text's image.
        ks: the k of recall@k.
        chunk: images scored at a time.
    """
    has_text = torch.zeros(image_feats.shape[0], dtype=torch.bool)
    has_text[text_image] = True
    if not bool(has_text.all()):
        raise ValueError("every image needs at least one caption")
    image_rank, text_rank = _gt_ranks(
        image_feats.float().cpu(), text_feats.float().cpu(), text_image.cpu(), chunk
    )
    out = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (image_rank < k).float().mean().item()
        out[f"ir_r{k}"] = 100.0 * (text_rank < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


@TASKS.register("retrieval")
class RetrievalTask(Task):
    """COCO / Flickr30k retrieval recipe (Karpathy splits)."""

    METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
    PRIMARY_METRIC = "r_mean"
    DEFAULT_SPLITS = {"train_splits": ["train"], "val_split": "val", "test_split": "test"}

    def build_model(self, backbone: nn.Module) -> RetrievalModel:
        scale = self.cfg.rerank_itm_scale
        if scale != "auto" and scale < 0:
            raise ValueError(f"retrieval: task.rerank_itm_scale must be >= 0 or 'auto', got {scale}")
        if self.cfg.itm_weight < 0 or self.cfg.rerank_k < 0 or self.cfg.rerank_batch_size < 1:
            raise ValueError(
                f"retrieval: task.itm_weight ({self.cfg.itm_weight}) and task.rerank_k ({self.cfg.rerank_k}) "
                f"must be >= 0 and task.rerank_batch_size ({self.cfg.rerank_batch_size}) >= 1"
            )
        return RetrievalModel(
            backbone,
            self.cfg.logit_scale_init,
            self.cfg.pool,
            itm=self.cfg.rerank_k > 0,
            itm_weight=self.cfg.itm_weight,
            itm_negatives=self.cfg.itm_negatives,
            itm_pool=self.cfg.itm_pool,
            itm_random_warmup=self.cfg.itm_random_warmup,
            itm_false_negatives=self.cfg.itm_false_negatives,
        )

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None):
        if tokenizer is None:
            raise ValueError("retrieval needs a text tokenizer")
        root = Path(self.data.root)
        specs = self.resolve_split(split)
        problems = Problems(
            f"retrieval {'+'.join(specs)} in {root / self.data.karpathy_file}", self.data.on_error
        )
        images = read_karpathy(root, self.data, specs, problems)
        problems.report()
        if not images:
            raise ValueError(
                f"retrieval split {split!r} ({', '.join(specs)}) under {root} has no usable image"
            )
        cls = RetrievalTrainDataset if self.is_train(split) else RetrievalEvalDataset
        return cls(images, tokenizer, self.data, problems)

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_retrieval(samples) if "entry" in samples[0] else collate(samples)

    def _features(
        self, model: nn.Module, loader: Iterable[dict[str, Any]], keep_inputs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, dict[Any, Any]]:
        """Dual-encoder features of every image and caption (merged over ranks) and, with ``keep_inputs``,
        the inputs the fusion passes of re-ranking need: ``{("p", i): packed pixels, ("x", j): (ids,
        padding mask)}``."""
        ds: RetrievalEvalDataset = loader.dataset  # type: ignore[attr-defined]
        if not isinstance(ds, RetrievalEvalDataset):
            raise ValueError("retrieval evaluation needs the dataset of an evaluation split (val/test)")
        rows: list[tuple[Any, Any]] = []
        for batch, out in run_inference(model, loader):
            if "image_feats" in out:
                index = batch["image_index"].tolist()
                rows += zip((("i", i) for i in index), out["image_feats"].cpu())
                if keep_inputs:
                    rows += zip((("p", i) for i in index), pack_images(batch["image"].cpu()))
            if "text_feats" in out:
                index = batch["text_index"].tolist()
                rows += zip((("t", i) for i in index), out["text_feats"].cpu())
                if keep_inputs:
                    text, pad = batch["text"].cpu(), batch["text_padding_mask"].cpu()
                    rows += zip((("x", i) for i in index), zip(text, pad))
        feats = gather_records(rows)
        images = torch.stack([feats[("i", i)] for i in range(len(ds.images))])
        texts = torch.stack([feats[("t", j)] for j in range(len(ds.captions))])
        return images, texts, feats

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Dual-encoder recall; with ``task.rerank_k`` > 0 also the ``rerank_*`` recall of two-stage
        retrieval (the top k of each query re-scored by the fusion encoder's ITM head)."""
        k = self.cfg.rerank_k
        images, texts, inputs = self._features(model, loader, keep_inputs=k > 0)
        text_image = loader.dataset.text_image  # type: ignore[attr-defined]
        metrics = retrieval_recalls(images, texts, text_image, chunk=self.cfg.eval_batch_text_chunk)
        if k > 0:
            metrics.update(self._rerank(model, images, texts, text_image, inputs))
        return metrics

    def _rerank(
        self,
        model: nn.Module,
        images: torch.Tensor,
        texts: torch.Tensor,
        text_image: torch.Tensor,
        inputs: dict[Any, Any],
    ) -> dict[str, float]:
        """``rerank_*`` recall: this rank's share of the queries through the fusion encoder, merged."""
        inner = unwrap(model)
        n_img, n_txt = images.shape[0], texts.shape[0]
        matcher = FusionMatcher(
            inner,
            [inputs[("p", i)] for i in range(n_img)],
            [inputs[("x", j)] for j in range(n_txt)],
            model_device(inner),
        )
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                return rerank_recalls(
                    images, texts, text_image, matcher, self.cfg.rerank_k, self.cfg.rerank_batch_size, KS,
                    rank=ops.rank(), world=ops.world_size(), merge=gather_records,
                    itm_scale=self.cfg.rerank_itm_scale,
                )  # fmt: skip
        finally:
            inner.train(was_training)

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """For every caption, the 10 best images: ``[{"caption", "image", "retrieved": [names]}, ...]``."""
        images, texts, _ = self._features(model, loader)
        ds: RetrievalEvalDataset = loader.dataset  # type: ignore[assignment]
        top = (texts @ images.t()).topk(min(10, len(ds.images)), dim=1).indices  # (T, k)
        return [
            {
                "caption": c,
                "image": ds.images[int(g)].name,
                "retrieved": [ds.images[int(i)].name for i in row],
            }
            for c, g, row in zip(ds.captions, ds.text_image, top.tolist())
        ]
