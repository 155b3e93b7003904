"""The SentencePiece text tokenizer: XLM-R/BEiT-3 id layout, truncation, padding, mask token, CLI."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm
import torch

from mdm.tokenizers import load
from mdm.tokenizers.cli import main
from mdm.tokenizers.text import BEIT3_EMBEDDING_ROWS, TextTokenizer, train_sentencepiece

WORDS = "the a red green blue yellow circle square triangle cross left right top bottom of is there two one".split()


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_sentencepiece(corpus(), vocab_size=80)


def test_special_ids_follow_xlmr(tok):
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.mask_id == tok.num_pieces + 1 and tok.vocab_size == tok.mask_id + 1
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok.model_proto)
    text = "the red circle is left of two squares"
    # fairseq offset: SentencePiece id i ↦ i + 1, SentencePiece <unk> ↦ 3
    expected = [i + 1 if i != sp.unk_id() else 3 for i in sp.EncodeAsIds(text)]
    assert tok.tokenize(text) == expected
    assert tok.tokenize("ZZZ€")[-1] == tok.unk_id or tok.unk_id in tok.tokenize("€")


def test_beit3_embedding_rows_and_mask(tok):
    big = TextTokenizer(tok.model_proto, embedding_rows=BEIT3_EMBEDDING_ROWS)
    assert big.vocab_size == 64010 and big.mask_id == tok.mask_id
    with pytest.raises(ValueError, match="mask id"):
        TextTokenizer(tok.model_proto, embedding_rows=tok.mask_id)


def test_encode_truncates_pads_and_masks(tok):
    long_text = " ".join(["red circle"] * 40)
    ids, pad = tok.encode(["blue square", long_text], max_len=12)
    assert ids.shape == pad.shape == (2, 12) and ids.dtype == torch.long and pad.dtype == torch.bool
    assert ids[0, 0] == tok.bos_id and ids[1, 0] == tok.bos_id and ids[1, -1] == tok.eos_id
    n0 = len(tok.tokenize("blue square")) + 2
    assert ids[0, n0 - 1] == tok.eos_id and bool(pad[0, n0:].all()) and not bool(pad[0, :n0].any())
    assert bool((ids[0, n0:] == tok.pad_id).all()) and not bool(pad[1].any())
    ids2, _ = tok.encode(["blue square", "red"], max_len=64, pad_to_longest=True)
    assert ids2.shape[1] == n0
    assert tok.decode(ids[0]) == "blue square"
    assert tok.decode(ids2) == ["blue square", "red"]
    assert tok.decode([tok.bos_id, tok.mask_id, *tok.tokenize("red"), tok.eos_id]) == "red"


def test_train_text_cli_and_load(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus(3000, seed=1)) + "\n")
    assert (
        main(["train-text", "--input", str(text), "--out", str(tmp_path / "spm"), "--vocab-size", "60"]) == 0
    )
    loaded = load(tmp_path / "spm")
    assert isinstance(loaded, TextTokenizer) and loaded.num_pieces <= 60
    ids, _ = loaded.encode("the blue cross", 16)
    assert loaded.decode(ids[0]) == "the blue cross"
    assert main(["train-text", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_import_existing_spm_model(tmp_path, tok, capsys):
    model = tmp_path / "beit3.spm"
    model.write_bytes(tok.model_proto)
    out = tmp_path / "imported"
    assert main(["import", "spm", "--model", str(model), "--out", str(out), "--embedding-rows", "64010"]) == 0
    loaded = load(out)
    assert loaded.vocab_size == 64010 and loaded.tokenize("red") == tok.tokenize("red")
    (tmp_path / "bad.spm").write_bytes(b"not a model")
    assert main(["import", "spm", "--model", str(tmp_path / "bad.spm"), "--out", str(tmp_path / "b")]) == 2
    assert "bad.spm" in capsys.readouterr().err
