"""A procedural world with known ground truth: 32x32 scenes of textured shapes on plain backgrounds.

Why: no real Stable Diffusion weights can be downloaded here, and a random model renders noise, so
nothing could show that a concept was learned. In this world every picture has an exact description, so
an oracle can score renders (perfusion/toyworld/oracle.py) and a small model pretrained on it ("toy")
renders meaningful pictures. What people say about a scene is language.py's.

Rendering rules (the oracle relies on them):
- background: one palette color, never the color of an object on it;
- object: a shape mask; each pixel is the object's palette color c, or shade(c) where its texture pattern
  is on (plain: never). Pattern coverage stays below half the object, so c is the majority;
- mark: a small patch in a contrasting color (dot, bar, notch), drawn only where it falls on the body.
  A MARK_RATE share of pretraining objects carry one, never on a personal concept's shape and color, so each
  product is a combination of parts the model can draw but has never seen together.
Hard edges, no anti-aliasing: clean images decode exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 90, 225),
    "purple": (145, 60, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
TEXTURES = ("plain", "striped", "dotted", "checkered")
MARKS = ("none", "dot", "bar", "notch")
MARK_RATE = 0.45  # fraction of pretraining objects with a mark
# Color-shape pairs never shown in pretraining: renders of them test composition.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("blue", "triangle"),
        ("yellow", "ring"),
        ("green", "cross"),
        ("purple", "square"),
        ("orange", "circle"),
    }
)


def shade(color: str) -> tuple[int, int, int]:
    """The texture pattern's color for an object of `color`: darker, or mid-gray for black."""
    if color == "black":
        return (110, 110, 110)
    r, g, b = PALETTE[color]
    return (int(r * 0.55), int(g * 0.55), int(b * 0.55))


def mark_color(color: str) -> tuple[int, int, int]:
    """A mark contrasts with its object: black on light objects, white on dark ones."""
    return (20, 20, 20) if sum(PALETTE[color]) > 360 else (245, 245, 245)


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    texture: str = "plain"
    mark: str = "none"
    center: tuple[int, int] = (16, 16)
    radius: int = 9


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ObjectSpec, ...]


@dataclass(frozen=True)
class PersonalConcept:
    """A catalog product of this world: a specific shape, color, texture and mark, never seen in pretraining."""

    name: str
    superclass: str  # the shape word
    color: str
    texture: str
    mark: str
    tags: dict[str, str] = field(default_factory=dict)

    def object(self, center: tuple[int, int], radius: int) -> ObjectSpec:
        return ObjectSpec(self.superclass, self.color, self.texture, self.mark, center, radius)

    def description(self) -> str:
        """The product in the toy's own caption words ("a dotted purple star with a dot"): what a user could
        prompt the base model with instead of training a concept."""
        return _article(f"{self.texture} {self.color} {self.superclass}") + f" with a {self.mark}"


PERSONAL_CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("dotted-star", "star", "purple", "dotted", "dot", {"sku": "TOY-001", "category": "stars"}),
    PersonalConcept("striped-square", "square", "orange", "striped", "notch", {"sku": "TOY-002", "category": "boxes"}),
    PersonalConcept("checkered-ring", "ring", "green", "checkered", "bar", {"sku": "TOY-003", "category": "rings"}),
    PersonalConcept("marked-circle", "circle", "blue", "plain", "bar", {"sku": "TOY-004", "category": "discs"}),
)
# (shape, color, mark) of every product: no pretraining object ever has one of these, whatever its texture.
PERSONAL_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset(
    (c.superclass, c.color, c.mark) for c in PERSONAL_CONCEPTS
)


def shape_mask(shape: str, center: tuple[int, int], radius: int, size: int = SIZE) -> np.ndarray:
    """(size, size) bool mask of one shape."""
    image = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0], center[1], radius
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
        inner = max(2, int(r * 0.55))
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "square":
        s = int(r * 0.85)
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=1)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=1)
    elif shape == "star":
        points = []
        for k in range(10):
            angle = -np.pi / 2 + k * np.pi / 5
            reach = r if k % 2 == 0 else r * 0.45
            points.append((cx + reach * np.cos(angle), cy + reach * np.sin(angle)))
        draw.polygon(points, fill=1)
    elif shape == "cross":
        w = max(2, int(r * 0.35))
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=1)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return np.array(image, dtype=bool)


def texture_mask(texture: str, size: int = SIZE, phase: int = 0) -> np.ndarray:
    """(size, size) bool: where the pattern color goes (coverage < 1/2 by design)."""
    y, x = np.mgrid[0:size, 0:size]
    if texture == "plain":
        return np.zeros((size, size), dtype=bool)
    if texture == "striped":
        return (y + phase) % 4 == 0  # 1-px horizontal stripes every 4 px (25%)
    if texture == "dotted":
        return ((y + phase) % 4 == 1) & ((x + phase) % 4 == 1)  # single-pixel dots on a 4-px grid (6%)
    if texture == "checkered":
        return ((x + phase) // 3 + (y + phase) // 3) % 2 == 0  # 3-px checks... masked to <1/2 below
    raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")


def mark_mask(mark: str, obj: ObjectSpec, size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the mark's pixels, placed relative to the body's own extent."""
    out = np.zeros((size, size), dtype=bool)
    if mark == "none":
        return out
    body = shape_mask(obj.shape, obj.center, obj.radius, size)
    ys, xs = np.nonzero(body)
    cx, cy, r = obj.center[0], obj.center[1], obj.radius
    if mark == "dot":
        out[cy - 1 : cy + 2, cx - 1 : cx + 2] = True  # 3x3 center dot
    elif mark == "bar":
        out[cy - 1 : cy + 1, max(0, cx - r + 2) : cx + r - 1] = True  # 2-px horizontal bar through the middle
    elif mark == "notch":
        s = max(3, r // 2)
        top, right = int(ys.min()), int(xs.max())
        out[top : top + s, right - s + 1 : right + 1] = True  # a block in the body's top-right corner
    else:
        raise ValueError(f"unknown mark {mark!r}; known: {MARKS}")
    return out


def mark_visibility(obj: ObjectSpec) -> float:
    """Fraction of the mark's pixels that fall on the body (a dot in a ring's hole is drawn nowhere)."""
    marked = mark_mask(obj.mark, obj)
    return float((marked & shape_mask(obj.shape, obj.center, obj.radius)).sum() / max(1, marked.sum()))


def render(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 picture of a scene. Later objects are drawn over earlier ones."""
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:] = PALETTE[scene.background]
    for obj in scene.objects:
        body = shape_mask(obj.shape, obj.center, obj.radius)
        pattern = body & texture_mask(obj.texture, phase=obj.center[0] % 2)
        if obj.texture == "checkered":
            pattern &= ~_checker_excess(body, pattern)
        pixels[body] = PALETTE[obj.color]
        pixels[pattern] = shade(obj.color)
        pixels[mark_mask(obj.mark, obj) & body] = mark_color(obj.color)
    return pixels


def _checker_excess(body: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Checks can cover up to ~60% of a small object; thin them so the object color stays the majority."""
    if pattern.sum() * 2 < body.sum():
        return np.zeros_like(pattern)
    y, _ = np.mgrid[0 : body.shape[0], 0 : body.shape[1]]
    return pattern & (y % 3 == 2)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def sample_scene(rng: random.Random, two_objects: float = 0.3, allow_held_out: bool = False) -> Scene:
    """A random pretraining scene: 1 or 2 objects, never a held-out color-shape pair (unless allowed) nor a
    product's shape, color and mark together; a mark is kept only where at least half of it is visible."""
    count = 2 if rng.random() < two_objects else 1
    objects: list[ObjectSpec] = []
    used_colors: set[str] = set()
    for index in range(count):
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(list(PALETTE))
            if (allow_held_out or (color, shape) not in HELD_OUT) and color not in used_colors:
                break
        used_colors.add(color)
        radius = rng.randint(5, 6) if count == 2 else rng.randint(7, 11)
        if count == 1:
            center = (rng.randint(radius + 1, SIZE - radius - 2), rng.randint(radius + 1, SIZE - radius - 2))
        else:  # left and right halves with column 16 free between them: the two never touch
            half = SIZE // 2
            x = (
                rng.randint(radius + 1, half - 1 - radius)
                if index == 0
                else rng.randint(half + 1 + radius, SIZE - 2 - radius)
            )
            center = (x, rng.randint(radius + 1, SIZE - radius - 2))
        obj = ObjectSpec(shape, color, rng.choice(TEXTURES), "none", center, radius)
        if rng.random() < MARK_RATE:  # one of the marks this body can show (a notch shows on squares only)
            marks = [
                m
                for m in MARKS[1:]
                if (shape, color, m) not in PERSONAL_COMBINATIONS and mark_visibility(replace(obj, mark=m)) >= 0.5
            ]
            obj = replace(obj, mark=rng.choice(marks)) if marks else obj
        objects.append(obj)
    background = rng.choice([c for c in PALETTE if c not in used_colors])
    return Scene(background, tuple(objects))


def concept_scene(concept: PersonalConcept, rng: random.Random, background: str | None = None) -> Scene:
    """One photo of a personal concept: alone, centered-ish, on a random (or given) background."""
    radius = rng.randint(9, 11)
    center = (rng.randint(radius + 1, SIZE - radius - 2), rng.randint(radius + 1, SIZE - radius - 2))
    bg = background or rng.choice([c for c in PALETTE if c != concept.color])
    return Scene(bg, (concept.object(center, radius),))


def _concept_scenes(concept: PersonalConcept, count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [concept_scene(concept, rng) for _ in range(count)]


def concept_images(concept: PersonalConcept, count: int = 6, seed: int = 0) -> list[Image.Image]:
    """The few photos a product team would supply for one product."""
    return [Image.fromarray(render(scene)) for scene in _concept_scenes(concept, count, seed)]


def concept_masks(
    concept: PersonalConcept, count: int = 6, seed: int = 0, background: float = 0.0
) -> list[Image.Image]:
    """The product's masks for concept_images(concept, count, seed), same order: 255 on the product,
    `background` x 255 elsewhere (a soft mask: a floor keeps some loss on the scene around the product)."""
    masks = []
    for scene in _concept_scenes(concept, count, seed):
        obj = scene.objects[0]
        body = shape_mask(obj.shape, obj.center, obj.radius)
        masks.append(Image.fromarray(np.where(body, 255, round(background * 255)).astype(np.uint8)))
    return masks
