"""COCO captioning data from Karpathy's split file (``dataset_coco.json``), read by
:func:`mdm.tasks.retrieval_data.read_karpathy`.

Training items are one caption each, with BEiT-3's caption masking (unilm/beit3
``CaptioningDataset._masking_on_text_tokens``): of the ``n`` real tokens ``[bos] w_1 .. [eos]``,
``min(int(n · p + 0.5), n - 1)``, at least one, of positions ``1 .. n-1`` (never [bos]; [eos] can
be chosen, so the model learns to stop) are predicted; BERT's 80/10/10: [MASK], a random token, unchanged.
Evaluation items are one image each; the references are the image's captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mdm.tasks.common import Problems, TextTokenizer, build_transform, encode_text, load_image
from mdm.tasks.config import TaskDataConfig
from mdm.tasks.retrieval_data import RetrievalImage

IGNORE = -100
FIRST_WORD_ID = 3  # ids below are [bos], [pad], [eos]


def mask_caption(
    text: torch.Tensor,
    padding_mask: torch.Tensor,
    mask_prob: float,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks one caption for the captioning loss.

    Args:
        text: (T,) ids ``[bos] words [eos] [pad]...``.
        padding_mask: (T,) True at padding.
        mask_prob: fraction of the real tokens to predict (chosen after [bos]).
        mask_id: the [MASK] id; random replacements are drawn from ``[3, mask_id)``.
        generator: random source (None: torch's global one, i.e. the data worker's).

    Returns:
        (the input ids (T,), the labels (T,): the original id at predicted positions, -100 elsewhere).
    """
    n = int((~padding_mask).sum())
    candidates = n - 1  # positions 1 .. n-1
    if candidates < 1:
        raise ValueError("a caption needs at least one token after [bos]")
    k = max(1, min(int(n * mask_prob + 0.5), candidates))
    pos = 1 + torch.randperm(candidates, generator=generator)[:k]  # (k,)
    labels = torch.full_like(text, IGNORE)
    labels[pos] = text[pos]
    inputs = text.clone()
    u = torch.rand(k, generator=generator)
    random_ids = torch.randint(FIRST_WORD_ID, max(mask_id, FIRST_WORD_ID + 1), (k,), generator=generator)
    inputs[pos] = torch.where(
        u < 0.8, torch.full_like(pos, mask_id), torch.where(u < 0.9, random_ids, text[pos])
    )
    return inputs, labels


class CaptionTrainDataset(Dataset):
    """One item per caption: ``image``, ``text`` (masked input), ``text_padding_mask``, ``mlm_labels``."""

    def __init__(
        self,
        images: list[RetrievalImage],
        tokenizer: TextTokenizer,
        data: TaskDataConfig,
        mask_prob: float,
        mask_id: int,
        problems: Problems,
    ) -> None:
        self.images = images
        self.pairs = [(i, c) for i, im in enumerate(images) for c in im.captions]
        self.tokenizer, self.max_text_len = tokenizer, data.max_text_len
        self.mask_prob, self.mask_id = mask_prob, mask_id
        self.transform = build_transform(data, train=True)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, caption = self.pairs[k]
        text, pad = encode_text(self.tokenizer, caption, self.max_text_len)
        inputs, labels = mask_caption(text, pad, self.mask_prob, self.mask_id)
        image = self.transform(load_image(self.images[i].path))
        return {"image": image, "text": inputs, "text_padding_mask": pad, "mlm_labels": labels}


class CaptionEvalDataset(Dataset):
    """One item per image: ``image``, ``image_index``; :attr:`references` maps image id → its captions."""

    def __init__(self, images: list[RetrievalImage], data: TaskDataConfig) -> None:
        self.images = images
        self.transform = build_transform(data, train=False)

    @property
    def references(self) -> dict[str, list[str]]:
        return {im.name: list(im.captions) for im in self.images}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"image": self.transform(load_image(self.images[k].path)), "image_index": k}


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks a batch; training text columns that are padding everywhere are dropped."""
    batch: dict[str, Any] = {
        k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "image_index"
    }
    if "image_index" in samples[0]:
        batch["image_index"] = torch.tensor([s["image_index"] for s in samples], dtype=torch.long)
    if "text_padding_mask" in batch:
        keep = int((~batch["text_padding_mask"]).sum(1).max())
        for key in ("text", "text_padding_mask", "mlm_labels"):
            batch[key] = batch[key][:, :keep]
    return batch
