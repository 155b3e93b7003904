"""The identifying retrieval split of the demo world: every caption names every object (checked by a parser
independent of the templates), no two images share a description, and the files are a function of the
seed."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import replace

import pytest

from mdm.data.demo import QUICK
from mdm.data.demo import language as L
from mdm.data.demo.identifying import TEMPLATES, description, distinct_scenes, identifying_captions
from mdm.data.demo.scenes import COLOURS, SHAPES, make_scenes
from mdm.data.demo.writers import write_karpathy

SCENES = make_scenes(400, 0, "test")
_CELLS = {
    "at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2),
    "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom": (2, 1), "at the bottom right": (2, 2),
}  # fmt: skip
_WHERE = "(" + "|".join(sorted(_CELLS, key=len, reverse=True)) + ")"
_SIZE, _COLOUR, _SHAPE = "(small|large)", "(" + "|".join(COLOURS) + ")", "(" + "|".join(SHAPES) + ")"
_PATTERNS = (  # each yields (size, colour, shape, where) in some group order
    (re.compile(rf"an? {_SIZE} {_COLOUR} {_SHAPE} {_WHERE}"), (1, 2, 3, 4)),
    (re.compile(rf"the {_SIZE} {_COLOUR} {_SHAPE} is {_WHERE}"), (1, 2, 3, 4)),
    (re.compile(rf"{_WHERE} is an? {_SIZE} {_COLOUR} {_SHAPE}"), (2, 3, 4, 1)),
    (re.compile(rf"the {_COLOUR} {_SHAPE} {_WHERE} is {_SIZE}"), (4, 1, 2, 3)),
)


def parse(caption: str) -> frozenset:
    """The (size, colour, shape, row, col) of every object a caption names; fails on anything else."""
    text = re.sub(r"^(a picture of |\w+ shapes?: )", "", caption)
    objects = []
    for part in re.split(r", | and ", text):
        for pattern, order in _PATTERNS:
            if m := pattern.fullmatch(part):
                size, colour, shape, where = (m[g] for g in order)
                objects.append((size, colour, shape, *_CELLS[where]))
                break
        else:
            raise AssertionError(f"{caption!r}: cannot parse {part!r}")
    assert len(set(objects)) == len(objects), caption
    return frozenset(objects)


def test_every_caption_names_every_object_with_size_colour_shape_and_position():
    for s in SCENES:
        caps = identifying_captions(s, 5, random.Random(s.seed))
        assert len(caps) == 5 and len(set(caps)) == 5  # paraphrases, not copies
        for c in caps:
            assert parse(c) == description(s), (c, s)
            # every word is one piece of the demo tokenizer: 30 pieces + [bos] + [eos] = max_text_len 32
            assert len(re.findall(r"\w+|[,:]", c)) <= 30, c
        assert identifying_captions(s, 5, random.Random(s.seed)) == caps
    starts = Counter(c.split(" ")[0] for s in SCENES for c in identifying_captions(s, 5, random.Random(0)))
    assert len(starts) >= 5  # several sentence openings: "a", "the", "two", "at", "on", "in"
    three = next(s for s in SCENES if len(s.objects) == 3)
    caps = identifying_captions(three, 6, random.Random(1))
    assert len({_order(c, three.objects) for c in caps}) >= 3  # the object order varies within an image
    assert len(identifying_captions(three, 9, random.Random(0))) == 9 and len(TEMPLATES) == 6


def _order(caption: str, objects) -> tuple:
    return tuple(sorted(objects, key=lambda o: caption.index(o.name)))


def test_distinct_scenes_redraw_duplicates_and_keep_the_rest():
    taken: set = set()
    scenes = distinct_scenes(600, 0, "retrieval-train", taken)
    plain = make_scenes(600, 0, "retrieval-train")
    assert len({description(s) for s in scenes}) == 600 and len(taken) == 600
    assert len({description(s) for s in plain}) < 600  # the plain draw does repeat descriptions
    redrawn = sum(a != b for a, b in zip(scenes, plain))
    assert 0 < redrawn < 60
    assert all(a == b for a, b in zip(scenes, plain) if description(a) == description(b))
    assert distinct_scenes(300, 0, "retrieval-train", set()) == scenes[:300]  # a prefix, whatever n
    more = distinct_scenes(200, 0, "retrieval-val", taken)
    assert not {description(s) for s in more} & {description(s) for s in scenes}


def _sizes(**kw):
    return replace(QUICK, retrieval_train=150, retrieval_val=60, retrieval_test=60, **kw)


def _items(root):
    return json.loads((root / "dataset_coco.json").read_text())["images"]


def test_identifying_split_is_unique_across_splits_and_a_function_of_the_seed(tmp_path):
    assert QUICK.retrieval_captions == "identifying"
    write_karpathy(tmp_path / "a", _sizes(), seed=0)
    items = _items(tmp_path / "a")
    assert Counter(i["split"] for i in items) == {"train": 150, "val": 60, "test": 60}
    descriptions = []
    for item in items:
        parsed = {parse(s["raw"]) for s in item["sentences"]}
        assert len(parsed) == 1 and len(item["sentences"]) == 5  # all five captions say the same
        descriptions.append(parsed.pop())
    assert len(set(descriptions)) == len(items)  # no two images of any split share a description
    captions = [s["raw"] for i in items for s in i["sentences"]]
    assert len(set(captions)) == len(captions)  # so no caption is written for two images
    write_karpathy(tmp_path / "b", _sizes(), seed=0)
    for rel in (
        "dataset_coco.json",
        "val2014/COCO_val2014_000000000001.jpg",
        "val2014/COCO_val2014_000000000270.jpg",
    ):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    write_karpathy(tmp_path / "c", _sizes(), seed=1)
    assert _items(tmp_path / "c") != items
    write_karpathy(tmp_path / "d", replace(_sizes(), retrieval_val=10, retrieval_test=5), seed=0)
    assert _items(tmp_path / "d")[:150] == items[:150]  # train does not depend on the sizes of val / test


def test_paraphrase_split_is_the_old_one(tmp_path):
    write_karpathy(tmp_path, _sizes(retrieval_captions="paraphrases"), seed=0)
    items = _items(tmp_path)
    scenes = make_scenes(150, 0, "retrieval-train")
    for k in (0, 7, 149):
        want = L.captions(scenes[k], 5, random.Random(f"mdm-demo-text:0:retrieval-train:{k}"))
        assert [s["raw"] for s in items[k]["sentences"]] == want
    with pytest.raises(ValueError, match="retrieval_captions"):
        write_karpathy(tmp_path / "x", _sizes(retrieval_captions="unique"), seed=0)
