"""Tiny datasets in the *published* formats, and a dependency-free text tokenizer, for tests and smoke runs.

The writers produce VQAv2 (questions + annotations JSON, ``COCO_<split>_<id:012d>.jpg``), NLVR2 (JSON
lines + ``-img0/-img1.png`` pairs), Karpathy retrieval splits and ImageNet-style class folders whose labels
depend on the image colours, so a model can learn them in a few steps. Nothing here is used by the recipes
themselves.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


class HashTokenizer:
    """Whitespace words hashed (crc32) into ``vocab_size`` ids: ``[bos]=0, [pad]=1, [eos]=2``.

    Implements :class:`mdm.tasks.common.TextTokenizer`; deterministic across processes.
    """

    bos_id, pad_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int = 1024) -> None:
        self.vocab_size = vocab_size

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [3 + zlib.crc32(w.lower().encode()) % (self.vocab_size - 3) for w in t.split()]
            row = [self.bos_id, *words[: max_len - 2], self.eos_id]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids == self.pad_id

    def decode(self, ids: Sequence[int]) -> str:
        """``w<id>`` per word id (hashing is one-way); [bos], [pad], [eos] and ids ≥ vocab are skipped."""
        return " ".join(f"w{i}" for i in ids if 3 <= i < self.vocab_size)


def color_image(path: Path, color: str, rng: random.Random, size: int = 40) -> None:
    """Writes a noisy image of one colour (format from the suffix)."""
    base = np.array(COLORS[color], dtype=np.int16)
    noise = np.array([[rng.randint(-25, 25) for _ in range(3)] for _ in range(size * size)], dtype=np.int16)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8).reshape(size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_vqav2(
    root: str | Path, images: dict[str, int], questions_per_image: int = 2, seed: int = 0
) -> dict[str, Any]:
    """VQAv2 files for the splits in ``images`` (split → number of images); answers are image colours.

    Annotations are written for ``train2014`` / ``val2014``. Returns ``{split: {"questions": [...],
    "annotations": [...]}}`` for inspection.
    """
    root, rng = Path(root), random.Random(seed)
    out: dict[str, Any] = {}
    qid = 1
    for split, n in images.items():
        folder = "test2015" if split.startswith("test") else split
        questions, annotations = [], []
        for k in range(n):
            image_id = 1000 * (len(out) + 1) + k
            color = rng.choice(sorted(COLORS))
            color_image(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", color, rng)
            for _ in range(questions_per_image):
                questions.append(
                    {"image_id": image_id, "question": "what color is the picture?", "question_id": qid}
                )
                humans = [color] * 8 + [rng.choice(sorted(COLORS)), f"{color}."]
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": image_id,
                        "question_type": "what color is the",
                        "answer_type": "other",
                        "multiple_choice_answer": color,
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(humans)
                        ],
                    }
                )
                qid += 1
        _dump(
            root / f"v2_OpenEnded_mscoco_{split}_questions.json",
            {"data_subtype": split, "questions": questions},
        )
        if split in ("train2014", "val2014"):
            _dump(
                root / f"v2_mscoco_{split}_annotations.json",
                {"data_subtype": split, "annotations": annotations},
            )
        out[split] = {"questions": questions, "annotations": annotations}
    return out


def write_nlvr2(root: str | Path, rows: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """NLVR2 JSON lines + image pairs (label True iff both images have the named colour)."""
    root, rng = Path(root), random.Random(seed)
    folders = {"train": "images/train", "dev": "dev", "test1": "test1"}
    out = {}
    for split, n in rows.items():
        lines = []
        for k in range(n):
            color = rng.choice(sorted(COLORS))
            same = rng.random() < 0.5
            other = color if same else rng.choice([c for c in sorted(COLORS) if c != color])
            row = {
                "identifier": f"{split}-{k}-0-0",
                "sentence": f"both pictures are {color}",
                "label": str(same),
            }
            folder = root / folders[split]
            if split == "train":
                row["directory"] = k % 3
                folder = folder / str(k % 3)
            color_image(folder / f"{split}-{k}-0-img0.png", color, rng)
            color_image(folder / f"{split}-{k}-0-img1.png", other, rng)
            lines.append(row)
        (root / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
        out[split] = lines
    return out


def write_karpathy(
    root: str | Path, images: dict[str, int], dataset: str = "coco", seed: int = 0
) -> dict[str, Any]:
    """``dataset_coco.json`` (images under ``val2014/``) or ``dataset_flickr30k.json`` (``flickr30k-images/``)."""
    root, rng = Path(root), random.Random(seed)
    items = []
    for split, n in images.items():
        for _ in range(n):
            color = rng.choice(sorted(COLORS))
            idx = len(items)
            name = f"COCO_val2014_{idx:012d}.jpg" if dataset == "coco" else f"{idx}.jpg"
            folder = "val2014" if dataset == "coco" else "flickr30k-images"
            color_image(root / folder / name, color, rng)
            sentences = [
                {"raw": f"a {color} picture number {idx}", "imgid": idx},
                {"raw": f"something {color}", "imgid": idx},
            ]
            item = {"split": split, "filename": name, "imgid": idx, "sentences": sentences}
            if dataset == "coco":
                item.update(filepath=folder, cocoid=idx)
            items.append(item)
    content = {"images": items, "dataset": dataset}
    _dump(root / f"dataset_{dataset}.json", content)
    return content


def write_image_folder(
    root: str | Path, per_class: dict[str, int], classes: Sequence[str] = ("blue", "red"), seed: int = 0
) -> None:
    """``root/<split>/<class>/<k>.png`` with images of the class colour."""
    root, rng = Path(root), random.Random(seed)
    for split, n in per_class.items():
        for c in classes:
            for k in range(n):
                color_image(root / split / c / f"{k}.png", c, rng)
