"""VQAv2 read straight from the published files (Goyal et al. 2017, https://visualqa.org/download.html).

Layout under ``data.root`` (JSON files may also sit in ``annotations/``)::

    v2_OpenEnded_mscoco_<split>_questions.json      {"questions": [{"image_id", "question", "question_id"}]}
    v2_mscoco_<split>_annotations.json              {"annotations": [{"question_id", "image_id",
                                                      "multiple_choice_answer", "answers": [10 × {"answer",
                                                      "answer_confidence", "answer_id"}], "answer_type", ...}]}
    <image split>/COCO_<image split>_<image_id:012d>.jpg

``<split>`` is ``train2014``, ``val2014``, ``test2015`` or ``test-dev2015`` (whose images are in
``test2015``). ``val2014:rest`` / ``val2014:trainable`` are ViLT's split of val2014 by image (1000 held-out
images for validation, the rest added to training), as unilm/beit3 does.

Answer vocabulary and soft targets follow unilm/beit3 ``VQAv2Dataset.make_dataset_index`` (from ViLT):
``multiple_choice_answer`` of train2014 + val2014, normalised (:func:`~mdm.tasks.vqa_eval.normalize_answer`),
kept when seen ≥ ``answer_min_count`` times, in order of first appearance; a question's target for an
answer given by k of its annotators (raw strings, as the reference) is 0.3·k capped at 1.0 (0, 0.3, 0.6,
0.9, 1.0), answers outside the vocabulary are dropped, and training drops questions left without any.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
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
from mdm.tasks.vqa_eval import normalize_answer

log = logging.getLogger(__name__)

QUESTIONS = "v2_OpenEnded_mscoco_{}_questions.json"
ANNOTATIONS = "v2_mscoco_{}_annotations.json"
IMAGE_SPLIT = {"test-dev2015": "test2015"}
ANNOTATED = ("train2014", "val2014")


def image_path(root: Path, split: str, image_id: int) -> Path:
    """``root/<image split>/COCO_<image split>_<id:012d>.jpg``."""
    folder = IMAGE_SPLIT.get(split, split)
    return root / folder / f"COCO_{folder}_{int(image_id):012d}.jpg"


def soft_score(count: int) -> float:
    """ViLT / unilm target for an answer given by ``count`` of the annotators."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def load_annotations(root: Path, split: str) -> list[dict[str, Any]]:
    """The ``annotations`` list of ``v2_mscoco_<split>_annotations.json``."""
    path = find_file(root, ANNOTATIONS.format(split))
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected an object with an 'annotations' list")
    return data["annotations"]


def build_answer_vocab(root: Path, min_count: int) -> list[str]:
    """Answers (normalised ``multiple_choice_answer``) seen ≥ ``min_count`` times over train+val2014."""
    counts: Counter[str] = Counter()  # insertion order = first appearance, as unilm's answer2label
    for split in ANNOTATED:
        try:
            anns = load_annotations(root, split)
        except FileNotFoundError:
            log.warning("answer vocabulary: %s annotations not found under %s; using the others", split, root)
            continue
        for i, a in enumerate(anns):
            if "multiple_choice_answer" not in a:
                raise ValueError(
                    f"{ANNOTATIONS.format(split)}: annotation {i} has no 'multiple_choice_answer'"
                )
            counts[normalize_answer(str(a["multiple_choice_answer"]))] += 1
    vocab = [a for a, n in counts.items() if n >= min_count]
    if not vocab:
        raise ValueError(f"{root}: no answer is seen {min_count} times; lower data.answer_min_count")
    log.info("VQA answer vocabulary: %d answers seen >= %d times", len(vocab), min_count)
    return vocab


@dataclass
class VQARecord:
    """One question: ids, image file, text, sparse soft targets and (for scoring) the human answers."""

    question_id: int
    image: str
    question: str
    labels: list[int]
    scores: list[float]
    answers: tuple[str, ...] | None
    answer_type: str | None


def _holdout_images(root: Path, split: str, image_ids: set[int], data: TaskDataConfig) -> set[int]:
    ordered = sorted(image_ids)
    random.Random(data.holdout_seed).shuffle(ordered)
    rest = set(ordered[: data.val_holdout_images])
    log.info("%s: %d of %d images held out as :rest", split, len(rest), len(ordered))
    return rest


def _targets(ann: dict, answer_to_label: dict[str, int]) -> tuple[list[int], list[float]]:
    counts = Counter(str(a.get("answer", "")) for a in ann["answers"])
    labels, scores = [], []
    for answer, n in counts.items():
        if answer in answer_to_label:
            labels.append(answer_to_label[answer])
            scores.append(soft_score(n))
    return labels, scores


def _index_annotations(root: Path, split: str, qids: set[int], problems: Problems) -> dict[int, dict]:
    anns: dict[int, dict] = {}
    name = ANNOTATIONS.format(split)
    for i, a in enumerate(load_annotations(root, split)):
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
            problems.add("bad_annotation", f"{name}: annotation {i} lacks 'question_id' or an 'answers' list")
        elif a["question_id"] not in qids:
            problems.add(
                "unknown_question", f"{name}: annotation {i} is for unknown question_id {a['question_id']}"
            )
        else:
            anns[a["question_id"]] = a
    return anns


def _read_questions(root: Path, split: str, problems: Problems) -> list[dict[str, Any]]:
    qfile = QUESTIONS.format(split)
    qdata = read_json(find_file(root, qfile))
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{qfile}: expected an object with a 'questions' list")
    questions = []
    for i, q in enumerate(qdata["questions"]):
        if isinstance(q, dict) and {"question_id", "image_id", "question"} <= set(q):
            questions.append(q)
        else:
            problems.add("bad_question", f"{qfile}: question {i} lacks question_id/image_id/question")
    return questions


def read_vqa_split(
    root: Path,
    spec: str,
    data: TaskDataConfig,
    answer_to_label: dict[str, int],
    train: bool,
    problems: Problems,
) -> list[VQARecord]:
    """Records of one split spec (``train2014``, ``val2014:rest``, ``test-dev2015``...)."""
    split, _, part = spec.partition(":")
    if part not in ("", "rest", "trainable") or (part and split not in ANNOTATED):
        raise ValueError(f"unknown VQAv2 split {spec!r} (use e.g. train2014, val2014:rest, test-dev2015)")
    questions = _read_questions(root, split, problems)
    anns = (
        _index_annotations(root, split, {q["question_id"] for q in questions}, problems)
        if split in ANNOTATED
        else None
    )
    keep_images = None
    if part:
        rest = _holdout_images(root, split, {q["image_id"] for q in questions}, data)
        keep_images = rest if part == "rest" else {q["image_id"] for q in questions} - rest
    records, seen_images, unlabeled = [], {}, 0
    for q in questions:
        qid, iid = q["question_id"], q["image_id"]
        if keep_images is not None and iid not in keep_images:
            continue
        path = image_path(root, split, iid)
        if iid not in seen_images:
            seen_images[iid] = path.is_file()
        if not seen_images[iid]:
            problems.add("missing_image", f"question_id {qid}: image {path} not found")
            continue
        labels, scores, answers, atype = [], [], None, None
        if anns is not None:
            ann = anns.get(qid)
            if ann is None:
                problems.add(
                    "unannotated_question",
                    f"question_id {qid} has no annotation in {ANNOTATIONS.format(split)}",
                )
                continue
            labels, scores = _targets(ann, answer_to_label)
            answers = tuple(str(a.get("answer", "")) for a in ann["answers"])
            atype = ann.get("answer_type")
            if train and not labels:
                unlabeled += 1  # ViLT/unilm: no answer in the vocabulary → not trained on
                continue
        records.append(VQARecord(qid, str(path), str(q["question"]), labels, scores, answers, atype))
    if unlabeled:
        log.info("%s: %d questions have no answer in the vocabulary and are not trained on", spec, unlabeled)
    return records


class VQADataset(Dataset):
    """Map-style VQAv2 dataset; items have ``image``, ``text``, ``text_padding_mask``, ``question_id`` and,
    for annotated splits, dense soft ``targets`` (num_answers,).

    Args:
        records: from :func:`read_vqa_split`.
        num_answers: size of the answer vocabulary.
        tokenizer: text tokenizer.
        data: data config (image size, text length, augmentation).
        train: training transform.
        problems: what was skipped while reading (kept for reporting and tests).
    """

    def __init__(
        self,
        records: list[VQARecord],
        num_answers: int,
        tokenizer: TextTokenizer,
        data: TaskDataConfig,
        train: bool,
        problems: Problems,
    ) -> None:
        self.records = records
        self.num_answers = num_answers
        self.tokenizer = tokenizer
        self.max_text_len = data.max_text_len
        self.transform = build_transform(data, train)
        self.problems = problems
        self.annotated = all(r.answers is not None for r in records) and bool(records)
        self._by_qid = {r.question_id: r for r in records}

    def __len__(self) -> int:
        return len(self.records)

    def record(self, question_id: int) -> VQARecord:
        return self._by_qid[question_id]

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        text, pad = encode_text(self.tokenizer, r.question, self.max_text_len)
        item: dict[str, Any] = {
            "image": self.transform(load_image(r.image)),
            "text": text,
            "text_padding_mask": pad,
            "question_id": int(r.question_id),
        }
        if self.annotated:
            target = torch.zeros(self.num_answers)
            target[r.labels] = torch.tensor(r.scores, dtype=torch.float32)
            item["targets"] = target
        return item
