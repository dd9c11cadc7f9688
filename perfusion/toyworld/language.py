"""The toy world's caption language (v4): many ways to say what one scene shows.

Real text encoders are trained on captions written by people: many word orders, articles, counts,
relations between objects, and words that say nothing about what is in the picture ("photo", "studio",
"high quality"). A text encoder that only ever met one template per scene reads a word by its position,
not by what it is, and Perfusion's gate (eq. 3) needs a word's encoding to stay put across contexts. So the
toy CLIP and the toy base learn from this language, not from world.caption's five templates.

    caption(scene, rng)   one caption of a scene (what the scene shows is always said correctly)
    caption_corpus(n)     captions of random pretraining scenes: the covariance C's corpus
    vocabulary()          every word the language can produce (the toy tokenizer makes each one token)

What the world draws is fixed by the scene; the caption may leave the background, the texture or a plain
object's "plain" unsaid, and says nothing false. Two-object scenes put object 0 in the left half, so "left"
and "right" are true relations.
"""

from __future__ import annotations

import random
import re

from perfusion.toyworld.world import MARKS, PALETTE, SHAPES, TEXTURES, ObjectSpec, Scene, sample_scene

# Fraction of captions that leave the background unsaid, as "a photo of <product>" does: without them the
# model reads a lone color word as the background and floods the canvas with it (toy v2 did).
NO_BACKGROUND_RATE = 0.25

PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "ring": "rings", "cross": "crosses"}  # fmt: skip
# Texture as an adjective ("a striped star") and as a phrase after the shape ("a star with stripes").
TEXTURE_PHRASES = {
    "striped": ("with stripes", "with a striped pattern"),
    "dotted": ("with dots", "with a dotted pattern", "with polka dots"),
    "checkered": ("with checks", "with a checkered pattern"),
    "plain": ("with no pattern",),
}
MARK_PHRASES = ("with a {}", "with a {} on it", "marked with a {}", "that has a {}", "with a {} mark")

# The medium and quality words of real prompts: the world ignores all of them.
MEDIA = (
    "a photo of", "a picture of", "an image of", "a rendering of", "a render of", "a close-up of",
    "a close-up photo of", "a product shot of", "a product photo of", "a studio photo of", "a high quality photo of",
    "a detailed rendering of", "a simple drawing of", "a snapshot of", "a clean photo of", "a nice picture of",
    "a professional photo of", "a bright photo of", "a cropped photo of", "a good photo of", "a 3d render of",
    "a minimal illustration of", "a sharp photo of", "a catalog photo of", "an illustration of", "a drawing of",
    "a dark photo of", "a small photo of", "a large photo of", "a clear picture of", "a digital image of",
    "the photo of", "a centered photo of", "a flat illustration of", "a clean render of", "an icon of",
    "a rendition of", "a photograph of", "a sketch of", "a painting of", "a scan of", "a screenshot of",
    "a thumbnail of", "a mockup of", "a frame showing", "a scene with", "a shot of", "a view of", "my photo of",
    "here is", "this is", "there is", "we see", "look at", "a still of", "an advert showing", "a listing photo of",
)  # fmt: skip
STYLES = (
    "high quality", "studio lighting", "4k", "8k", "detailed", "product photography", "centered", "sharp focus",
    "simple", "minimal", "professional", "award winning", "soft light", "clean", "flat colors", "studio shot",
    "front view", "top view", "basic style", "hd", "highly detailed", "trending", "vector art", "isometric",
    "close-up", "catalog image", "commercial photo", "even lighting", "no shadows", "crisp", "vivid colors",
    "macro lens", "daylight", "indoor shot", "for sale", "on display", "shop listing", "web banner", "poster art",
    "sticker design", "logo style", "wallpaper", "photograph", "bokeh", "35mm", "dslr", "film grain", "matte finish",
    "glossy", "soft shadows", "hard light", "backlit", "symmetrical", "realistic", "photorealistic", "cartoon style",
    "pixel art", "low poly", "octane render", "unreal engine", "concept art", "editorial", "magazine cover",
    "advertising", "e-commerce", "white balance", "color graded", "natural light", "ambient light", "rim light",
    "depth of field", "wide angle", "telephoto", "portrait mode", "square format", "thumbnail", "full frame",
    "best quality", "masterpiece", "ultra sharp", "clean edges", "simple composition", "rule of thirds",
)  # fmt: skip
# Neutral modifiers that sit between the article and the object in CLIP's ImageNet templates
# ("a photo of the nice {}"): the toy base trains concepts on such templates, so its encoder must know them.
MODIFIERS = ("nice", "cool", "small", "large", "clean", "dirty", "weird", "good", "single", "simple",
             "little", "big", "new", "old", "lonely", "bright", "dark", "shiny", "toy", "tiny", "huge", "pretty",
             "lovely", "basic", "classic", "modern", "vintage", "perfect", "ordinary", "lone", "neat")  # fmt: skip
BACKGROUND_PHRASES = (
    "on a {} background", "against a {} background", "on a plain {} background", "in front of a {} backdrop",
    "on a {} backdrop", "over a {} background", "on {}", "on a solid {} background", "with a {} background",
    "set against a {} background", "on a {} surface", "on a {} wall",
)  # fmt: skip
BACKGROUND_ALONE = ("a {} background", "{} background", "a plain {} background", "a {} backdrop")
PAIR_JOINS = ("{a} and {b}", "{a} next to {b}", "{a} beside {b}", "{a} to the left of {b}",
              "{b} to the right of {a}", "{a} and, to its right, {b}", "{b} and {a}", "{a} near {b}",
              "{a} together with {b}", "{a} on the left and {b} on the right")  # fmt: skip
ARTICLES = ("a", "a", "a", "a", "the", "one")
GENERIC_NOUNS = ("object", "shape", "thing")  # a shape left unsaid: "a red object"
GENERIC_RATE = 0.05
NO_MARK_RATE = 0.05  # an unmarked object said to be so: "a red star with no mark"


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of `scene`, in one of the language's many forms (module docstring)."""
    things = _things(scene.objects, rng)
    form = rng.random()
    if rng.random() < NO_BACKGROUND_RATE:
        if form < 0.3:
            text = things
        elif form < 0.8:
            text = f"{rng.choice(MEDIA)} {things}"
        else:
            text = f"{things}, {rng.choice(STYLES)}"
    else:
        background = scene.background
        placed = _a(rng.choice(BACKGROUND_PHRASES).format(background))
        alone = _a(rng.choice(BACKGROUND_ALONE).format(background))
        if form < 0.35:
            text = f"{things} {placed}"
        elif form < 0.6:
            text = f"{rng.choice(MEDIA)} {things} {placed}"
        elif form < 0.7:
            text = f"{alone} with {things}"
        elif form < 0.8:
            text = f"{placed}, {things}"
        elif form < 0.9:
            text = f"{things}, {alone}"
        else:
            text = f"{alone}, {things}"
    if rng.random() < 0.2:
        text += ", " + ", ".join(rng.sample(STYLES, rng.randint(1, 2)))
    return text


def _things(objects: tuple[ObjectSpec, ...], rng: random.Random) -> str:
    if len(objects) == 1:
        return object_phrase(objects[0], rng)
    left, right = objects
    if left.shape == right.shape and rng.random() < 0.3:  # "two stars, a red one and a blue one"
        count = rng.choice(("two", "2"))
        return f"{count} {PLURALS[left.shape]}, {_one(left, rng)} and {_one(right, rng)}"
    join = rng.choice(PAIR_JOINS)
    return join.format(a=object_phrase(left, rng), b=object_phrase(right, rng))


def _one(obj: ObjectSpec, rng: random.Random) -> str:
    """ "a red one", "a striped blue one with a dot": the object's attributes without its shape word."""
    return _with_article(f"{_texture_adjective(obj, rng)}{obj.color} one", rng) + _mark_phrase(obj, rng)


def object_phrase(obj: ObjectSpec, rng: random.Random) -> str:
    """The object in words: always its color and shape; its texture (before or after the shape, or unsaid
    when plain); its mark when it has one. An optional neutral modifier ("a nice red star")."""
    modifier = f"{rng.choice(MODIFIERS)} " if rng.random() < 0.12 else ""
    noun = rng.choice(GENERIC_NOUNS) if rng.random() < GENERIC_RATE else obj.shape
    if obj.texture != "plain" and rng.random() < 0.35:  # "a red star with stripes"
        head = f"{modifier}{obj.color} {noun} {rng.choice(TEXTURE_PHRASES[obj.texture])}"
    else:
        head = f"{modifier}{_texture_adjective(obj, rng)}{obj.color} {noun}"
    return _with_article(head, rng) + _mark_phrase(obj, rng)


def _texture_adjective(obj: ObjectSpec, rng: random.Random) -> str:
    if obj.texture == "plain":
        return "plain " if rng.random() < 0.15 else ""
    return f"{obj.texture} "


def _mark_phrase(obj: ObjectSpec, rng: random.Random) -> str:
    if obj.mark == "none":
        return " with no mark" if rng.random() < NO_MARK_RATE else ""
    return " " + rng.choice(MARK_PHRASES).format(obj.mark)


def _with_article(phrase: str, rng: random.Random) -> str:
    return _a(f"{rng.choice(ARTICLES)} {phrase}")


def _a(text: str) -> str:
    """ "a" before a vowel becomes "an", wherever it stands in `text` ("a orange backdrop" -> "an orange ...")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_corpus(count: int = 4000, seed: int = 0) -> list[str]:
    """Captions of random pretraining scenes: the toy text encoder's language, for its covariance C."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(count)]


def vocabulary() -> list[str]:
    """Every word the language (and the toy training templates) can produce, sorted."""
    words: set[str] = set(PALETTE) | set(SHAPES) | set(TEXTURES) | set(MARKS[1:]) | set(PLURALS.values())
    texts = [*MEDIA, *STYLES, *MODIFIERS, *BACKGROUND_PHRASES, *BACKGROUND_ALONE, *PAIR_JOINS, *MARK_PHRASES]
    texts += [p for phrases in TEXTURE_PHRASES.values() for p in phrases]
    texts += ["two 2 one an a the with no mark", ",", *GENERIC_NOUNS]
    for text in texts:
        for word in text.replace("{a}", " ").replace("{b}", " ").replace("{}", " ").replace(",", " , ").split():
            words.add(word)
    return sorted(words)
