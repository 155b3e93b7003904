"""COCO / Flickr30k retrieval data from Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``).

File format: ``{"images": [{"split": "train"|"restval"|"val"|"test", "filename": ..., "filepath":
"val2014" (COCO only), "sentences": [{"raw": ...}, ...], "cocoid"|"imgid": ...}, ...]}``. Images are read
from ``root/<data.image_dir>/<filepath>/<filename>``; ``image_dir`` defaults to nothing for COCO (the
``filepath`` folders ``train2014``/``val2014`` sit in the root) and to ``flickr30k-images`` for Flickr30k.
Split ``train`` means Karpathy's ``train`` + ``restval`` (113k COCO images), as unilm/beit3 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mdm.tasks.common import (
    Problems,
    TextTokenizer,
    build_transform,
    encode_text,
    find_file,
    load_image,
    read_json,
)
from mdm.tasks.config import TaskDataConfig

SPLIT_ALIASES = {"train": ("train", "restval")}


@dataclass
class RetrievalImage:
    path: str
    name: str  # cocoid / filename, for predictions
    captions: list[str]


def read_karpathy(
    root: Path, data: TaskDataConfig, splits: Sequence[str], problems: Problems
) -> list[RetrievalImage]:
    """Images (with their captions) of the given Karpathy splits, in file order."""
    path = find_file(root, data.karpathy_file)
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{path}: expected an object with an 'images' list")
    wanted = {s for spec in splits for s in SPLIT_ALIASES.get(spec, (spec,))}
    images = []
    for i, item in enumerate(content["images"]):
        where = f"{path.name}: image {i}"
        if not isinstance(item, dict) or not {"split", "filename", "sentences"} <= set(item):
            problems.add("bad_record", f"{where} lacks 'split', 'filename' or 'sentences'")
            continue
        if item["split"] not in wanted:
            continue
        folder = data.image_dir if data.image_dir else ("" if "filepath" in item else "flickr30k-images")
        file = root / folder / str(item.get("filepath", "")) / str(item["filename"])
        captions = [str(s["raw"]) for s in item["sentences"] if isinstance(s, dict) and "raw" in s]
        if not file.is_file():
            problems.add("missing_image", f"{where} ({item['filename']}): {file} not found")
        elif not captions:
            problems.add("no_caption", f"{where} ({item['filename']}) has no sentence with 'raw' text")
        else:
            name = str(item.get("cocoid", item.get("imgid", item["filename"])))
            images.append(RetrievalImage(str(file), name, captions))
    return images


class RetrievalTrainDataset(Dataset):
    """One item per caption: ``image``, ``text``, ``text_padding_mask``, ``image_id`` (index of the image)."""

    def __init__(
        self, images: list[RetrievalImage], tokenizer: TextTokenizer, data: TaskDataConfig, problems: Problems
    ) -> None:
        self.images = images
        self.pairs = [(i, c) for i, im in enumerate(images) for c in im.captions]
        self.tokenizer = tokenizer
        self.max_text_len = data.max_text_len
        self.transform = build_transform(data, train=True)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, caption = self.pairs[k]
        text, pad = encode_text(self.tokenizer, caption, self.max_text_len)
        return {
            "image": self.transform(load_image(self.images[i].path)),
            "text": text,
            "text_padding_mask": pad,
            "image_id": i,
        }


class RetrievalEvalDataset(Dataset):
    """Every image once, then every caption: items are ``{"entry": "image", "index", "image"}`` or
    ``{"entry": "text", "index", "text", "text_padding_mask"}`` (collated by :func:`collate_retrieval`).
    ``text_image`` maps caption index → image index."""

    def __init__(
        self, images: list[RetrievalImage], tokenizer: TextTokenizer, data: TaskDataConfig, problems: Problems
    ) -> None:
        self.images = images
        self.captions = [c for im in images for c in im.captions]
        self.text_image = torch.tensor(
            [i for i, im in enumerate(images) for _ in im.captions], dtype=torch.long
        )
        self.tokenizer = tokenizer
        self.max_text_len = data.max_text_len
        self.transform = build_transform(data, train=False)
        self.problems = problems

    def __len__(self) -> int:
        return len(self.images) + len(self.captions)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k < len(self.images):
            return {"entry": "image", "index": k, "image": self.transform(load_image(self.images[k].path))}
        j = k - len(self.images)
        text, pad = encode_text(self.tokenizer, self.captions[j], self.max_text_len)
        return {"entry": "text", "index": j, "text": text, "text_padding_mask": pad}


def collate_retrieval(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Splits an evaluation batch into its images and its texts (either part may be absent)."""
    images = [s for s in samples if s["entry"] == "image"]
    texts = [s for s in samples if s["entry"] == "text"]
    batch: dict[str, Any] = {}
    if images:
        batch["image"] = torch.stack([s["image"] for s in images])
        batch["image_index"] = torch.tensor([s["index"] for s in images], dtype=torch.long)
    if texts:
        pad = torch.stack([s["text_padding_mask"] for s in texts])
        keep = int((~pad).sum(1).max())
        batch["text"] = torch.stack([s["text"] for s in texts])[:, :keep]
        batch["text_padding_mask"] = pad[:, :keep]
        batch["text_index"] = torch.tensor([s["index"] for s in texts], dtype=torch.long)
    return batch
