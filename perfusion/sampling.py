"""Rendering with concepts: attach any number to a diffusers pipeline, render prompts with per-row sets.

    renderer = ConceptRenderer(base, covariance)
    renderer.attach(load_concept("backpack.safetensors", base))
    images = renderer.render([RenderRequest("a photo of <backpack> on the beach", seed=3)])

Each request carries its own concept set (by default: the attached concept tokens found in its prompt),
seed and beta/tau overrides. Concepts of either method attach: Perfusion's (a gated rank-1 edit of K and V,
applied per encoding: PerfusionCall) and residual ones (low-rank proj_out residuals, applied per row where
the concept is attended to: ResidualCall). Rows with different sets render together in one batch, never by
merging weights, so a mixed batch gives the same images as rendering each row alone. A residual concept's
token is followed by its macro class in the prompt it renders ("<sku> backpack"), as it was trained.
The denoising loop is diffusers' own StableDiffusionPipeline, fed prompt_embeds and cross_attention_kwargs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from perfusion.attention import CONFINEMENTS, PerfusionCall, install_processors
from perfusion.attention_maps import CrossAttentionMaps
from perfusion.concept import Concept, check_compatible
from perfusion.covariance import Covariance
from perfusion.errors import RenderError
from perfusion.models import BaseModel
from perfusion.rank1 import gate, similarity
from perfusion.residual_layers import ResidualCall, install_residual_hooks
from perfusion.residuals import ResidualConcept, check_residual_compatible
from perfusion.tokens import (
    add_concept_token,
    prompt_tokens,
    remove_concept_token,
    substitute_superclass,
    superclass_token_ids,
)

logger = logging.getLogger(__name__)
AnyConcept = Concept | ResidualConcept  # what a renderer attaches: a concept of either method


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    seed: int = 0
    concepts: tuple[str, ...] | None = None  # concept tokens; None: the attached tokens in the prompt
    negative_prompt: str = ""
    gates: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # token -> (beta, tau)


@dataclass(frozen=True)
class RenderSettings:
    steps: int = 25
    guidance_scale: float = 5.0
    height: int | None = None  # None: the base model's native size
    width: int | None = None
    lock: str = "local"  # "local" or "global" key locking (global: richer scenes, use beta 0.4-0.6)
    edit_positions: str = "all"  # attention.CONFINEMENTS: where each concept may edit the prompt
    exact_projection: bool = True  # False: the cheaper e - sum_k s_k(e) i*_k approximation
    batch_size: int = 8
    eta: float = 0.0  # DDIM eta; 0 is deterministic given the seed
    localized: bool = True  # residual concepts: LAG sampling (the residual only where the concept is attended)

    def __post_init__(self) -> None:
        if self.lock not in {"local", "global"}:
            raise RenderError(f"lock must be 'local' or 'global', not {self.lock!r}")
        if self.edit_positions not in CONFINEMENTS:
            raise RenderError(f"edit_positions must be one of {CONFINEMENTS}, not {self.edit_positions!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise RenderError("steps and batch_size must be >= 1")


class ConceptRenderer:
    """A base pipeline with Perfusion processors installed and a set of attached concepts."""

    def __init__(self, base: BaseModel, covariance: Covariance) -> None:
        if covariance.fingerprint != base.fingerprint:
            raise RenderError(f"the covariance belongs to base model {covariance.fingerprint}, not {base.fingerprint}")
        self.base = base
        self.covariance = covariance
        self.concepts: dict[str, AnyConcept] = {}  # token -> concept, tensors on the base's device
        install_processors(base.unet)
        install_residual_hooks(base.unet)

    def attach(self, concept: AnyConcept) -> None:
        """Validate against the base model and register the token. Re-attaching a token replaces it."""
        device = self.base.device
        if isinstance(concept, ResidualConcept):
            check_residual_compatible(concept, self.base)
            superclass_token_ids(self.base.tokenizer, concept.superclass)
            on_device_residual = dataclasses.replace(
                concept,
                embedding=concept.embedding.float().to(device),
                up={n: a.float().to(device) for n, a in concept.up.items()},
                down={n: b.float().to(device) for n, b in concept.down.items()},
            )
            add_concept_token(self.base.tokenizer, self.base.text_encoder, concept.token, on_device_residual.embedding)
            self.concepts[concept.token] = on_device_residual
            return
        check_compatible(concept, self.base)
        superclass_token_ids(self.base.tokenizer, concept.superclass)
        on_device = dataclasses.replace(
            concept,
            embedding=concept.embedding.float().to(device),
            target_input=concept.target_input.float().to(device),
            superclass_input=concept.superclass_input.float().to(device),
            value_targets={n: v.float().to(device) for n, v in concept.value_targets.items()},
            key_targets=None
            if concept.key_targets is None
            else {n: k.float().to(device) for n, k in concept.key_targets.items()},
        )
        add_concept_token(self.base.tokenizer, self.base.text_encoder, concept.token, on_device.embedding)
        self.concepts[concept.token] = on_device

    def detach(self, token: str) -> None:
        self.concepts.pop(token, None)
        remove_concept_token(self.base.tokenizer, self.base.text_encoder, token)

    def render(
        self, requests: Sequence[RenderRequest], settings: RenderSettings = RenderSettings()
    ) -> list[Image.Image]:
        """Render every request (batched by settings.batch_size) as PIL images, in request order."""
        arrays = self.render_arrays(requests, settings)
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in arrays]

    def render_arrays(
        self,
        requests: Sequence[RenderRequest],
        settings: RenderSettings = RenderSettings(),
        attention_maps: CrossAttentionMaps | None = None,
    ) -> np.ndarray:
        """Render every request as float pixels: (n, h, w, 3) in [0, 1]. With `attention_maps`, the same passes
        also record where each prompt token draws the cross-attention (perfusion/attention_maps.py)."""
        rows = [self.concepts_for(request) for request in requests]  # validates everything before any work
        arrays = []
        for start in range(0, len(requests), settings.batch_size):
            stop = start + settings.batch_size
            if attention_maps is not None:
                attention_maps.begin_batch(start, len(requests[start:stop]), settings.guidance_scale > 1.0)
            arrays.append(self._render_batch(requests[start:stop], rows[start:stop], settings, attention_maps))
        if not arrays:
            return np.zeros((0, 0, 0, 3), dtype=np.float32)
        return np.concatenate(arrays)

    def concepts_for(self, request: RenderRequest) -> list[AnyConcept]:
        """The concepts a request uses, checked against what is attached."""
        found = self._tokens_in(request.prompt)
        self._tokens_in(request.negative_prompt)  # a concept token there must be attached too
        tokens = list(request.concepts) if request.concepts is not None else found
        unknown = [t for t in tokens if t not in self.concepts]
        if unknown:
            raise RenderError(
                f"prompt {request.prompt!r} uses concept(s) {unknown} that are not attached; attached: "
                f"{sorted(self.concepts)}"
            )
        bad_gates = [t for t in request.gates if t not in tokens]
        if bad_gates:
            raise RenderError(f"gate overrides for {bad_gates}, which the prompt {request.prompt!r} does not use")
        ungated = [t for t in request.gates if isinstance(self.concepts[t], ResidualConcept)]
        if ungated:
            raise RenderError(f"gate overrides for {ungated}: residual concepts have no gate (beta, tau); remove them")
        return [self.concepts[t] for t in dict.fromkeys(tokens)]

    def prompt_for(self, request: RenderRequest) -> str:
        """The prompt as rendered: each residual concept's token followed by its macro class, as in training
        ("<sku> backpack"), unless the prompt already says it."""
        prompt = request.prompt
        for concept in self.concepts_for(request):
            if isinstance(concept, ResidualConcept):
                token, word = re.escape(concept.token), re.escape(concept.superclass.strip())
                prompt = re.sub(rf"{token}(?!\s+{word}\b)", f"{concept.token} {concept.superclass.strip()}", prompt)
        return prompt

    def _tokens_in(self, prompt: str) -> list[str]:
        ids = self.base.tokenizer(prompt, add_special_tokens=False).input_ids
        vocab_size = self.base.tokenizer.vocab_size
        tokens = self.base.tokenizer.convert_ids_to_tokens([i for i in ids if i >= vocab_size])
        missing = [t for t in tokens if t not in self.concepts]
        if missing:
            raise RenderError(f"prompt {prompt!r} contains concept token(s) {missing} that are not attached")
        return list(dict.fromkeys(tokens))

    @torch.no_grad()
    def token_gates(self, request: RenderRequest) -> list[tuple[str, dict[str, float]]]:
        """Where each concept of a request acts: for every prompt token up to EOS, gate(s(e)) of eq. (3) per
        concept, with the request's gate overrides (the value path; local locking's key path too). The edit
        is not tied to the concept's token: any encoding close to i* in the C^-1 metric is edited, and one
        far from it (a concept token in a context it was never trained in) is not."""
        concepts = [c for c in self.concepts_for(request) if isinstance(c, Concept)]
        ids = self.base.tokenizer(request.prompt, truncation=True).input_ids  # BOS .. EOS, no padding
        encodings = self.base.text_encoder(torch.tensor([ids], device=self.base.device))[0][0].double()  # (m, d)
        c_inv = self.covariance.c_inv.to(encodings.device, torch.float64)
        values = {
            c.token: gate(
                similarity(encodings, c.target_input.double(), c_inv), *request.gates.get(c.token, (c.beta, c.tau))
            )
            for c in concepts
        }
        words = self.base.tokenizer.convert_ids_to_tokens(ids)
        return [(word, {token: float(v[k]) for token, v in values.items()}) for k, word in enumerate(words)]

    @torch.no_grad()
    def _render_batch(
        self,
        requests: Sequence[RenderRequest],
        concept_rows: list[list[AnyConcept]],
        settings: RenderSettings,
        attention_maps: CrossAttentionMaps | None = None,
    ) -> np.ndarray:
        base, device = self.base, self.base.device
        rows = [[c for c in row if isinstance(c, Concept)] for row in concept_rows]
        residual_rows = [[c for c in row if isinstance(c, ResidualConcept)] for row in concept_rows]
        positive_ids = self._tokenize([self.prompt_for(r) for r in requests])
        negative_ids = self._tokenize([r.negative_prompt for r in requests])
        positive = base.text_encoder(positive_ids.to(device))[0]  # (b, m, d)
        negative = base.text_encoder(negative_ids.to(device))[0]
        guided = settings.guidance_scale > 1.0  # diffusers' do_classifier_free_guidance
        # UNet batch order with guidance: [negative rows, positive rows]; both halves use the row's concepts.
        call_rows = rows + rows if guided else rows
        gates = [dict(r.gates) for r in requests]
        key_encodings = None
        if settings.lock == "global":
            positive_keys = self._superclass_encodings(positive_ids, positive, rows)
            key_encodings = torch.cat([negative, positive_keys]) if guided else positive_keys
        prompt_ids = None
        if settings.edit_positions != "all":  # the UNet batch's prompt ids, in its row order
            ids = torch.cat([negative_ids, positive_ids]) if guided else positive_ids
            token_ids = {c.token: self.base.tokenizer.convert_tokens_to_ids(c.token) for row in rows for c in row}
            prompt_ids = (ids, token_ids)
        call = PerfusionCall.build(
            call_rows,
            self.covariance,
            overrides=gates + gates if guided else gates,
            exact=settings.exact_projection,
            key_encodings=key_encodings,
            device=device,
            record_attention=attention_maps,
            confine=settings.edit_positions,
            prompt_ids=prompt_ids,
        )
        residual_call = self._residual_call(residual_rows, negative_ids, positive_ids, guided, settings.localized)
        generators = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
        result = base.pipeline(
            prompt_embeds=positive,
            negative_prompt_embeds=negative if guided else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height or base.resolution,
            width=settings.width or base.resolution,
            generator=generators,
            eta=settings.eta,
            output_type="np",
            cross_attention_kwargs={"perfusion": call, "residuals": residual_call},
        )
        return np.asarray(result.images, dtype=np.float32)

    def _residual_call(
        self,
        rows: list[list[ResidualConcept]],
        negative_ids: torch.Tensor,
        positive_ids: torch.Tensor,
        guided: bool,
        localized: bool,
    ) -> ResidualCall | None:
        """The residual concepts of the UNet batch ([negative rows, positive rows] with guidance); with LAG, each
        negative row takes its positive row's mask (the conditional half's map serves both halves)."""
        if not any(rows):
            return None
        count = len(rows)
        call_rows = rows + rows if guided else rows
        if not localized:
            return ResidualCall.build(call_rows, device=self.base.device)
        tokenizer = self.base.tokenizer
        phrases = {
            c.token: (int(tokenizer.convert_tokens_to_ids(c.token)), superclass_token_ids(tokenizer, c.superclass))
            for row in rows
            for c in row
        }
        ids = torch.cat([negative_ids, positive_ids]) if guided else positive_ids
        mask_rows = torch.arange(len(call_rows)) % count + (count if guided else 0)
        return ResidualCall.build(
            call_rows, prompt_ids=ids, token_phrases=phrases, mask_rows=mask_rows, device=self.base.device
        )

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.base.tokenizer
        for prompt in prompts:
            length = prompt_tokens(tokenizer, prompt)
            if length > tokenizer.model_max_length:
                logger.warning(
                    "prompt is %d tokens, longer than the text encoder's %d; it is truncated: %r",
                    length,
                    tokenizer.model_max_length,
                    prompt,
                )
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _superclass_encodings(
        self, ids: torch.Tensor, encodings: torch.Tensor, rows: list[list[Concept]]
    ) -> torch.Tensor:
        """Global locking's K-path input: encodings of each prompt with ITS concepts' words replaced by
        their superclass, gathered back to the concept prompt's positions. (b, m, d)"""
        tokenizer = self.base.tokenizer
        substituted, alignment = [], []
        for b, concepts in enumerate(rows):
            phrases = {
                int(tokenizer.convert_tokens_to_ids(c.token)): superclass_token_ids(tokenizer, c.superclass)
                for c in concepts
                if c.edits  # an embedding-only concept has no locked keys to read from the superclass
            }
            row_ids, row_alignment = substitute_superclass(
                ids[b : b + 1],
                phrases,
                tokenizer.model_max_length,
                int(tokenizer.pad_token_id),
                int(tokenizer.eos_token_id),
            )
            substituted.append(row_ids)
            alignment.append(row_alignment)
        keys = self.base.text_encoder(torch.cat(substituted).to(encodings.device))[0]  # (b, m, d)
        index = torch.cat(alignment).to(encodings.device)[..., None].expand(-1, -1, keys.shape[-1])
        return torch.gather(keys, 1, index)
