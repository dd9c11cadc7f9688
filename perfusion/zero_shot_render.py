"""Rendering zero-shot products (zero_shot.py) on their MM-DiT base: prompts name products by token.

    renderer = ZeroShotRenderer(base)                     # an MM-DiT base with an image-prompt kit
    renderer.attach(load_concept_file(data, base))
    images = renderer.render([RenderRequest("<dotted-star> next to <striped-square> on a white background")])

Each product's token in the prompt becomes its superclass word ("a star": the words the adapter was trained
with, the caption naming the subject by its shape only), and the product's image prompt is tied to that
word's position in the text sequence, so with several products each reference is routed to where the image
attends to its own word (dynaip.py). Only the image stream receives the references (dynamic decoupling).
A request names its products by `concepts` (tokens; each must appear once in the prompt) or by the tokens
its prompt contains.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from perfusion.errors import ConceptFileError, RenderError
from perfusion.sampling import RenderRequest, RenderSettings
from perfusion.zero_shot import ZeroShotConcept, image_prompt_call, kit_of

ARTICLES = ("a", "an", "the", "one")


class ZeroShotRenderer:
    """Zero-shot products attached to one MM-DiT base, rendered in batches (one forward pass a batch)."""

    def __init__(
        self,
        base: object,
        *,
        granularity: Sequence[float] | None = None,
        text_stream: bool = False,
        scale: float = 1.0,
    ) -> None:
        """`granularity`: per-level weights (sum 1) replacing every product's router weights (the knob);
        `text_stream`: inject into the text stream too (decoupling off: the ablation, not the method);
        `scale`: the injection's weight (IP-Adapter's scale; 1 as trained)."""
        kit_of(base, "(renderer)")  # refuses a UNet base, or an MM-DiT without an adapter
        self.base = base
        self.concepts: dict[str, ZeroShotConcept] = {}
        self.granularity = None if granularity is None else torch.tensor(list(granularity), dtype=torch.float32)
        self.text_stream = text_stream
        self.scale = scale

    def attach(self, concept: ZeroShotConcept) -> None:
        if concept.base_fingerprint != self.base.fingerprint:  # type: ignore[attr-defined]
            raise ConceptFileError(
                f"{concept.token}: onboarded for another base or adapter (fingerprint {concept.base_fingerprint}); "
                "onboard the product again on this base"
            )
        self.concepts[concept.token] = concept

    def prepare(self, request: RenderRequest) -> tuple[str, list[ZeroShotConcept], list[int]]:
        """(the prompt the base reads, its products in prompt order, each product's word position in the
        text sequence). RenderError for a product the prompt does not name once, or one not attached."""
        if request.gates:
            raise RenderError(f"prompt {request.prompt!r}: zero-shot products have no gate; remove the request's gates")
        # Attached tokens literally (longest first: "<mug-2>" before "<mug>"; a token may have no brackets),
        # then any other <...> as a product that is not attached.
        known = sorted(self.concepts, key=len, reverse=True)
        pattern = "|".join([*(re.escape(t) for t in known), r"<[^<>\s]+>"])
        tokens = re.findall(pattern, request.prompt)
        unknown = [t for t in tokens if t not in self.concepts]
        if unknown:
            raise RenderError(f"prompt {request.prompt!r} names {unknown}, which are not attached zero-shot products")
        wanted = list(request.concepts) if request.concepts is not None else tokens
        if len(wanted) > len(tokens):
            raise RenderError(
                f"the request references {len(wanted)} products {wanted} but prompt {request.prompt!r} has "
                f"{len(tokens)} placeholder(s): each reference needs its own placeholder (its token) in the prompt"
            )
        for token in wanted:
            if tokens.count(token) != 1:
                raise RenderError(
                    f"prompt {request.prompt!r} has {tokens.count(token)} placeholder(s) for {token}; each product "
                    f"referenced needs exactly one ({len(wanted)} product(s), {len(tokens)} placeholder(s))"
                )
        if len(tokens) != len(wanted):
            raise RenderError(
                f"prompt {request.prompt!r} has placeholders {tokens} but the request references {wanted}: "
                "name each product once, in the prompt and the request alike"
            )
        text, products, positions = "", [], []
        tokenizer = self.base.pipeline.tokenizer  # type: ignore[attr-defined]
        rest = request.prompt
        for token in tokens:
            before, _, rest = rest.partition(token)
            concept = self.concepts[token]
            words = before.split()
            vowel = concept.superclass[:1].lower() in "aeiou"
            article = "" if words and words[-1].lower() in ARTICLES else ("an " if vowel else "a ")
            space = " " if before and not before[-1].isspace() else ""  # "of<tok>" -> "of a star"
            text += before + space + article
            # The word's first token follows BOS and every token of the text before it.
            positions.append(
                1 + len(tokenizer(text.strip(), add_special_tokens=False).input_ids) if text.strip() else 1
            )
            text += concept.superclass
            products.append(concept)
        return text + rest, products, positions

    def render(
        self, requests: Sequence[RenderRequest], settings: RenderSettings = RenderSettings()
    ) -> list[Image.Image]:
        """One image a request, in order (render_arrays as pictures)."""
        return [Image.fromarray(array) for array in self.render_arrays(requests, settings)]

    @torch.no_grad()
    def render_arrays(
        self, requests: Sequence[RenderRequest], settings: RenderSettings = RenderSettings()
    ) -> list[np.ndarray]:
        """(H, W, 3) uint8 a request, in order; rows sharing a negative prompt render together, batch_size at
        a time. The base renders at its own size only: RenderError for another height or width."""
        native = self.base.resolution  # type: ignore[attr-defined]
        if {settings.height, settings.width} - {None, native}:
            raise RenderError(
                f"zero-shot products render at their base's {native}x{native}; leave height and width unset"
            )
        prepared = [self.prepare(request) for request in requests]
        images: list[np.ndarray | None] = [None] * len(requests)
        by_negative: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_negative.setdefault(request.negative_prompt, []).append(index)
        pipeline = self.base.pipeline  # type: ignore[attr-defined]
        for negative, indices in by_negative.items():
            for start in range(0, len(indices), settings.batch_size):
                chunk = indices[start : start + settings.batch_size]
                guided = settings.guidance_scale > 1
                call = image_prompt_call(
                    [prepared[i][1] for i in chunk], guided, self.granularity, positions=[prepared[i][2] for i in chunk]
                )
                call.text_stream, call.scale = self.text_stream, self.scale
                products = any(prepared[i][1] for i in chunk)  # none: the base's own render, no injection
                pixels = pipeline.sample(
                    [prepared[i][0] for i in chunk],
                    seeds=[requests[i].seed for i in chunk],
                    steps=settings.steps,
                    guidance=settings.guidance_scale,
                    joint_attention_kwargs={"image_prompt": call.to(pipeline.device, pipeline.dtype)}
                    if products
                    else None,
                    negative_prompt=negative,
                )
                arrays = pixels.permute(0, 2, 3, 1).float().cpu().numpy()
                for i, array in zip(chunk, arrays, strict=True):
                    images[i] = (array * 255).round().astype(np.uint8)
        return [image for image in images if image is not None]
