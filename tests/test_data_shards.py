"""Shard writers (COCO captions, JSONL, image folder, text files), the tar reader, and ``mdm data shards``."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mdm.data import cli
from mdm.data.shards import (
    TruncatedShard,
    WriteReport,
    from_coco_captions,
    from_image_folder,
    from_jsonl,
    from_text_files,
    iter_tar_samples,
    write_shards,
)
from mdm.tokenizers.data import decode_image


def _images(folder: Path) -> dict[str, tuple[int, int]]:
    """Writes RGB, grey, RGBA, odd-sized and corrupt images; returns {file name: size} of the good ones."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "rgb.jpg")
    Image.new("L", (20, 30), 128).save(folder / "grey.jpg")
    Image.new("RGBA", (37, 23), (0, 0, 255, 100)).save(folder / "rgba.png")
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    return {"rgb.jpg": (32, 32), "grey.jpg": (20, 30), "rgba.png": (37, 23)}


def _read_all(out: Path) -> list[dict]:
    index = json.loads((out / "index.json").read_text())
    samples = []
    for name in index["shards"]:
        samples += [s for _, s in iter_tar_samples(out / name)]
    assert len(samples) == index["total"] == sum(index["counts"])
    return samples


def test_coco_captions_round_trip(tmp_path, caplog):
    sizes = _images(tmp_path / "imgs")
    names = ["rgb.jpg", "grey.jpg", "rgba.png", "broken.jpg", "missing.jpg"]
    coco = {
        "images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
        "annotations": [
            {"id": 10 * (i + 1), "image_id": i + 1, "caption": f"caption {n}"} for i, n in enumerate(names)
        ]
        + [{"id": 99, "image_id": 1, "caption": "second"}, {"id": 100, "image_id": 2, "caption": "   "}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    report = WriteReport("pair")
    with caplog.at_level(logging.WARNING):
        samples = from_coco_captions(tmp_path / "captions.json", tmp_path / "imgs", report)
        write_shards(samples, tmp_path / "out", "pair", max_count=2, report=report)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["counts"] == [2, 1] and index["kind"] == "pair"
    assert index["skipped"] == {"empty caption": 1, "unreadable image": 2}
    assert "broken.jpg" in caplog.text and "missing.jpg" in caplog.text  # errors name the file
    got = _read_all(tmp_path / "out")
    for s, name in zip(got, names[:3]):
        img = decode_image(s[name.rsplit(".")[1]], name)
        assert img.mode == "RGB" and img.size == sizes[name]
        meta = json.loads(s["json"])
        assert meta["captions"][0] == f"caption {name}" and s["txt"].decode() == f"caption {name}"
    assert json.loads(got[0]["json"])["captions"] == ["caption rgb.jpg", "second"]


def test_jsonl_round_trip_and_malformed_lines(tmp_path):
    _images(tmp_path / "imgs")
    lines = [
        json.dumps({"image": "imgs/rgb.jpg", "text": "a red square"}),
        "{not json",
        json.dumps({"image": "imgs/grey.jpg", "text": ["grey", "a grey square"]}),
        json.dumps({"image": "imgs/rgba.png", "text": ""}),
        json.dumps({"text": "no image"}),
        json.dumps({"image": "imgs/broken.jpg", "text": "broken"}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    report = WriteReport("pair")
    write_shards(from_jsonl(tmp_path / "pairs.jsonl", report), tmp_path / "out", "pair", report=report)
    got = _read_all(tmp_path / "out")
    assert [json.loads(s["json"])["captions"] for s in got] == [["a red square"], ["grey", "a grey square"]]
    assert report.skipped == {"malformed record": 2, "empty text": 1, "unreadable image": 1}
    assert json.loads((tmp_path / "out" / "index.json").read_text())["skipped"] == report.skipped


def test_image_folder_with_classes(tmp_path):
    for cls, colour in (("zebra", (0, 0, 0)), ("apple", (255, 0, 0))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (8 + k, 8), colour).save(tmp_path / "imgs" / cls / f"{k}.png")
    got = []
    write_shards(
        from_image_folder(tmp_path / "imgs", WriteReport("image")), tmp_path / "out", "image", max_count=4
    )
    got = _read_all(tmp_path / "out")
    assert len(got) == 6 and len(json.loads((tmp_path / "out" / "index.json").read_text())["shards"]) == 2
    for s in got:
        cls = Path(json.loads(s["json"])["source"]).parent.name
        assert int(s["cls"]) == ["apple", "zebra"].index(cls)  # sorted folder names


def test_text_files_and_deterministic_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n")
    (tmp_path / "b.txt").write_text("third\n")
    outs = []
    for run in ("x", "y"):
        write_shards(
            from_text_files([tmp_path / "a.txt", tmp_path / "b.txt"], WriteReport("text")),
            tmp_path / run,
            "text",
        )
        outs.append((tmp_path / run / "shard-000000.tar").read_bytes())
    assert outs[0] == outs[1]  # same input, same bytes (mtime 0, sorted order)
    assert [s["txt"].decode() for s in _read_all(tmp_path / "x")] == ["first line", "second line", "third"]


def test_reader_resumes_at_offset_and_reports_truncation(tmp_path):
    (tmp_path / "t.txt").write_text("".join(f"line {i} " + "x" * 600 + "\n" for i in range(20)))
    write_shards(from_text_files([tmp_path / "t.txt"], WriteReport("text")), tmp_path / "out", "text")
    shard = tmp_path / "out" / "shard-000000.tar"
    tail = [s["txt"].decode()[:7] for _, s in iter_tar_samples(shard, start=17)]
    assert tail == ["line 17", "line 18", "line 19"]
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(TruncatedShard, match="cut.tar"):
        for offset, _ in iter_tar_samples(cut):
            seen.append(offset)
    assert 5 <= len(seen) < 20 and seen == list(range(len(seen)))
    with tarfile.open(shard) as tar:  # plain tar, WebDataset naming
        assert tar.getnames()[0] == "000000000.txt"


def test_cli(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a\nb\nc\n")
    assert (
        cli.main(
            ["shards", "--from", "text", "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")]
        )
        == 0
    )
    assert "wrote 3 text samples in 1 shards" in capsys.readouterr().out
    assert cli.main(["shards", "--from", "coco", "--out", str(tmp_path / "o2")]) == 2
    assert "--captions and --images" in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    assert (
        cli.main(["shards", "--from", "coco", "--captions", str(missing), "--images", ".", "--out", "x"]) == 1
    )
    assert "nope.json" in capsys.readouterr().err
