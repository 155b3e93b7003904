"""Pieces shared by the fine-tuning readers: the text-tokenizer interface, malformed-record accounting,
image loading and transforms, and the batch collate function.

Transforms follow unilm/beit3 ``datasets.build_transform`` (BEiT-3, Wang et al. 2023): training uses
RandomResizedCrop (scale 0.5–1, bicubic) → horizontal flip → optional RandAugment (BEiT-3's op list, here
through timm) → Normalize(mean = std = 0.5); evaluation uses Resize((s, s), bicubic) → Normalize.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torchvision import transforms as T

from mdm.tasks.config import TaskDataConfig

log = logging.getLogger(__name__)

#: BEiT-3's RandomAugment ops (ALBEF style) as timm op names; "Identity" has no timm op (p=0.5 per op
#: already leaves images untouched half of the time).
RANDAUG_OPS = [
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "Rotate",
]
MEAN = STD = (0.5, 0.5, 0.5)


@runtime_checkable
class TextTokenizer(Protocol):
    """What the readers need from a text tokenizer (``mdm.tokenizers`` provides SentencePiece ones)."""

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[bos] ids [eos] [pad]...`` as (B, max_len) long ids and a (B, max_len) bool padding mask."""
        ...


class RecordError(ValueError):
    """A malformed input record; the message names the file and the record."""


class Problems:
    """Counts malformed records per kind, or raises on the first one when ``on_error == "error"``.

    Args:
        source: what is being read (a file or split name), used in messages.
        on_error: ``skip`` or ``error``.
    """

    def __init__(self, source: str, on_error: str = "skip") -> None:
        self.source = source
        self.on_error = on_error
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, what: str) -> None:
        """Records one problem of ``kind`` (e.g. ``missing_image``) described by ``what``."""
        if self.on_error == "error":
            raise RecordError(
                f"{self.source}: {what} ({kind.replace('_', ' ')}; set data.on_error=skip to skip such records)"
            )
        self.counts[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(what)

    def report(self) -> None:
        """Logs one warning per kind with a few examples."""
        for kind, n in sorted(self.counts.items()):
            log.warning(
                "%s: skipped %d record(s): %s, e.g. %s", self.source, n, kind, "; ".join(self.examples[kind])
            )

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def read_json(path: Path) -> Any:
    """Parses a JSON file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON: {e}") from None


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; errors name file and line."""
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    return rows


def require(record: dict, keys: Sequence[str], where: str) -> None:
    """Raises RecordError naming ``where`` and the first of ``keys`` missing from ``record``."""
    for k in keys:
        if k not in record:
            raise RecordError(f"{where}: missing key {k!r} (has {sorted(record)})")


def find_file(root: Path, name: str, subdirs: Sequence[str] = ("", "annotations", "vqa", "data")) -> Path:
    """``root/<subdir>/name`` for the first subdir where it exists; errors list where it looked."""
    tried = [root / d / name for d in subdirs]
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(f"{name} not found; looked in: {', '.join(str(p) for p in tried)}")


def load_image(path: str | Path) -> Image.Image:
    """Opens an image as RGB (grey, palette and RGBA images are converted); errors name the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise RecordError(f"{path}: cannot read image: {e}") from None


def build_transform(data: TaskDataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The image transform of a split (see the module docstring)."""
    s = data.image_size
    bicubic = T.InterpolationMode.BICUBIC
    if not train:
        steps: list[Any] = [T.Resize((s, s), interpolation=bicubic)]
    else:
        steps = [T.RandomResizedCrop(s, scale=tuple(data.crop_scale), interpolation=bicubic)]
        if data.hflip:
            steps.append(T.RandomHorizontalFlip())
        if data.randaug:
            from timm.data.auto_augment import rand_augment_transform

            hparams = {"img_mean": tuple(round(255 * m) for m in MEAN)}
            steps.append(rand_augment_transform(data.randaug_config, hparams, transforms=RANDAUG_OPS))
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(steps)


def encode_text(tokenizer: TextTokenizer, text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One text → (T,) ids and (T,) padding mask."""
    ids, pad = tokenizer.encode([text], max_len)
    return ids[0], pad[0].bool()


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors, turns ints/floats/bools into tensors and keeps strings as lists.

    ``text``/``text_padding_mask`` columns that are padding in every sample are dropped (the backbone
    masks padding, so results do not change; shorter sequences are faster).
    """
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    if "text_padding_mask" in batch:
        keep = int((~batch["text_padding_mask"]).sum(1).max())  # longest real length in the batch
        batch["text"] = batch["text"][:, :keep]
        batch["text_padding_mask"] = batch["text_padding_mask"][:, :keep]
    return batch
