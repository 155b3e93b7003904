"""The SentencePiece text tokenizer, with the id layout of BEiT-3's XLM-R tokenizer.

BEiT-3 tokenizes with ``beit3.spm`` through ``transformers.XLMRobertaTokenizer``, i.e. fairseq's
layout on top of the SentencePiece ids (facts: ``beit-family.md`` §1.2, unilm issue #1318):

- ``<s>`` = 0 (bos / CLS), ``<pad>`` = 1, ``</s>`` = 2 (eos), ``<unk>`` = 3;
- a SentencePiece piece with id ``i ≥ 3`` gets ``i + 1`` (SentencePiece's own ``<unk>`` (0) → 3);
- ``<mask>`` = number of pieces + 1 (64001 for ``beit3.spm``);
- the model's embedding has ``vocab_size`` rows, which may exceed ``mask_id + 1`` (64010 for BEiT-3:
  "eight embeddings not used").

Models trained by :func:`train_sentencepiece` use the same layout (SentencePiece ids unk=0, bos=1,
eos=2), so every mdm text tokenizer behaves alike. This module touches no files: it takes and returns
the serialized model (``model_proto``); :mod:`mdm.tokenizers.io` reads and writes it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm
import torch

__all__ = ["TextTokenizer", "train_sentencepiece", "BEIT3_EMBEDDING_ROWS"]

BEIT3_EMBEDDING_ROWS = 64010
_OFFSET = 1  # fairseq: SentencePiece id i ↦ i + 1


class TextTokenizer:
    """SentencePiece with fairseq/XLM-R special ids, batching, truncation, padding and a mask token.

    Args:
        model_proto: the serialized SentencePiece model (the bytes of a ``.model`` / ``.spm`` file).
        embedding_rows: rows of the model's text embedding (default ``mask_id + 1``; 64010 for BEiT-3).
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3

    def __init__(self, model_proto: bytes, embedding_rows: int | None = None) -> None:
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self.model_proto)
        self.num_pieces = self.sp.GetPieceSize()
        self.mask_id = self.num_pieces + _OFFSET
        rows = embedding_rows if embedding_rows is not None else self.mask_id + 1
        if rows <= self.mask_id:
            raise ValueError(f"embedding_rows {rows} must exceed the mask id {self.mask_id}")
        self.vocab_size = rows

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids MLM must never select or produce: bos, pad, eos, mask."""
        return (self.bos_id, self.pad_id, self.eos_id, self.mask_id)

    def tokenize(self, text: str) -> list[int]:
        """Ids of one text, without bos/eos."""
        return [i + _OFFSET if i != self.sp.unk_id() else self.unk_id for i in self.sp.EncodeAsIds(text)]

    def encode(
        self, texts: str | Sequence[str], max_len: int, pad_to_longest: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[bos] ids [eos] [pad]...`` for a batch of texts.

        Args:
            texts: one text or a list.
            max_len: length after truncation (bos and eos included; at least 2).
            pad_to_longest: pad to the longest sequence of the batch instead of ``max_len``.

        Returns:
            (ids LongTensor (B, T), padding_mask BoolTensor (B, T), True at padding).
        """
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (bos and eos), got {max_len}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        seqs = [[self.bos_id, *self.tokenize(t)[: max_len - 2], self.eos_id] for t in batch]
        T = max((len(s) for s in seqs), default=2) if pad_to_longest else max_len
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids.eq(self.pad_id)

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence, or a list of texts for a batch (B, T); special ids are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if ids and isinstance(ids[0], (list, tuple)):
            return [self._decode_one(seq) for seq in ids]  # type: ignore[arg-type]
        return self._decode_one(ids)  # type: ignore[arg-type]

    def _decode_one(self, ids: Sequence[int]) -> str:
        pieces = []
        for i in ids:
            if i in (self.bos_id, self.pad_id, self.eos_id) or i >= self.mask_id:
                continue
            pieces.append(self.sp.unk_id() if i == self.unk_id else i - _OFFSET)
        return self.sp.DecodeIds(pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` stores besides the model bytes."""
        return {"embedding_rows": self.vocab_size}


def train_sentencepiece(
    lines: Iterable[str],
    vocab_size: int = 8000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    embedding_rows: int | None = None,
    max_sentences: int = 2_000_000,
) -> TextTokenizer:
    """Trains a SentencePiece model in memory and wraps it.

    Args:
        lines: training sentences (one per item; empty lines are skipped).
        vocab_size: pieces in the SentencePiece model (a soft limit, so small corpora still train).
        model_type: ``unigram`` or ``bpe``.
        character_coverage: fraction of characters covered by the alphabet.
        embedding_rows: rows of the embedding the tokenizer is meant for (default ``mask_id + 1``).
        max_sentences: at most this many sentences are sampled for training.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line.strip() for line in lines if line.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return TextTokenizer(model.getvalue(), embedding_rows=embedding_rows)
