"""Image captioning (COCO, Karpathy splits), as unilm/beit3 ``BEiT3ForCaptioning`` (BEiT-3, Wang et al. 2023).

The backbone reads ``[image, caption]`` under the seq2seq mask (:func:`~mdm.models.layers.attention.
seq2seq_mask`: image ↔ image, text → image, text → earlier text and itself). Training replaces part of
the caption (:func:`~mdm.tasks.captioning_data.mask_caption`) and predicts the originals with
``mlm_head`` — a Linear(D, vocab) with bias, unilm's name and shape so export maps it 1:1 — under
label-smoothed (0.1) cross-entropy. (unilm's ``BertCaptioningLoss`` is the label-smoothed KL, which has
the same gradient; its "drop the worst 20% of tokens after step 12000" is not implemented.) Decoding
appends a [MASK] and reads the prediction there (:mod:`mdm.tasks.caption_step`), greedy or beam search
(:mod:`mdm.tasks.caption_search`), with a key/value cache. Predictions are COCO results
``[{"image_id", "caption"}]``; metrics come from :func:`mdm.tasks.caption_eval.evaluate_captions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mdm.models.layers.attention import seq2seq_mask
from mdm.tasks.base import TASKS, Task, TaskModel, gather_records, run_inference, trunc_normal_init
from mdm.tasks.caption_search import SearchConfig, beam_search, greedy_search
from mdm.tasks.caption_step import CachedScorer, FullScorer
from mdm.tasks.captioning_data import IGNORE, CaptionEvalDataset, CaptionTrainDataset, collate_captions
from mdm.tasks.common import Problems, TextTokenizer
from mdm.tasks.retrieval_data import read_karpathy


class CaptioningModel(TaskModel):
    """Backbone + ``mlm_head`` of a captioning model.

    Args:
        backbone: the Multiway Transformer.
        label_smoothing: of the masked-token loss (unilm: 0.1).
    """

    HEAD_PREFIXES = ("mlm_head.",)

    def __init__(self, backbone: nn.Module, label_smoothing: float = 0.1) -> None:
        super().__init__(backbone)
        self.mlm_head = nn.Linear(backbone.cfg.embed_dim, backbone.cfg.vocab_size)
        trunc_normal_init(self.mlm_head)
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Masked-token loss; batch: ``image`` (B, 3, H, W), ``text`` (B, T) masked input ids,
        ``text_padding_mask`` (B, T), ``mlm_labels`` (B, T) (-100 where nothing is predicted)."""
        image, text = batch["image"], batch["text"]
        n_image = 1 + (image.shape[-1] // self.backbone.cfg.patch_size) ** 2
        mask = seq2seq_mask(n_image, text.shape[1], text.device)
        x = self.backbone(
            image=image, text=text, text_padding_mask=batch["text_padding_mask"], attn_mask=mask
        )
        labels = batch["mlm_labels"]
        where = labels != IGNORE  # (B, T)
        logits = self.mlm_head(x[:, n_image:][where]).float()  # (M, V): only the predicted positions
        target = labels[where]
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean() * 100.0
        return {"loss": loss, "caption_loss": loss, "caption_acc": acc}

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        bos_id: int,
        eos_id: int,
        mask_id: int,
        search: SearchConfig,
        use_cache: bool = True,
    ) -> tuple[list[list[int]], list[float]]:
        """Captions of (B, 3, H, W) images: per image the generated ids (no [bos]; [eos] kept when
        emitted) and the hypothesis score (beam: length-normalised)."""
        B = image.shape[0]
        make = CachedScorer if use_cache else FullScorer
        if search.beam_size <= 1:
            scorer = make(self.backbone, self.mlm_head, image, mask_id)
            ids, scores = greedy_search(scorer, B, bos_id, eos_id, search, image.device)
            return ids, scores.tolist()
        rows = image.repeat_interleave(search.beam_size, 0)  # (B·K, 3, H, W)
        scorer = make(self.backbone, self.mlm_head, rows, mask_id)
        return beam_search(scorer, B, bos_id, eos_id, search, image.device)

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"ids": self.generate(batch["image"], **batch["decode"])[0]}


def _special_ids(tokenizer: TextTokenizer, mask_token_id: int) -> dict[str, int]:
    mask_id = mask_token_id if mask_token_id >= 0 else getattr(tokenizer, "mask_id", None)
    if mask_id is None:
        raise ValueError("captioning needs a [MASK] id: a tokenizer with mask_id, or task.mask_token_id")
    return {"bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id), "mask_id": int(mask_id)}


@TASKS.register("captioning")
class CaptioningTask(Task):
    """COCO captioning recipe (Karpathy splits: train + restval / val / test)."""

    METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    PRIMARY_METRIC = "CIDEr"
    DEFAULT_SPLITS = {"train_splits": ["train"], "val_split": "val", "test_split": "test"}

    def build_model(self, backbone: nn.Module) -> CaptioningModel:
        return CaptioningModel(backbone, self.cfg.label_smoothing)

    def search_config(self) -> SearchConfig:
        c = self.cfg
        return SearchConfig(
            c.beam_size, c.max_caption_len, c.min_caption_len, c.length_penalty, c.no_repeat_ngram_size
        )

    def build_dataset(self, split: str, tokenizer: TextTokenizer | None):
        if tokenizer is None:
            raise ValueError("captioning needs a text tokenizer")
        root = Path(self.data.root)
        specs = self.resolve_split(split)
        problems = Problems(
            f"captioning {'+'.join(specs)} in {root / self.data.karpathy_file}", self.data.on_error
        )
        images = read_karpathy(root, self.data, specs, problems)
        problems.report()
        if not images:
            raise ValueError(
                f"captioning split {split!r} ({', '.join(specs)}) under {root} has no usable image"
            )
        ids = _special_ids(tokenizer, self.cfg.mask_token_id)
        if self.is_train(split):
            return CaptionTrainDataset(
                images, tokenizer, self.data, self.cfg.caption_mask_prob, ids["mask_id"], problems
            )
        ds = CaptionEvalDataset(images, self.data)
        ds.tokenizer, ds.special_ids = tokenizer, ids  # decoding needs both
        return ds

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_captions(samples)

    def _captions(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, str]:
        """Image id → generated caption, over the whole (possibly distributed) split."""
        ds: CaptionEvalDataset = loader.dataset  # type: ignore[attr-defined]
        if not isinstance(ds, CaptionEvalDataset):
            raise ValueError("captioning evaluation needs the dataset of an evaluation split (val/test)")
        decode = {**ds.special_ids, "search": self.search_config()}
        rows: list[tuple[str, str]] = []
        for batch, out in run_inference(model, ({**b, "decode": decode} for b in loader)):
            for k, ids in zip(batch["image_index"].tolist(), out["ids"]):
                rows.append((ds.images[k].name, ds.tokenizer.decode(ids)))
        return gather_records(rows)

    def evaluate(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> dict[str, float]:
        from mdm.tasks.caption_eval import evaluate_captions  # written beside this task; lazy on purpose

        captions = self._captions(model, loader)
        refs = loader.dataset.references  # type: ignore[attr-defined]
        return evaluate_captions(refs, captions, java=None if self.cfg.meteor else False)

    def references(self, split: str) -> dict[str, list[str]]:
        """Image id → reference captions of ``split`` (for scoring a prediction file)."""
        root = Path(self.data.root)
        problems = Problems(f"captioning {split} in {root / self.data.karpathy_file}", self.data.on_error)
        images = read_karpathy(root, self.data, self.resolve_split(split), problems)
        return {im.name: list(im.captions) for im in images}

    def predict(self, model: nn.Module, loader: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """COCO results format: ``[{"image_id": int (cocoid) or str, "caption": str}, ...]``."""
        captions = self._captions(model, loader)
        return [{"image_id": int(k) if k.isdigit() else k, "caption": c} for k, c in sorted(captions.items())]


def score_caption_file(
    predictions: list[dict[str, Any]],
    references: dict[str, list[str]],
    source: str = "<predictions>",
    meteor: bool = True,
) -> dict[str, float]:
    """Scores COCO results ``[{"image_id", "caption"}]`` against ``references`` (image id → captions).

    Every image of the split needs a caption; ids are compared as strings (cocoid ints or names).
    ``meteor=False`` skips METEOR (and its Java start-up).
    """
    from mdm.tasks.caption_eval import evaluate_captions  # written beside this task; lazy on purpose

    candidates: dict[str, str] = {}
    for i, row in enumerate(predictions):
        if not isinstance(row, dict) or "image_id" not in row or not isinstance(row.get("caption"), str):
            raise ValueError(f"{source}: record {i} is not {{'image_id': ..., 'caption': str}}")
        candidates[str(row["image_id"])] = row["caption"]
    unknown = sorted(set(candidates) - set(references))
    missing = sorted(set(references) - set(candidates))
    if unknown or missing:
        raise ValueError(
            f"{source}: {len(unknown)} image ids not in the split (e.g. {unknown[:3]}), "
            f"{len(missing)} images of the split without a caption (e.g. {missing[:3]})"
        )
    return evaluate_captions(references, candidates, java=None if meteor else False)
