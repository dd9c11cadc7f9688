"""The project's own text: neutral training templates and a generated caption corpus.

The language of real text encoders (a built-in base may bring its own: models.BaseModel). Two consumers:
- training (paper sec. 4.4) conditions on neutral context templates in the style of CLIP's ImageNet
  templates, with the concept token in the slot;
- the covariance C of text-encoder outputs (PERFUSION.md) needs many captions. The paper used ~100K real
  captions; we ship none, so we generate `templates x attributes x nouns` deterministically. The same
  corpus is the training text of the tiny model's BPE vocabulary (perfusion/vocab.py).
"""

from __future__ import annotations

import itertools
import random

# Neutral context templates (CLIP ImageNet style). "{}" is the concept (or superclass) phrase.
NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

NOUNS: tuple[str, ...] = (
    # products a catalog holds
    "backpack",
    "bag",
    "handbag",
    "wallet",
    "watch",
    "clock",
    "lamp",
    "chair",
    "table",
    "sofa",
    "mug",
    "cup",
    "bottle",
    "vase",
    "bowl",
    "plate",
    "teapot",
    "kettle",
    "toaster",
    "blender",
    "sneaker",
    "shoe",
    "boot",
    "sandal",
    "hat",
    "cap",
    "scarf",
    "jacket",
    "shirt",
    "dress",
    "sweater",
    "glove",
    "sock",
    "belt",
    "ring",
    "necklace",
    "bracelet",
    "earring",
    "sunglasses",
    "camera",
    "phone",
    "laptop",
    "keyboard",
    "mouse",
    "headphones",
    "speaker",
    "guitar",
    "drum",
    "teddy bear",
    "toy",
    "doll",
    "robot",
    "car",
    "bicycle",
    "skateboard",
    "ball",
    "kite",
    "book",
    "pillow",
    "blanket",
    "rug",
    "candle",
    "plant",
    "cactus",
    "flower",
    "basket",
    "box",
    "jar",
    "perfume",
    "soap",
    "brush",
    "comb",
    "mirror",
    "umbrella",
    "suitcase",
    "helmet",
    "tent",
    "bench",
    # animals and people, for scenes
    "dog",
    "cat",
    "bird",
    "horse",
    "rabbit",
    "person",
    "child",
    "man",
    "woman",
    # shapes, for the toy world
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "shape",
    "object",
    # marks, for the toy world ("a blue circle with a bar")
    "dot",
    "bar",
    "notch",
)

ATTRIBUTES: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "gold",
    "silver",
    "wooden",
    "leather",
    "ceramic",
    "glass",
    "metal",
    "plastic",
    "woolen",
    "striped",
    "dotted",
    "checkered",
    "plain",
    "shiny",
    "matte",
    "small",
    "large",
    "tiny",
    "huge",
    "old",
    "new",
    "vintage",
    "modern",
    "soft",
    "fluffy",
    "round",
    "tall",
    "short",
    "bright",
    "dark",
)

SCENES: tuple[str, ...] = (
    "on a marble counter",
    "on a wooden table",
    "in a garden",
    "on the beach",
    "in the snow",
    "in a kitchen",
    "in a living room",
    "on a shelf",
    "in the forest",
    "in the city",
    "at night",
    "under a spotlight",
    "on a white background",
    "on a black background",
    "on a blue background",
    "on a red background",
    "on a green background",
    "next to a window",
    "in a studio",
    "on grass",
)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {a} {n}",
    "a {a} {n} {s}",
    "a product shot of a {a} {n} {s}",
    "a close-up photo of the {a} {n}",
    "a {n} {s}",
    "a painting of a {a} {n}",
    "a {a} {n} next to a {n2}",
    "a {n} and a {n2} {s}",
    "two {a} {n} {s}",
    "an image of a {a} {n}",
    "a {a} {n} with a {a2} {n2} {s}",
    "a rendering of a {n} {s}",
    "a {n} with a {a} pattern {s}",
    "an {a} {n} and an {a2} {n2}",
)


def builtin_prompts(count: int = 6000, seed: int = 0) -> list[str]:
    """`count` distinct-ish captions from templates x attributes x nouns x scenes, deterministically.

    Every noun, attribute and scene word appears, so the covariance sees the whole vocabulary the demo
    and the toy world use.
    """
    rng = random.Random(seed)
    # Coverage first (every template with every noun), then random fill up to `count`.
    prompts = [_fill(t, n, rng) for t, n in itertools.product(CAPTION_TEMPLATES, NOUNS)]
    prompts += [t.format(n) for t, n in itertools.product(NEUTRAL_TEMPLATES, NOUNS)]
    while len(prompts) < count:
        prompts.append(_fill(rng.choice(CAPTION_TEMPLATES), rng.choice(NOUNS), rng))
    return prompts


def _fill(template: str, noun: str, rng: random.Random) -> str:
    return template.format(
        a=rng.choice(ATTRIBUTES),
        a2=rng.choice(ATTRIBUTES),
        n=noun,
        n2=rng.choice(NOUNS),
        s=rng.choice(SCENES),
    )


def read_caption_file(path: str) -> list[str]:
    """A user's caption corpus: one caption per line, blank lines and `#` comments ignored."""
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    return [line for line in lines if line and not line.startswith("#")]
