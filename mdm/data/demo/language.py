"""Language about demo scenes: captions, VQA question/answer pairs, NLVR2 statements, annotator noise.

Captions mention every attribute the downstream tasks ask about (colour, shape, size, position, counts,
relative positions), so pretraining on captions of this world can transfer to VQA, NLVR2 and retrieval.
VQA answers follow the VQAv2 conventions (short words, "yes"/"no", numbers as digits); the ten annotator
answers of :func:`annotator_answers` mix the canonical answer with variants that only answer
normalisation maps back ("two" → "2", "Red." → "red", "a circle" → "circle") and a few wrong answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mdm.data.demo.scenes import COLOURS, SHAPES, SIZES, Obj, Scene

__all__ = [
    "NUMBER_WORDS",
    "AnswerType",
    "Question",
    "Statement",
    "captions",
    "vqa",
    "questions",
    "nlvr2",
    "statements",
    "annotator_answers",
    "corpus_sentences",
]

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
AnswerType = str  # "yes/no" | "number" | "other" (VQAv2 answer_type values)
_POSITIONS = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")


def _where(o: Obj) -> str:
    """Prepositional phrase for the object's cell: "on the left", "at the top right", "in the center"."""
    pos = o.position
    if pos == "center":
        return "in the center"
    if pos in ("left", "right"):
        return f"on the {pos}"
    return f"at the {pos}"


def _relation(a: Obj, b: Obj) -> str | None:
    """``a`` relative to ``b`` ("above", "to the left of" …), or None if they share neither row nor column."""
    if a.col == b.col:
        return "above" if a.row < b.row else "below"
    if a.row == b.row:
        return "to the left of" if a.col < b.col else "to the right of"
    return None


def _join(parts: list[str]) -> str:
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(scene: Scene) -> str:
    n = len(scene.objects)
    return f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"


def captions(scene: Scene, n: int | None = None, rng: random.Random | None = None) -> list[str]:
    """Templated paraphrases describing ``scene``.

    Args:
        scene: The scene.
        n: How many captions; None returns all six paraphrases.
        rng: Chooses the object order and which ``n`` paraphrases; None derives it from ``scene.seed``.

    Returns:
        Lower-case captions; the first of the full list names every object with size, colour, shape
        and position. With ``n`` larger than the number of paraphrases, paraphrases repeat with another
        object order.
    """
    rng = random.Random(scene.seed) if rng is None else rng
    if n is not None:
        out: list[str] = []
        while len(out) < n:
            pool = _paraphrases(scene, rng)
            out += rng.sample(pool, min(len(pool), n - len(out)))
        return out
    return _paraphrases(scene, rng)


def _paraphrases(scene: Scene, rng: random.Random) -> list[str]:
    objs = list(scene.objects)
    rng.shuffle(objs)
    out = [_join([f"{_a(o.full_name)} {_where(o)}" for o in objs])]
    out.append(f"{_count_phrase(scene)}: " + _join([_a(o.full_name) for o in objs]))
    by_shape = sorted({o.shape for o in objs})
    out.append(
        "a picture of "
        + _join(
            [f"{NUMBER_WORDS[scene.count(shape=s)]} {_plural(s, scene.count(shape=s))}" for s in by_shape]
        )
    )
    out.append(_join([f"the {o.name} is {o.size}" for o in objs]))
    out.append(_join([f"{_a(o.colour)} {o.shape} {_where(o)}" for o in objs]) + " on a plain background")
    if len(objs) >= 2:
        a, b = objs[0], objs[1]
        rel = _relation(a, b)
        if rel is not None:
            out.append(f"{_a(a.full_name)} {rel} {_a(b.full_name)}")
        else:
            out.append(f"{_a(a.name)} and {_a(b.name)} in different corners of the image")
    else:
        out.append(f"a single {objs[0].full_name} {_where(objs[0])}")
    return out


def _absent_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    while True:
        pair = (rng.choice(tuple(COLOURS)), rng.choice(SHAPES))
        if pair not in present:
            return pair


@dataclass(frozen=True)
class Question:
    """A VQA question about a scene.

    Attributes:
        text: The question.
        answer: The canonical short answer.
        question_type: VQAv2-style question prefix ("how many", "what color is the", ...).
        answer_type: "yes/no", "number" or "other".
    """

    text: str
    answer: str
    question_type: str
    answer_type: AnswerType


_QUESTION_TYPES = (
    "how many",
    "what color is the",
    "what shape is the",
    "where is the",
    "is there a",
    "is the",
)


def _question_type(text: str) -> str:
    return next(t for t in _QUESTION_TYPES if text.startswith(t))


def questions(scene: Scene, n: int, rng: random.Random) -> list[Question]:
    """``n`` distinct questions about ``scene`` chosen with ``rng`` (fewer if the scene has fewer)."""
    pool = vqa(scene)
    chosen = rng.sample(pool, min(n, len(pool)))
    return [Question(q, a, _question_type(q), t) for q, a, t in chosen]


def vqa(scene: Scene) -> list[tuple[str, str, AnswerType]]:
    """Question/answer pairs about ``scene``, deterministic given the scene.

    Yes/no questions come in pairs (one with answer "yes", one with "no"), so a model cannot answer
    them without looking at the image.

    Returns:
        ``(question, answer, answer_type)`` triples; answer types are VQAv2's "yes/no", "number", "other".
    """
    rng = random.Random(scene.seed + 1)
    o = rng.choice(scene.objects)
    q: list[tuple[str, str, AnswerType]] = [
        ("how many shapes are there?", str(len(scene.objects)), "number"),
    ]
    shape = rng.choice(SHAPES)
    q.append((f"how many {_plural(shape, 2)} are there?", str(scene.count(shape=shape)), "number"))
    colour = rng.choice((o.colour, rng.choice(tuple(COLOURS))))
    q.append((f"how many {colour} shapes are there?", str(scene.count(colour=colour)), "number"))
    if scene.count(shape=o.shape) == 1:
        q.append((f"what color is the {o.shape}?", o.colour, "other"))
    if scene.count(colour=o.colour) == 1:
        q.append((f"what shape is the {o.colour} object?", o.shape, "other"))
    q.append((f"where is the {o.name}?", o.position, "other"))
    q.append((f"is the {o.name} large or small?", o.size, "other"))
    q.append((f"is there {_a(o.name)}?", "yes", "yes/no"))
    absent = _absent_pair(scene, rng)
    q.append((f"is there {_a(absent[0])} {absent[1]}?", "no", "yes/no"))
    side = rng.choice(("left", "right"))
    truth = (o.col == 0) if side == "left" else (o.col == 2)
    q.append((f"is the {o.name} on the {side}?", "yes" if truth else "no", "yes/no"))
    return q


_VARIANTS: dict[str, tuple[str, ...]] = {
    "yes": ("Yes", "yes."),
    "no": ("No", "no."),
    "large": ("big", "Large"),
    "small": ("tiny", "Small"),
    "center": ("middle", "the center", "centre"),
}


def _variants(answer: str, answer_type: AnswerType) -> tuple[str, ...]:
    if answer_type == "number":
        return (NUMBER_WORDS[int(answer)], f"{answer}.")
    if answer in _VARIANTS:
        return _VARIANTS[answer]
    if answer in SHAPES:
        return (f"a {answer}", answer.capitalize(), _plural(answer, 2))
    if answer in COLOURS:
        return (answer.capitalize(), f"{answer}.", f"dark {answer}")
    return (f"the {answer}", f"{answer} corner", answer.capitalize())


def _wrong(answer: str, answer_type: AnswerType, rng: random.Random) -> str:
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        return str(max(0, int(answer) + rng.choice((-1, 1))))
    for pool in (SHAPES, tuple(COLOURS), SIZES, _POSITIONS):
        if answer in pool:
            return rng.choice([a for a in pool if a != answer])
    return answer


def annotator_answers(
    answer: str, answer_type: AnswerType, rng: random.Random, n: int = 10
) -> list[tuple[str, str]]:
    """Simulates ``n`` crowd answers: ~75 % canonical, ~15 % surface variants, ~10 % wrong.

    Returns:
        ``(answer, answer_confidence)`` pairs; confidence is VQAv2's "yes" / "maybe" / "no".
    """
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.75:
            out.append((answer, "yes"))
        elif u < 0.90:
            out.append((rng.choice(_variants(answer, answer_type)), rng.choice(("yes", "maybe"))))
        else:
            out.append((_wrong(answer, answer_type, rng), rng.choice(("maybe", "no"))))
    return out


def _contains(
    scene: Scene, colour: str | None = None, shape: str | None = None, size: str | None = None
) -> bool:
    return scene.count(shape=shape, colour=colour, size=size) > 0


def _statement(a: Scene, b: Scene, rng: random.Random) -> tuple[str, bool]:
    """One random statement about the pair and its truth value."""
    pick = rng.choice(a.objects + b.objects)
    # half of the time describe an object that exists, so both truth values are common
    colour = pick.colour if rng.random() < 0.5 else rng.choice(tuple(COLOURS))
    shape = pick.shape if rng.random() < 0.5 else rng.choice(SHAPES)
    side, scene = rng.choice((("left", a), ("right", b)))
    kind = rng.randrange(8)
    if kind == 0:
        return f"the {side} image contains {_a(colour)} {shape}", _contains(scene, colour, shape)
    if kind == 1:
        size = rng.choice(SIZES)
        return f"the {side} image contains a {size} {shape}", _contains(scene, shape=shape, size=size)
    if kind == 2:
        return f"both images contain {_a(shape)}", _contains(a, shape=shape) and _contains(b, shape=shape)
    if kind == 3:
        n = rng.randint(1, 3)
        word = NUMBER_WORDS[n]
        text = f"both images contain exactly {word} {'shape' if n == 1 else 'shapes'}"
        return text, len(a.objects) == n and len(b.objects) == n
    if kind == 4:
        more = len(a.objects) > len(b.objects) if side == "left" else len(b.objects) > len(a.objects)
        return f"there are more shapes in the {side} image", more
    if kind == 5:
        one = _contains(a, shape=shape) != _contains(b, shape=shape)
        return f"exactly one image contains {_a(shape)}", one
    if kind == 6:
        total = a.count(colour=colour) + b.count(colour=colour)
        n = rng.choice((total, rng.randint(1, 3)))
        return (
            f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {colour} {'shape' if n == 1 else 'shapes'} in total",
            total == n,
        )
    neither = not _contains(a, colour, shape) and not _contains(b, colour, shape)
    return f"neither image contains {_a(colour)} {shape}", neither


@dataclass(frozen=True)
class Statement:
    """An NLVR2 sentence about an image pair and whether it is true."""

    text: str
    label: bool


def statements(left: Scene, right: Scene, rng: random.Random) -> list[Statement]:
    """One true and one false statement about the pair, in random order (so the images alone never
    predict the label)."""
    out = [Statement(*nlvr2(left, right, rng, label=True)), Statement(*nlvr2(left, right, rng, label=False))]
    rng.shuffle(out)
    return out


def corpus_sentences(scene: Scene, rng: random.Random) -> list[str]:
    """About five sentences for the text-only corpus: three captions and two answered questions."""
    out = captions(scene, 3, rng)
    for q in questions(scene, 2, rng):
        out.append(f"{q.text} {NUMBER_WORDS[int(q.answer)] if q.answer_type == 'number' else q.answer}")
    return out


def nlvr2(scene_a: Scene, scene_b: Scene, rng: random.Random, label: bool | None = None) -> tuple[str, bool]:
    """A statement about the pair (``scene_a`` = left image, ``scene_b`` = right image) and its truth.

    Args:
        scene_a: Left image.
        scene_b: Right image.
        rng: Source of randomness (consumed).
        label: Wanted truth value; None draws it with probability 1/2 so labels are balanced.

    Returns:
        ``(statement, label)``.
    """
    want = rng.random() < 0.5 if label is None else label
    for _ in range(200):
        text, truth = _statement(scene_a, scene_b, rng)
        if truth == want:
            return text, truth
    # every pair admits both a true and a false "contains" statement about the left image
    o = scene_a.objects[0]
    if want:
        return f"the left image contains {_a(o.name)}", True
    colour, shape = _absent_pair(scene_a, rng)
    return f"the left image contains {_a(colour)} {shape}", False
