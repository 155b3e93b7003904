"""Scenes of coloured shapes and their rendering with PIL.

A :class:`Scene` holds one to three objects, each with a shape, a colour, a size and a cell of a 3×3
grid; no two objects share a cell or a (colour, shape) pair, so every object can be named
unambiguously ("the red circle"). Everything is derived from explicit seeds: a scene is a pure function of
``(seed, index)`` and its rendering a pure function of the scene, so the demo data is identical on every
machine and does not depend on how many scenes are drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "ROWS",
    "COLS",
    "Obj",
    "Scene",
    "position_name",
    "make_scene",
    "make_scenes",
    "render",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# name → RGB; saturated so that colours stay separable after JPEG compression at 64 px
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 73, 189),
    "orange": (255, 127, 14),
}
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (232, 232, 232),
    (245, 238, 220),
    (225, 236, 245),
)
_SIZE_FRACTION = {"small": 0.25, "large": 0.44}  # half-extent as a fraction of the cell side


@dataclass(frozen=True)
class Obj:
    """One shape in a scene.

    Attributes:
        shape: One of :data:`SHAPES`.
        colour: One of :data:`COLOURS`.
        size: ``"small"`` or ``"large"``.
        row: Grid row, 0 (top) to 2 (bottom).
        col: Grid column, 0 (left) to 2 (right).
        dx: Horizontal jitter of the centre as a fraction of the cell side, in [-0.1, 0.1].
        dy: Vertical jitter, same units.
    """

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        """``"red circle"``: colour and shape, unique within a scene."""
        return f"{self.colour} {self.shape}"

    @property
    def full_name(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def position(self) -> str:
        """Position word(s): ``"top left"``, ``"left"``, ``"center"`` … (see :func:`position_name`)."""
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    """A rendered-on-demand picture: objects on a plain or lightly noisy background.

    Attributes:
        objects: One to three :class:`Obj`, in drawing order.
        background: RGB of the background.
        noise: Standard deviation of the additive pixel noise (0 = plain).
        seed: Seed for everything derived from the scene (noise pixels, choice of paraphrases).
    """

    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    noise: float
    seed: int

    def count(self, shape: str | None = None, colour: str | None = None, size: str | None = None) -> int:
        """Number of objects matching all given attributes."""
        return sum(
            (shape is None or o.shape == shape)
            and (colour is None or o.colour == colour)
            and (size is None or o.size == size)
            for o in self.objects
        )


def position_name(row: int, col: int) -> str:
    """Names a grid cell: the centre is ``"center"``, edge middles are ``"top"``/``"left"``…, corners
    ``"top left"``…"""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def make_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """Draws one scene from ``rng`` (consumed; nothing global is touched)."""
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(9), n)
    objects: list[Obj] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        objects.append(
            Obj(
                shape=shape,
                colour=colour,
                size=rng.choice(SIZES),
                row=cell // 3,
                col=cell % 3,
                dx=round(rng.uniform(-0.1, 0.1), 4),
                dy=round(rng.uniform(-0.1, 0.1), 4),
            )
        )
    noise = rng.choice((0.0, 0.0, 4.0, 8.0))
    return Scene(tuple(objects), rng.choice(_BACKGROUNDS), noise, rng.getrandbits(32))


def make_scenes(n: int, seed: int, tag: str = "") -> list[Scene]:
    """``n`` scenes; scene ``i`` depends only on ``(seed, tag, i)``.

    Args:
        n: Number of scenes.
        seed: Base seed.
        tag: Distinguishes independent families of scenes drawn from one seed (e.g. ``"train2014"``).
    """
    return [make_scene(random.Random(f"mdm-demo:{seed}:{tag}:{i}")) for i in range(n)]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "cross":  # a plus sign with arms one third of the extent wide
        t = r / 3
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draws ``scene`` as an RGB image of ``size``×``size`` pixels.

    Shapes are drawn at ``supersample``× the resolution and downsampled (anti-aliasing), then the
    scene's pixel noise (seeded by ``scene.seed``) is added.
    """
    big = size * supersample
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene.objects:
        cx = (o.col + 0.5 + o.dx) * cell
        cy = (o.row + 0.5 + o.dy) * cell
        r = _SIZE_FRACTION[o.size] * cell
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85  # same visual area as the circle, roughly
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_shape_polygon(o.shape, cx, cy, r), fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    if scene.noise > 0:
        noise_rng = np.random.default_rng(scene.seed)
        arr = np.asarray(img, dtype=np.float32)  # (size, size, 3)
        arr = arr + noise_rng.normal(0.0, scene.noise, size=arr.shape)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img
