"""Retrieval captions that identify their image, and scenes whose descriptions do not repeat.

The paraphrases of :func:`mdm.data.demo.language.captions` include sentences true of many scenes ("a
picture of one circle"), so in a retrieval split a caption can match several images and the match that
image-text matching (ITM) is trained on is not defined. Here every caption names every object with its
size, colour, shape and position, and :func:`distinct_scenes` redraws a scene whose :func:`description`
(that set of objects) was already drawn, so a caption is true of exactly one image of the set. The five
captions of an image are paraphrases: each takes its own template and its own object order.

Every word of these captions is a word of the demo's pretraining captions, so the demo's text tokenizer
keeps each one a single piece; the longest caption (three objects in corners) is 29 pieces, within the
demo's ``max_text_len`` of 32 with [bos] and [eos].
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mdm.data.demo.language import NUMBER_WORDS, _a, _join, _where
from mdm.data.demo.scenes import Obj, Scene, make_scene

__all__ = ["Description", "description", "identifying_captions", "distinct_scenes", "TEMPLATES"]

#: What a caption can say about a scene: (size, colour, shape, row, col) of each object.
Description = frozenset[tuple[str, str, str, int, int]]


def description(scene: Scene) -> Description:
    """The objects of ``scene`` with the attributes and cells that identifying captions name."""
    return frozenset((o.size, o.colour, o.shape, o.row, o.col) for o in scene.objects)


def _listed(objs: list[Obj]) -> str:
    return _join([f"{_a(o.full_name)} {_where(o)}" for o in objs])


def _counted(objs: list[Obj]) -> str:
    n = len(objs)
    return f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}: " + _listed(objs)


def _picture(objs: list[Obj]) -> str:
    return "a picture of " + _listed(objs)


def _subject_first(objs: list[Obj]) -> str:
    return _join([f"the {o.full_name} is {_where(o)}" for o in objs])


def _position_first(objs: list[Obj]) -> str:
    return _join([f"{_where(o)} is {_a(o.full_name)}" for o in objs])


def _size_last(objs: list[Obj]) -> str:
    return _join([f"the {o.name} {_where(o)} is {o.size}" for o in objs])


#: One sentence pattern each; every one names every object's size, colour, shape and position.
TEMPLATES: tuple[Callable[[list[Obj]], str], ...] = (
    _listed,  # a large red circle at the top left and a small blue square in the center
    _counted,  # two shapes: a large red circle at the top left and ...
    _picture,  # a picture of a large red circle at the top left and ...
    _subject_first,  # the large red circle is at the top left and ...
    _position_first,  # at the top left is a large red circle and ...
    _size_last,  # the red circle at the top left is large and ...
)


def identifying_captions(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """``n`` captions of ``scene``, each naming every object with size, colour, shape and position.

    Args:
        scene: The scene.
        n: How many captions. Up to ``len(TEMPLATES)`` they use distinct templates (so they differ); more
            reuse the templates with other object orders.
        rng: Chooses the templates and the object order of each caption (consumed).

    Returns:
        Lower-case captions, in the order drawn.
    """
    out: list[str] = []
    while len(out) < n:
        for template in rng.sample(TEMPLATES, min(len(TEMPLATES), n - len(out))):
            objs = list(scene.objects)
            rng.shuffle(objs)
            out.append(template(objs))
    return out


def distinct_scenes(n: int, seed: int, tag: str, taken: set[Description]) -> list[Scene]:
    """``n`` scenes whose descriptions differ from each other and from those in ``taken``.

    Scene ``i`` is :func:`~mdm.data.demo.scenes.make_scenes`' scene ``i`` unless its description is
    taken; then it is redrawn from ``(seed, tag, i, attempt)`` until it is not. So scene ``i`` depends on
    the scenes before it and on ``taken``, never on ``n``.

    Args:
        n: Number of scenes.
        seed: Base seed.
        tag: The family of scenes, as for ``make_scenes``.
        taken: Descriptions already used (e.g. by other splits); the new ones are added to it.
    """
    scenes = []
    for i in range(n):
        attempt = 0
        while True:
            suffix = f":redraw-{attempt}" if attempt else ""
            scene = make_scene(random.Random(f"mdm-demo:{seed}:{tag}:{i}{suffix}"))
            if description(scene) not in taken:
                break
            attempt += 1
        taken.add(description(scene))
        scenes.append(scene)
    return scenes
