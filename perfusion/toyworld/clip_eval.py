"""How well a toy CLIP sees the toy world: zero-shot classification from text prompts, and retrieval."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from perfusion.toyworld.clip import pixels_of
from perfusion.toyworld.language import caption
from perfusion.toyworld.world import HELD_OUT, MARKS, PALETTE, SHAPES, TEXTURES, render, sample_scene
from perfusion.vocab import MAX_LENGTH

ZERO_SHOT_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "shape": ("a photo of a {}", SHAPES),
    "color": ("a photo of a {} object", tuple(PALETTE)),
    "background": ("an object on a {} background", tuple(PALETTE)),
    "texture": ("a photo of a {} object", TEXTURES),
    "mark": ("an object with {}", MARKS),
}


@torch.no_grad()
def zero_shot(model: CLIPModel, tokenizer: CLIPTokenizer, count: int = 400, seed: int = 31337) -> dict[str, float]:
    """Accuracy of zero-shot classification from text prompts on held-out single-object scenes (a seed
    pretraining never draws, held-out color-shape pairs allowed), per attribute; plus image->text top-1
    retrieval among `count` held-out captions of one- and two-object scenes."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, two_objects=0.0, allow_held_out=True) for _ in range(count)]
    image_embeds = _image_embeds(model, np.stack([render(s) for s in scenes]))
    results: dict[str, float] = {}
    for attribute, (template, values) in ZERO_SHOT_PROMPTS.items():
        words = [("no mark" if v == "none" else f"a {v}") if attribute == "mark" else v for v in values]
        text_embeds = _text_embeds(model, tokenizer, [template.format(w) for w in words])
        predicted = (image_embeds @ text_embeds.T).argmax(1)
        truth = [
            values.index(s.background if attribute == "background" else getattr(s.objects[0], attribute))
            for s in scenes
        ]
        results[attribute] = float((predicted == torch.tensor(truth)).float().mean())
    pairs = [sample_scene(rng, allow_held_out=True) for _ in range(count)]
    captions = [caption(s, rng) for s in pairs]
    similarity = _image_embeds(model, np.stack([render(s) for s in pairs])) @ _text_embeds(model, tokenizer, captions).T
    results["retrieval top-1"] = float((similarity.argmax(1) == torch.arange(count)).float().mean())
    results["held-out pairs in retrieval"] = float(
        np.mean([any((o.color, o.shape) in HELD_OUT for o in s.objects) for s in pairs])
    )
    return results


def _image_embeds(model: CLIPModel, images: np.ndarray) -> torch.Tensor:
    output = model.vision_model(pixel_values=pixels_of(images).to(model.device, model.dtype))
    return F.normalize(model.visual_projection(output.pooler_output).float(), dim=-1)


def _text_embeds(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    output = model.text_model(input_ids=ids.to(model.device))
    return F.normalize(model.text_projection(output.pooler_output).float(), dim=-1)
