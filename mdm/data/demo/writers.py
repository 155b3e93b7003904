"""Writes the demo world to disk in the formats the real recipes read.

Layout under ``root`` (each part in its dataset's published format, see ``docs/finetune.md``)::

    pretrain/captions_train2014.json   COCO captions: {"images": [{id, file_name}], "annotations": [...]}
    pretrain/train2014/COCO_train2014_<id:012d>.jpg
    pretrain/images/<k>.png            image-only pretraining images (``mdm data shards --from folder``)
    corpus.txt                         text-only corpus, one sentence per line
    vqav2/ ...                         VQAv2: questions/annotations JSON + COCO_<split>_<id>.jpg
    nlvr2/ ...                         NLVR2: {train,dev,test1}.json + images/train/<dir>/..-img0.png
    retrieval/ ...                     Karpathy: dataset_coco.json + val2014/COCO_val2014_<id>.jpg
                                       (captions that identify their image, see DemoSizes.retrieval_captions)

Every family of scenes comes from its own tag (:func:`~mdm.data.demo.scenes.make_scenes`), so the
pretraining, fine-tuning and evaluation images never overlap, and each text from an RNG seeded by the
tag and index, so any subset is identical whatever the sizes of the others.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mdm.data.demo import language as L
from mdm.data.demo.identifying import Description, distinct_scenes, identifying_captions
from mdm.data.demo.scenes import Scene, make_scenes, render

__all__ = ["DemoSizes", "QUICK", "FULL", "RETRIEVAL_CAPTIONS", "write_demo_dataset"]

log = logging.getLogger(__name__)
HUMANS = 10  # VQAv2 has ten answers per question


@dataclass(frozen=True)
class DemoSizes:
    """How much of each part to write.

    Attributes:
        image_size: side of every rendered image.
        pretrain_pairs: captioned pretraining images (5 captions each).
        pretrain_images: extra image-only pretraining images.
        corpus_scenes: scenes described by the text-only corpus (~5 sentences each).
        vqa_train / vqa_val: VQAv2 images (``questions_per_image`` questions each).
        questions_per_image: VQA questions per image.
        nlvr2_train / nlvr2_dev: NLVR2 image pairs (one true and one false sentence each).
        retrieval_train / retrieval_val / retrieval_test: Karpathy images (``captions_per_image`` each).
        captions_per_image: captions per retrieval/pretraining image.
        retrieval_captions: ``"identifying"``: every retrieval caption names every object with size,
            colour, shape and position, and no two retrieval images (of any split) share that
            description (:mod:`mdm.data.demo.identifying`); ``"paraphrases"``: the pretraining captions'
            paraphrases, some true of many scenes, on scenes drawn independently. Pretraining captions are
            the paraphrases either way.
    """

    image_size: int = 48
    pretrain_pairs: int = 4000
    pretrain_images: int = 2000
    corpus_scenes: int = 3000
    vqa_train: int = 300
    vqa_val: int = 200
    questions_per_image: int = 3
    nlvr2_train: int = 300
    nlvr2_dev: int = 200
    retrieval_train: int = 300
    retrieval_val: int = 100
    retrieval_test: int = 100
    captions_per_image: int = 5
    retrieval_captions: str = "identifying"


RETRIEVAL_CAPTIONS = ("identifying", "paraphrases")
FULL = DemoSizes()
QUICK = DemoSizes(
    pretrain_pairs=400,
    pretrain_images=200,
    corpus_scenes=300,
    vqa_train=60,
    vqa_val=40,
    nlvr2_train=60,
    nlvr2_dev=40,
    retrieval_train=60,
    retrieval_val=30,
    retrieval_test=20,
)


def _rng(seed: int, tag: str, i: int) -> random.Random:
    return random.Random(f"mdm-demo-text:{seed}:{tag}:{i}")


def _save(scene: Scene, path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = render(scene, size)
    if path.suffix == ".jpg":
        img.save(path, quality=95, subsampling=0)  # 4:4:4 keeps the colours of small shapes apart
    else:
        img.save(path)


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) + "\n")


def write_pretraining(root: Path, sizes: DemoSizes, seed: int) -> dict[str, int]:
    """COCO-style captioned images, image-only images and the text corpus."""
    images, anns = [], []
    for k, scene in enumerate(make_scenes(sizes.pretrain_pairs, seed, "pretrain-pairs")):
        image_id = k + 1
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _save(scene, root / "pretrain" / "train2014" / name, sizes.image_size)
        images.append(
            {"id": image_id, "file_name": name, "width": sizes.image_size, "height": sizes.image_size}
        )
        for text in L.captions(scene, sizes.captions_per_image, _rng(seed, "pretrain-pairs", k)):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": text})
    _dump(root / "pretrain" / "captions_train2014.json", {"images": images, "annotations": anns})
    for k, scene in enumerate(make_scenes(sizes.pretrain_images, seed, "pretrain-images")):
        _save(scene, root / "pretrain" / "images" / f"{k:06d}.png", sizes.image_size)
    lines = []
    for k, scene in enumerate(make_scenes(sizes.corpus_scenes, seed, "corpus")):
        lines += L.corpus_sentences(scene, _rng(seed, "corpus", k))
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    return {
        "pairs": len(images),
        "captions": len(anns),
        "images": sizes.pretrain_images,
        "sentences": len(lines),
    }


def write_vqav2(root: Path, sizes: DemoSizes, seed: int) -> dict[str, int]:
    """VQAv2 questions + annotations for ``train2014`` and ``val2014`` (ten simulated annotators each)."""
    counts, qid = {}, 1
    for split, n in (("train2014", sizes.vqa_train), ("val2014", sizes.vqa_val)):
        questions, annotations = [], []
        for k, scene in enumerate(make_scenes(n, seed, f"vqav2-{split}")):
            image_id = k + 1
            _save(scene, root / split / f"COCO_{split}_{image_id:012d}.jpg", sizes.image_size)
            for q in L.questions(scene, sizes.questions_per_image, _rng(seed, f"vqav2-{split}", k)):
                questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
                humans = L.annotator_answers(
                    q.answer, q.answer_type, _rng(seed, f"humans-{split}", qid), HUMANS
                )
                answers = [
                    {"answer": a, "answer_confidence": c, "answer_id": i + 1}
                    for i, (a, c) in enumerate(humans)
                ]
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": image_id,
                        "question_type": q.question_type,
                        "answer_type": q.answer_type,
                        "multiple_choice_answer": q.answer,
                        "answers": answers,
                    }
                )
                qid += 1
        meta = {"data_subtype": split, "data_type": "mscoco", "license": {}, "info": {"mdm": "demo"}}
        _dump(root / f"v2_OpenEnded_mscoco_{split}_questions.json", {**meta, "questions": questions})
        _dump(root / f"v2_mscoco_{split}_annotations.json", {**meta, "annotations": annotations})
        counts[split] = len(questions)
    return counts


def write_nlvr2(root: Path, sizes: DemoSizes, seed: int) -> dict[str, int]:
    """NLVR2 JSON lines (one true and one false sentence per image pair) and the image pairs."""
    counts = {}
    for split, n in (("train", sizes.nlvr2_train), ("dev", sizes.nlvr2_dev)):
        scenes = make_scenes(2 * n, seed, f"nlvr2-{split}")
        rows = []
        for k in range(n):
            left, right = scenes[2 * k], scenes[2 * k + 1]
            stem = f"{split}-{k}-0"
            folder = root / "images" / "train" / str(k % 10) if split == "train" else root / split
            _save(left, folder / f"{stem}-img0.png", sizes.image_size)
            _save(right, folder / f"{stem}-img1.png", sizes.image_size)
            for j, s in enumerate(L.statements(left, right, _rng(seed, f"nlvr2-{split}", k))):
                row = {"identifier": f"{stem}-{j}", "sentence": s.text, "label": str(s.label)}
                if split == "train":
                    row["directory"] = k % 10
                rows.append(row)
        (root / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    return counts


def write_karpathy(root: Path, sizes: DemoSizes, seed: int) -> dict[str, int]:
    """``dataset_coco.json`` (Karpathy splits) with images under ``val2014/``.

    With ``sizes.retrieval_captions == "identifying"`` the splits are drawn in the order train, val,
    test, and a scene whose description an earlier scene of any split has is redrawn; so train does not
    depend on the sizes of val and test, and no val or test caption is also a training caption.
    """
    if sizes.retrieval_captions not in RETRIEVAL_CAPTIONS:
        raise ValueError(
            f"DemoSizes.retrieval_captions must be one of {RETRIEVAL_CAPTIONS}, got {sizes.retrieval_captions!r}"
        )
    identifying = sizes.retrieval_captions == "identifying"
    taken: set[Description] = set()
    items, counts = [], {}
    for split, n in (
        ("train", sizes.retrieval_train),
        ("val", sizes.retrieval_val),
        ("test", sizes.retrieval_test),
    ):
        tag = f"retrieval-{split}"
        scenes = distinct_scenes(n, seed, tag, taken) if identifying else make_scenes(n, seed, tag)
        for k, scene in enumerate(scenes):
            cocoid = len(items) + 1
            name = f"COCO_val2014_{cocoid:012d}.jpg"
            _save(scene, root / "val2014" / name, sizes.image_size)
            caption = identifying_captions if identifying else L.captions
            texts = caption(scene, sizes.captions_per_image, _rng(seed, tag, k))
            sentences = [
                {"raw": t, "tokens": t.replace(",", "").replace(";", "").split(), "imgid": len(items)}
                for t in texts
            ]
            items.append(
                {
                    "filepath": "val2014",
                    "filename": name,
                    "imgid": len(items),
                    "split": split,
                    "sentences": sentences,
                    "cocoid": cocoid,
                }
            )
        counts[split] = n
    _dump(root / "dataset_coco.json", {"images": items, "dataset": "coco"})
    return counts


def write_demo_dataset(root: str | Path, sizes: DemoSizes = FULL, seed: int = 0) -> dict[str, Any]:
    """Writes every part of the demo world under ``root``; returns what was written (also ``manifest.json``).

    Args:
        root: output directory (created).
        sizes: how many images, captions, questions... to write.
        seed: the world's seed; the same seed writes the same bytes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "seed": seed,
        "sizes": asdict(sizes),
        "pretrain": write_pretraining(root, sizes, seed),
        "vqav2": write_vqav2(root / "vqav2", sizes, seed),
        "nlvr2": write_nlvr2(root / "nlvr2", sizes, seed),
        "retrieval": write_karpathy(root / "retrieval", sizes, seed),
    }
    _dump(root / "manifest.json", manifest)
    log.info("demo data in %s: %s", root, manifest)
    return manifest
