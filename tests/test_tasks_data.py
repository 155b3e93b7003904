"""Readers of the published dataset formats: vocabularies, soft targets, paths, splits, malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mdm.tasks import RecordError, TaskConfig, TaskDataConfig, build_task
from mdm.tasks.common import build_transform, collate, load_image
from mdm.tasks.fixtures import HashTokenizer, write_image_folder, write_karpathy, write_nlvr2, write_vqav2
from mdm.tasks.vqav2_data import build_answer_vocab

TOK = HashTokenizer(512)


def data_cfg(root: Path, **kw) -> TaskDataConfig:
    return TaskDataConfig(root=str(root), image_size=32, num_workers=0, **kw)


def _rewrite(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------------------------- VQAv2
def _vqa_root(tmp_path: Path) -> Path:
    root = tmp_path / "vqa"
    write_vqav2(root, {"train2014": 4, "val2014": 3, "test-dev2015": 2}, questions_per_image=2)
    return root


def test_answer_vocab_counts_normalised_answers_in_first_seen_order(tmp_path):
    root = tmp_path
    anns = [
        {"question_id": i, "multiple_choice_answer": a, "answers": []}
        for i, a in enumerate(["Two", "dog", "2", "cat", "dog.", "two", "bird"])
    ]
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": anns[:4]}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns[4:]}))
    # normalised: 2, dog, 2, cat, dog, 2, bird -> counts 2:3, dog:2, cat:1, bird:1
    assert build_answer_vocab(root, 2) == ["2", "dog"]
    assert build_answer_vocab(root, 1) == ["2", "dog", "cat", "bird"]
    with pytest.raises(ValueError, match="answer_min_count"):
        build_answer_vocab(root, 4)


def test_vqa_soft_targets_from_raw_answer_counts(tmp_path):
    root = _vqa_root(tmp_path)
    raw = ["red"] * 3 + ["blue"] * 2 + ["Red"] + ["green"] * 4  # "Red" is not a vocabulary string
    qfile = root / "v2_mscoco_train2014_annotations.json"
    _rewrite(
        qfile,
        lambda o: o["annotations"][0].update(
            answers=[{"answer": a, "answer_id": i} for i, a in enumerate(raw)]
        ),
    )
    task = build_task(
        TaskConfig(name="vqav2"), data_cfg(root, answer_min_count=1, train_splits=["train2014"])
    )
    ds = task.build_dataset("train", TOK)
    item = ds[[r.question_id for r in ds.records].index(1)]
    want = torch.zeros(len(task.answers))
    for answer, score in {"red": 0.9, "blue": 0.6, "green": 1.0}.items():  # 3 -> 0.9, 2 -> 0.6, >=4 -> 1.0
        want[task.answers.index(answer)] = score
    assert torch.equal(item["targets"], want)
    assert item["image"].shape == (3, 32, 32) and item["text"][0] == TOK.bos_id


def test_vqa_splits_holdout_and_test_images(tmp_path):
    root = _vqa_root(tmp_path)
    task = build_task(TaskConfig(name="vqav2"), data_cfg(root, answer_min_count=1, val_holdout_images=1))
    rest, trainable = task.build_dataset("val2014:rest", TOK), task.build_dataset("val2014:trainable", TOK)
    images = lambda ds: {r.image for r in ds.records}  # noqa: E731
    assert len(images(rest)) == 1 and len(images(trainable)) == 2 and not images(rest) & images(trainable)
    assert len(task.build_dataset("train", TOK)) == 8 + 4  # train2014 + val2014:trainable, 2 questions each
    test = task.build_dataset("test", TOK)  # test-dev2015 questions, images in test2015/
    assert all("/test2015/COCO_test2015_" in r.image for r in test.records)
    assert "targets" not in test[0] and not test.annotated


def test_vqa_malformed_records_are_skipped_and_counted(tmp_path):
    root = _vqa_root(tmp_path)
    qs = json.loads((root / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    missing = Path(root / "train2014" / f"COCO_train2014_{qs[0]['image_id']:012d}.jpg")
    missing.unlink()  # a question whose image is missing (2 questions use it)
    afile = root / "v2_mscoco_train2014_annotations.json"
    _rewrite(
        afile, lambda o: o["annotations"].append(dict(o["annotations"][-1], question_id=777))
    )  # unknown id
    data = data_cfg(root, answer_min_count=1, train_splits=["train2014"])
    ds = build_task(TaskConfig(name="vqav2"), data).build_dataset("train", TOK)
    assert ds.problems.as_dict() == {"missing_image": 2, "unknown_question": 1}
    assert len(ds) == 8 - 2
    batch = next(iter(DataLoader(ds, batch_size=6, collate_fn=collate, num_workers=1)))  # no worker crash
    assert batch["image"].shape[0] == 6

    data.on_error = "error"  # stop at the first problem, naming the record
    with pytest.raises(RecordError, match=r"annotation 8 is for unknown question_id 777"):
        build_task(TaskConfig(name="vqav2"), data).build_dataset("train", TOK)
    _rewrite(afile, lambda o: o["annotations"].pop())
    with pytest.raises(
        RecordError, match=rf"question_id {qs[0]['question_id']}: image .*{missing.name} not found"
    ):
        build_task(TaskConfig(name="vqav2"), data).build_dataset("train", TOK)


def test_vqa_unknown_question_error_names_the_record(tmp_path):
    root = _vqa_root(tmp_path)
    _rewrite(
        root / "v2_mscoco_val2014_annotations.json", lambda o: o["annotations"][1].update(question_id=4242)
    )
    data = data_cfg(root, answer_min_count=1, on_error="error")
    with pytest.raises(RecordError, match=r"annotation 1 is for unknown question_id 4242"):
        build_task(TaskConfig(name="vqav2"), data).build_dataset("val2014", TOK)


# ----------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_paths_labels_and_missing_images(tmp_path):
    root = tmp_path / "nlvr2"
    rows = write_nlvr2(root, {"train": 5, "dev": 3})
    task = build_task(TaskConfig(name="nlvr2"), data_cfg(root))
    train = task.build_dataset("train", TOK)
    r0 = train.records[0]
    assert r0.image.endswith("images/train/0/train-0-0-img0.png") and r0.image2.endswith("train-0-0-img1.png")
    assert [r.label for r in train.records] == [int(x["label"] == "True") for x in rows["train"]]
    item = train[0]
    assert set(item) == {"image", "image2", "text", "text_padding_mask", "labels", "identifier"}

    (root / "dev" / "dev-1-0-img1.png").unlink()
    with open(root / "dev.json", "a") as f:
        f.write(json.dumps({"identifier": "dev-9-0-0", "sentence": "x"}) + "\n")  # no label
    dev = task.build_dataset("val", TOK)
    assert dev.problems.as_dict() == {"missing_image": 1, "bad_record": 1} and len(dev) == 2
    task.data.on_error = "error"
    with pytest.raises(RecordError, match=r"dev\.json:2 \(dev-1-0-0\): image .*dev-1-0-img1\.png not found"):
        task.build_dataset("val", TOK)


def test_nlvr2_invalid_json_line_names_file_and_line(tmp_path):
    root = tmp_path / "nlvr2"
    write_nlvr2(root, {"dev": 2})
    with open(root / "dev.json", "a") as f:
        f.write("{not json\n")
    with pytest.raises(RecordError, match=r"dev\.json:3: not valid JSON"):
        build_task(TaskConfig(name="nlvr2"), data_cfg(root)).build_dataset("val", TOK)


# ------------------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_splits_and_image_paths(tmp_path, dataset):
    content = write_karpathy(tmp_path, {"train": 2, "restval": 1, "val": 2, "test": 3}, dataset=dataset)
    data = data_cfg(tmp_path, karpathy_file=f"dataset_{dataset}.json")
    task = build_task(TaskConfig(name="retrieval"), data)
    train = task.build_dataset("train", TOK)  # train + restval, one item per caption
    assert len(train) == 3 * 2 and train[0]["image_id"] == 0
    folder = "val2014" if dataset == "coco" else "flickr30k-images"
    assert train.images[0].path == str(tmp_path / folder / content["images"][0]["filename"])
    test = task.build_dataset("test", TOK)
    assert len(test.images) == 3 and len(test.captions) == 6
    assert test.text_image.tolist() == [0, 0, 1, 1, 2, 2]
    batch = task.collate([test[0], test[4], test[5]])  # one image and two captions
    assert (
        batch["image"].shape[0] == 1
        and batch["text"].shape[0] == 2
        and batch["text_index"].tolist() == [1, 2]
    )


def test_karpathy_missing_image_is_counted(tmp_path):
    content = write_karpathy(tmp_path, {"val": 3})
    (tmp_path / "val2014" / content["images"][1]["filename"]).unlink()
    ds = build_task(TaskConfig(name="retrieval"), data_cfg(tmp_path)).build_dataset("val", TOK)
    assert ds.problems.as_dict() == {"missing_image": 1} and len(ds.images) == 2


# -------------------------------------------------------------------------------------- classification
def test_image_folders_classes_and_unknown_class(tmp_path):
    write_image_folder(tmp_path, {"train": 2, "val": 1}, classes=("yellow", "blue"))
    (tmp_path / "val" / "zebra").mkdir()
    task = build_task(TaskConfig(name="classification"), data_cfg(tmp_path))
    assert task.classes == ["blue", "yellow"]  # sorted folder names
    val = task.build_dataset("val")
    assert val.problems.as_dict() == {"unknown_class": 1}
    assert [y for _, y in val.items] == [0, 1]


# ------------------------------------------------------------------------------------- images & batches
def test_images_are_rgb_and_transforms_have_the_right_statistics(tmp_path):
    grey, rgba = tmp_path / "g.png", tmp_path / "a.png"
    Image.new("L", (20, 30), 255).save(grey)
    Image.new("RGBA", (20, 30), (0, 0, 0, 0)).save(rgba)
    assert load_image(grey).mode == "RGB" and load_image(rgba).mode == "RGB"
    x = build_transform(TaskDataConfig(image_size=16), train=False)(load_image(grey))
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    aug = build_transform(TaskDataConfig(image_size=16, randaug=True), train=True)
    assert aug(load_image(grey)).shape == (3, 16, 16)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(RecordError, match="bad.jpg: cannot read image"):
        load_image(bad)


def test_collate_trims_common_padding():
    ids, pad = TOK.encode(["a b", "a b c d"], 10)
    batch = collate(
        [
            {"text": ids[0], "text_padding_mask": pad[0], "n": 1, "s": "x"},
            {"text": ids[1], "text_padding_mask": pad[1], "n": 2, "s": "y"},
        ]
    )
    assert (
        batch["text"].shape == (2, 6) and batch["text_padding_mask"][0].tolist() == [False] * 4 + [True] * 2
    )
    assert batch["n"].dtype == torch.long and batch["s"] == ["x", "y"]
