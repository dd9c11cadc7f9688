"""The v4 caption language says what a scene shows, in many forms, in words the toy tokenizer keeps whole."""

from __future__ import annotations

import random
import re

from perfusion.toyworld.language import GENERIC_NOUNS, NO_BACKGROUND_RATE, PLURALS, caption, caption_corpus, vocabulary
from perfusion.toyworld.world import MARKS, PALETTE, PERSONAL_CONCEPTS, SHAPES, TEXTURES, Scene, sample_scene


def test_every_caption_names_each_objects_color_shape_and_mark_and_says_nothing_false():
    rng = random.Random(4)
    for _ in range(600):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        words = set(re.findall(r"[\w-]+", text))
        for obj in scene.objects:
            assert obj.color in words, (text, obj)
            assert {obj.shape, PLURALS[obj.shape], *GENERIC_NOUNS} & words, (text, obj)
            if obj.mark != "none":
                assert obj.mark in words, (text, obj)
        said_colors = words & set(PALETTE)
        assert said_colors <= {o.color for o in scene.objects} | {scene.background}, text
        assert words & set(SHAPES) <= {o.shape for o in scene.objects}, text
        object_words = set(re.findall(r"[\w-]+", text.replace(f"plain {scene.background}", scene.background)))
        for texture in set(TEXTURES) & object_words:  # "a plain white background" is the background's
            assert texture in {o.texture for o in scene.objects}, text
        for mark in (set(MARKS) - {"none"}) & words:
            assert mark in {o.mark for o in scene.objects} or (mark == "dot" and "dots" in text), text
        assert not re.search(r"\ba [aeiou]", text), text


def test_the_language_is_varied():
    corpus = caption_corpus(2000, seed=1)
    assert len(set(corpus)) > 1900  # almost every caption is new
    first_words = {c.split()[0] for c in corpus}
    assert len(first_words) > 20  # the object is not always where the caption starts
    used = {w for c in corpus for w in re.findall(r"[\w-]+|,", c)}
    assert len(used) > 200 and used <= set(vocabulary())


def test_about_a_quarter_of_captions_leave_the_background_unsaid():
    rng = random.Random(2)
    scenes = [sample_scene(rng) for _ in range(800)]
    unsaid = [s.background not in caption(s, rng).replace(",", " ").split() for s in scenes]
    assert abs(sum(unsaid) / len(unsaid) - NO_BACKGROUND_RATE) < 0.05  # "a photo of a red square"


def test_a_products_description_is_a_phrase_the_captions_use():
    """The benchmark's "described in words" baseline prompts the base with words it was pretrained on."""
    rng = random.Random(0)
    for concept in PERSONAL_CONCEPTS:
        said = {caption(Scene("white", (concept.object((16, 16), 9),)), rng) for _ in range(400)}
        assert any(concept.description() in text for text in said), (concept.description(), sorted(said)[:3])
    assert PERSONAL_CONCEPTS[0].description() == "a dotted purple star with a dot"
