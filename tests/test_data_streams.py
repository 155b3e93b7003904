"""Pretraining streams: batch contract, exact resume with workers, per-rank disjointness, mixing weights,
bad samples skipped and counted, shard specs."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mdm.data.demo.scenes import make_scenes, render
from mdm.data.shards import WriteReport, from_text_files, write_shards
from mdm.data.streams import (
    PretrainDataConfig,
    SourceConfig,
    StreamConfig,
    build_pretrain_stream,
    expand_shards,
)
from mdm.data.transforms import ViewConfig

MODEL = SimpleNamespace(img_size=32, patch_size=8)  # 4 x 4 patches


class CharTokenizer:
    """A reversible stand-in for the text tokenizer: printable ASCII character c ↦ ord(c) - 28."""

    bos_id, pad_id, eos_id, mask_id, vocab_size = 0, 1, 2, 99, 100
    special_ids = (0, 1, 2, 99)

    def encode(self, texts, max_len):
        ids = torch.full((len(texts), max_len), self.pad_id)
        for b, t in enumerate(texts):
            seq = [self.bos_id] + [min(ord(c) - 28, 98) for c in t[: max_len - 2]] + [self.eos_id]
            ids[b, : len(seq)] = torch.tensor(seq)
        return ids, ids.eq(self.pad_id)

    def decode(self, row):
        return "".join(chr(int(i) + 28) for i in row if int(i) not in self.special_ids)


def _jpg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pairs(n: int, tag: str):
    for i, scene in enumerate(make_scenes(n, 0, tag)):
        caps = [f"{tag} {i} {o.colour} {o.shape}" for o in scene.objects]
        yield {
            "__key__": f"{tag}{i:05d}",
            "jpg": _jpg(render(scene, 32)),
            "json": json.dumps({"captions": caps}).encode(),
        }


def _texts(root: Path, name: str, n: int, per_shard: int) -> str:
    (root / f"{name}.txt").write_text("".join(f"{name} line {i}\n" for i in range(n)))
    out = root / name
    write_shards(
        from_text_files([root / f"{name}.txt"], WriteReport("text")), out, "text", max_count=per_shard
    )
    return str(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    write_shards(_pairs(40, "p"), root / "pairs", "pair", max_count=10)
    images = ({"__key__": s["__key__"], "jpg": s["jpg"]} for s in _pairs(30, "i"))
    write_shards(images, root / "images", "image", max_count=10)
    return {
        "root": root,
        "pair": str(root / "pairs"),
        "image": str(root / "images"),
        "text": _texts(root, "t", 64, 8),
        "a": _texts(root, "a", 50, 10),
        "b": _texts(root, "b", 50, 10),
    }


def _cfg(world, workers=0, kinds=("image", "text", "pair"), bs=4, **kw) -> PretrainDataConfig:
    streams = {
        k: StreamConfig(sources=[SourceConfig([world[k]])], batch_size=bs, max_text_len=24) for k in kinds
    }
    return PretrainDataConfig(**streams, num_workers=workers, views=ViewConfig(crop_scale=(0.5, 1.0)), **kw)


def _stream(cfg, rank=0, world_size=1, seed=0):
    kinds = set(cfg.streams())
    return build_pretrain_stream(cfg, kinds, CharTokenizer(), MODEL, rank, world_size, seed)


def test_batch_contract_and_global_rng_untouched(world):
    state, tstate = random.getstate(), torch.get_rng_state()
    step = next(_stream(_cfg(world, min_mask_patches=2)))
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), tstate)
    img, pair, text = step["image"], step["pair"], step["text"]
    assert img["image"].shape == (4, 3, 32, 32) and img["image"].min() >= -1 and img["image"].max() <= 1
    assert img["tokenizer_image"].min() >= 0 and img["tokenizer_image"].max() <= 1
    assert img["image_mask"].shape == (4, 16) and img["image_mask"].dtype == torch.bool
    assert (img["image_mask"].sum(1) <= round(0.4 * 16)).all() and img["image_mask"].any()
    assert "text" not in img and "image" not in text
    for b, ratio in ((text, 0.15), (pair, 0.5)):
        # padded to the longest text of the batch (<= max_text_len 24), never beyond
        longest = int((~b["text_padding_mask"]).sum(1).max())
        assert b["text"].shape == b["text_input"].shape == b["text_mask"].shape == (4, longest)
        assert 2 < longest <= 24
        assert not b["text_mask"][b["text_padding_mask"]].any()
        real = (~b["text_padding_mask"]).sum(1) - 2
        assert torch.equal(b["text_mask"].sum(1), (real * ratio).round().clamp(min=1).long())
    assert pair["image"].shape == (4, 3, 32, 32) and "image_mask" in pair


def _run(stream, steps):
    return [next(stream) for _ in range(steps)]


def _same(a, b) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k]) and a.keys() == b.keys()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(world, workers):
    cfg = _cfg(world, workers, min_mask_patches=2)
    reference = _run(_stream(cfg), 7)
    first = _stream(cfg)
    _run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = _stream(cfg)
    resumed.load_state_dict(state)
    rest = _run(resumed, 4)
    assert all(_same(a, b) for a, b in zip(reference[3:], rest))
    assert not _same(reference[3], reference[4])


def _read_texts(stream, steps, kind="text"):
    tok = CharTokenizer()
    return [tok.decode(row) for _ in range(steps) for row in next(stream)[kind]["text"]]


def test_ranks_and_workers_read_disjoint_shards(world):
    """8 shards of 8 lines, 2 ranks x 2 workers: one epoch (16 lines per slot) covers every line once."""
    cfg = _cfg(world, workers=2, kinds=("text",), bs=8)
    seen = []
    for rank in (0, 1):
        seen += _read_texts(_stream(cfg, rank, 2), 4)
    assert len(seen) == 64 and sorted(seen) == sorted(f"t line {i}" for i in range(64))


def test_mixing_weights_are_honoured(world):
    sources = [SourceConfig([world["a"]], weight=3.0), SourceConfig([world["b"]], weight=1.0)]
    cfg = PretrainDataConfig(
        text=StreamConfig(sources=sources, batch_size=50, max_text_len=16), num_workers=0
    )
    texts = _read_texts(_stream(cfg), 12)
    share = sum(t.startswith("a") for t in texts) / len(texts)
    assert abs(share - 0.75) < 0.05


def test_bad_samples_are_skipped_and_counted(world, tmp_path, caplog):
    good = list(_pairs(6, "g"))
    good[1]["jpg"] = good[1]["jpg"][:200]  # corrupt JPEG
    good[2]["json"] = json.dumps({"captions": ["  "]}).encode()  # empty caption
    write_shards(iter(good), tmp_path / "bad", "pair", max_count=3)
    shard = tmp_path / "bad" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # truncated tar
    cfg = PretrainDataConfig(
        pair=StreamConfig(sources=[SourceConfig([str(tmp_path / "bad")])], batch_size=4), num_workers=0
    )
    stream = _stream(cfg)
    _run(stream, 3)
    skipped = stream.skipped
    assert skipped["pair_bad_image"] >= 1 and skipped["pair_empty_text"] >= 1
    assert skipped["pair_truncated_tar"] >= 1
    assert "g00001" in caplog.text  # the log names the sample


def test_unreadable_shard_set_fails_instead_of_hanging(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.tar").write_bytes(b"")
    cfg = PretrainDataConfig(
        text=StreamConfig(sources=[SourceConfig([str(tmp_path / "empty")])]), num_workers=0
    )
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(_stream(cfg))


def test_shard_specs(world):
    root = Path(world["a"])
    listed = expand_shards([str(root)], "x")
    assert len(listed) == 5 and listed == sorted(listed)
    assert expand_shards([str(root / "shard-{000000..000004}.tar")], "x") == listed
    assert expand_shards([str(root / "shard-00000[0-1].tar"), listed[4]], "x") == listed[:2] + listed[4:]
    with pytest.raises(FileNotFoundError, match="data.text.sources"):
        expand_shards([str(root / "nope-*.tar")], "data.text.sources[0]")
