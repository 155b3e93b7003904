"""The demo world: deterministic scenes, renders that show what the language says, correct VQA answers and
NLVR2 labels (checked by an independent parser), and files that the fine-tuning readers accept."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace

import numpy as np

from mdm.data.demo import language as L
from mdm.data.demo.scenes import COLOURS, make_scenes, render

SCENES = make_scenes(400, 0, "test")
WORD = {w: i for i, w in enumerate(L.NUMBER_WORDS)}


def test_scenes_are_deterministic_and_valid():
    assert make_scenes(5, 0, "test") == SCENES[:5]  # scene i does not depend on how many are drawn
    assert make_scenes(5, 1, "test") != SCENES[:5] and make_scenes(5, 0, "other") != SCENES[:5]
    for s in SCENES:
        assert 1 <= len(s.objects) <= 3
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)
        assert len({o.name for o in s.objects}) == len(s.objects)
    assert Counter(len(s.objects) for s in SCENES).keys() == {1, 2, 3}
    assert render(SCENES[0]).tobytes() == render(SCENES[0]).tobytes()


def test_render_puts_each_colour_where_the_scene_says():
    plain = [s for s in SCENES if s.noise == 0][:60]
    for s in plain:
        arr = np.asarray(render(s, 96), dtype=np.int32)
        assert arr.shape == (96, 96, 3)
        for o in s.objects:
            y, x = int((o.row + 0.5 + o.dy) * 32), int((o.col + 0.5 + o.dx) * 32)
            assert np.abs(arr[y, x] - np.array(COLOURS[o.colour])).max() < 30, (s, o)


def _singular(word: str) -> str:
    return word[:-2] if word.endswith("sses") else word[:-1]


def oracle_answer(q: str, scene) -> str:
    """Answers a demo question from the scene's objects without using the question templates' code."""
    by_name = {o.name: o for o in scene.objects}
    if m := re.fullmatch(r"how many shapes are there\?", q):
        return str(len(scene.objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
        return str(sum(o.colour == m[1] for o in scene.objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(sum(o.shape == _singular(m[1]) for o in scene.objects))
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        return next(o.colour for o in scene.objects if o.shape == m[1])
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        return next(o.shape for o in scene.objects if o.colour == m[1])
    if m := re.fullmatch(r"where is the (\w+ \w+)\?", q):
        return by_name[m[1]].position
    if m := re.fullmatch(r"is the (\w+ \w+) large or small\?", q):
        return by_name[m[1]].size
    if m := re.fullmatch(r"is there an? (\w+ \w+)\?", q):
        return "yes" if m[1] in by_name else "no"
    if m := re.fullmatch(r"is the (\w+ \w+) on the (left|right)\?", q):
        return "yes" if by_name[m[1]].col == (0 if m[2] == "left" else 2) else "no"
    raise AssertionError(f"unexpected question {q!r}")


def test_vqa_answers_are_correct_and_yes_no_balanced():
    answers = Counter()
    for s in SCENES:
        for q, a, atype in L.vqa(s):
            assert oracle_answer(q, s) == a, (q, s)
            assert atype == ("number" if a.isdigit() else "yes/no" if a in ("yes", "no") else "other")
            answers[a] += 1
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6
    qs = L.questions(SCENES[0], 3, random.Random(0))
    assert len({q.text for q in qs}) == 3 and all(q.text.startswith(q.question_type) for q in qs)


def _contains(scene, colour=None, shape=None, size=None) -> bool:
    return any(
        (colour is None or o.colour == colour)
        and (shape is None or o.shape == shape)
        and (size is None or o.size == size)
        for o in scene.objects
    )


def oracle_label(text: str, a, b) -> bool:
    """Evaluates a demo NLVR2 statement on the (left, right) pair."""
    side = {"left": a, "right": b}
    sizes = ("small", "large")
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", text):
        s = side[m[1]]
        return _contains(s, size=m[2], shape=m[3]) if m[2] in sizes else _contains(s, m[2], m[3])
    if m := re.fullmatch(r"both images contain an? (\w+)", text):
        return _contains(a, shape=m[1]) and _contains(b, shape=m[1])
    if m := re.fullmatch(r"both images contain exactly (\w+) shapes?", text):
        return len(a.objects) == len(b.objects) == WORD[m[1]]
    if m := re.fullmatch(r"there are more shapes in the (left|right) image", text):
        other = b if m[1] == "left" else a
        return len(side[m[1]].objects) > len(other.objects)
    if m := re.fullmatch(r"exactly one image contains an? (\w+)", text):
        return _contains(a, shape=m[1]) != _contains(b, shape=m[1])
    if m := re.fullmatch(r"there (?:is|are) (\w+) (\w+) shapes? in total", text):
        return sum(o.colour == m[2] for o in a.objects + b.objects) == WORD[m[1]]
    if m := re.fullmatch(r"neither image contains an? (\w+) (\w+)", text):
        return not _contains(a, m[1], m[2]) and not _contains(b, m[1], m[2])
    raise AssertionError(f"unexpected statement {text!r}")


def test_nlvr2_labels_are_correct_and_balanced():
    rng, labels, kinds = random.Random(0), [], Counter()
    for a, b in zip(SCENES[::2], SCENES[1::2]):
        for _ in range(5):
            text, label = L.nlvr2(a, b, rng)
            assert oracle_label(text, a, b) == label, (text, a, b)
            labels.append(label)
            kinds[text.split()[0] + text.split()[1]] += 1
        pair = L.statements(a, b, rng)
        assert sorted(s.label for s in pair) == [False, True]
        assert all(oracle_label(s.text, a, b) == s.label for s in pair)
    assert 0.45 < np.mean(labels) < 0.55
    assert len(kinds) >= 6  # many kinds of statements, not one template


def test_captions_mention_what_the_tasks_ask_about():
    for s in SCENES[:100]:
        caps = L.captions(s)
        assert len(caps) >= 5 and len(set(caps)) == len(caps)
        for o in s.objects:
            assert o.full_name in caps[0] and o.name in caps[4]
        assert L.NUMBER_WORDS[len(s.objects)] in caps[1]
        assert L.captions(s, 5, random.Random(1)) == L.captions(s, 5, random.Random(1))
        assert len(L.captions(s, 9, random.Random(1))) == 9


def test_annotator_answers_need_normalisation():
    from mdm.tasks.vqa_eval import normalize_answer

    rng = random.Random(0)
    raw_hits = norm_hits = 0
    for s in SCENES[:200]:
        for _, a, atype in L.vqa(s):
            answers = [x for x, _ in L.annotator_answers(a, atype, rng)]
            assert len(answers) == 10
            raw_hits += answers.count(a)
            norm_hits += sum(normalize_answer(x) == a for x in answers)
    total = 10 * sum(len(L.vqa(s)) for s in SCENES[:200])
    assert 0.65 < raw_hits / total < 0.85 and norm_hits > raw_hits + 0.03 * total


def test_written_world_is_read_by_the_task_readers(tmp_path):
    from mdm.data.demo import QUICK, write_demo_dataset
    from mdm.data.shards import WriteReport, from_coco_captions
    from mdm.tasks.common import Problems
    from mdm.tasks.nlvr2 import read_nlvr2_split
    from mdm.tasks.vqav2_data import build_answer_vocab

    sizes = replace(
        QUICK, pretrain_pairs=8, pretrain_images=4, corpus_scenes=5, vqa_train=6, vqa_val=4,
        nlvr2_train=6, nlvr2_dev=4, retrieval_train=4, retrieval_val=2, retrieval_test=2,
    )  # fmt: skip
    manifest = write_demo_dataset(tmp_path / "a", sizes, seed=3)
    assert manifest == write_demo_dataset(tmp_path / "b", sizes, seed=3)
    for rel in ("nlvr2/train.json", "vqav2/v2_mscoco_train2014_annotations.json", "corpus.txt"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    problems = Problems("nlvr2")
    records = read_nlvr2_split(tmp_path / "a" / "nlvr2", "train", problems)
    assert len(records) == 12 and not problems.counts
    assert sorted(r.label for r in records) == [0] * 6 + [1] * 6
    assert build_answer_vocab(tmp_path / "a" / "vqav2", 1)
    report = WriteReport("pair")
    pairs = list(
        from_coco_captions(
            tmp_path / "a" / "pretrain" / "captions_train2014.json",
            tmp_path / "a" / "pretrain" / "train2014",
            report,
        )
    )
    assert len(pairs) == 8 and not report.skipped
