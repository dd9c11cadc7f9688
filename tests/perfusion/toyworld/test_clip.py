"""The toy CLIP: a real CLIPModel folder, its tokenizer, its training targets, an exact resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPTokenizer

from perfusion.clip_scoring import ClipScorer, check_clip_folder
from perfusion.toyworld import clip as toy_clip
from perfusion.toyworld.clip import ClipRecipe, build_tokenizer, load_recipe, pretrain
from perfusion.toyworld.clip_objectives import AttributeTargets
from perfusion.toyworld.language import vocabulary
from perfusion.toyworld.world import MARKS, PALETTE, SHAPES, TEXTURES

TINY = ClipRecipe(
    text_width=32,
    text_layers=2,
    text_heads=2,
    vision_width=32,
    vision_layers=1,
    projection=16,
    batch=4,
    read_layer=-2,
    attribute_weight=1.0,
    vision_weight=1.0,
    consistency_weight=1.0,
    seed=3,
)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


def test_every_word_of_the_language_is_one_token(tokenizer):
    world_words = {*PALETTE, *SHAPES, *TEXTURES, *MARKS[1:], "background"}
    assert world_words <= set(vocabulary())
    split = [w for w in vocabulary() if w.isalpha() and len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []


def test_attribute_targets_bind_each_noun_to_the_words_right_before_it(tokenizer):
    targets = AttributeTargets(tokenizer)
    ids = tokenizer(["a red circle and a star", "a white background with a striped blue star"],
                    padding="longest", return_tensors="pt").input_ids  # fmt: skip
    colors, textures = targets(ids)
    unstated = len(PALETTE)
    red, white, blue = (list(PALETTE).index(c) for c in ("red", "white", "blue"))
    assert colors[0, 3] == red and colors[0, 6] == unstated  # "circle" is red; "star" has no color said
    assert colors[1, 3] == white and colors[1, 8] == blue  # "background" white; "star" blue, not white
    assert textures[1, 8] == list(TEXTURES).index("striped")
    assert (colors[0, [0, 1, 2, 4, 5]] == AttributeTargets.IGNORE).all()  # not nouns


def test_a_pretrained_toy_clip_is_a_clip_folder_that_loads_and_scores(tmp_path):
    summary = pretrain(tmp_path / "clip", TINY, minutes=60.0, steps=2, resume=False, device="cpu")
    folder = tmp_path / "clip"
    assert summary["steps"] == 2 and {
        "final_clip_loss",
        "final_token_loss",
        "final_attribute_loss",
        "final_vision_loss",
        "final_consistency_loss",
    } <= set(summary)
    config = check_clip_folder(folder, expected_text_width=32)
    assert config["model_type"] == "clip"
    model = CLIPModel.from_pretrained(folder)
    assert model.config.text_config.num_hidden_layers == 2 and model.config.vision_config.image_size == 32
    assert load_recipe(folder) == TINY
    assert len(CLIPTokenizer.from_pretrained(folder)) == len(build_tokenizer())
    scorer = ClipScorer.from_folder(folder)
    image = torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()
    assert -1.0 <= scorer.text_similarity([image], ["a red star"]) <= 1.0
    with pytest.raises(ValueError, match="another recipe"):
        pretrain(folder, ClipRecipe(**{**TINY.__dict__, "seed": 4}), minutes=60.0, steps=3, resume=True, device="cpu")


def test_a_resumed_clip_pretraining_ends_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_clip, "CHECKPOINT_MINUTES", 0.0)  # a checkpoint after every step
    pretrain(tmp_path / "straight", TINY, minutes=60.0, steps=3, resume=False, device="cpu")
    real_batch_of, calls = toy_clip.batch_of, []

    def crash_on_the_third_batch(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_batch_of(*args, **kwargs)

    monkeypatch.setattr(toy_clip, "batch_of", crash_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "resumed", TINY, minutes=60.0, steps=3, resume=False, device="cpu")
    monkeypatch.setattr(toy_clip, "batch_of", real_batch_of)
    pretrain(tmp_path / "resumed", TINY, minutes=60.0, steps=3, resume=True, device="cpu")
    first = load_file(str(tmp_path / "straight" / "model.safetensors"))
    second = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="another recipe"):  # resuming with other flags would mix two runs
        pretrain(tmp_path / "resumed", replace(TINY, lr=TINY.lr * 2), minutes=60.0, steps=4, resume=True, device="cpu")
