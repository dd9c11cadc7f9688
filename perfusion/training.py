"""Train one concept (paper sec. 4.4): train_concept(base, images, token, superclass, config) -> Concept.

Trainable: the concept token's embedding row (AdamW lr 0.006) and o*_V for every cross-attention layer
(lr 0.03, initialised to W_V i_super). Frozen: everything else, so the base weights are bit-identical
afterwards; o*_K = W_K i_super is never a parameter (key locking). i* starts at i_super and follows an EMA
of the concept token's encodings, i* <- 0.99 i* + 0.01 mean_b(e_concept[b]), with no gradient. The loss is
the standard noise-prediction MSE with Gaussian noise, weighted per pixel by an optional soft foreground
mask normalised by its per-image max. The forward pass is the same gated edit as inference (eq. 3).
After each step the embedding row is projected back to at most 1.5x the superclass word's norm (not in the
paper): on the toy model an unbounded row grew to 3.4x and the small causal text encoder then garbled the
words after it (striped-square's text alignment 19%; capped 62%). Both rates are constant (the paper) or
follow a cosine to 0 (`lr_schedule="cosine"`), which lets the last steps settle on one look. Optionally the
saved concept is the mean of the trained tensors over the last steps (`average_tail`, tail averaging).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from perfusion.attention import PerfusionCall, install_processors
from perfusion.concept import Concept
from perfusion.config import TrainConfig
from perfusion.covariance import Covariance, estimate_covariance
from perfusion.errors import TrainingError
from perfusion.images import ImageInput, load_image, mask_weights, pick_weights, training_pixels
from perfusion.models import BaseModel
from perfusion.tokens import (
    concept_embedding_table,
    superclass_embedding,
    superclass_token_ids,
    temporary_concept_token,
)


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based optimizer step
    steps: int
    loss: float
    seconds: float  # since training started


Scorer = Callable[[Concept, int], float]  # (snapshot, step) -> higher is better


def train_concept(
    base: BaseModel,
    images: Sequence[ImageInput],
    token: str,
    superclass: str,
    config: TrainConfig = TrainConfig(),
    *,
    masks: Sequence[ImageInput] | None = None,
    covariance: Covariance | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    scorer: Scorer | None = None,
) -> Concept:
    """Learn one concept from a few images. Leaves `base` as it found it (weights and token table)."""
    if not images:
        raise TrainingError(f"concept {token!r}: no training images")
    resolution = config.resolution or base.resolution
    if (wrong := base.resolution_problem(resolution)) is not None:
        raise TrainingError(f"concept {token!r}: resolution {wrong}")
    # resolved here, so the concept's metadata records the prompts it learned from
    config = dataclasses.replace(config, templates=training_templates(base, config))
    device = base.device
    covariance = covariance or estimate_covariance(base)
    pixels, weights = training_pixels(list(images), None if masks is None else list(masks), resolution, token)
    latents = encode_latents(base, pixels.to(device))  # (mean, std) for [originals, flipped]
    latent_size = latents[0].shape[-1]
    if weights is not None:
        weights = mask_weights(weights, latent_size).to(device)  # (n, 1, h, w), max 1 per image

    state = initial_concept(base, token, superclass, config)  # fails early on an unusable superclass
    install_processors(base.unet)
    with temporary_concept_token(base.tokenizer, base.text_encoder, token, state.embedding) as token_id:
        return _train(base, config, covariance, state, token_id, latents, weights, on_step, scorer)


def training_templates(base: BaseModel, config: TrainConfig) -> tuple[str, ...]:
    """The prompts a concept is trained in ("{}" is its token): the config's, else the base model's own."""
    return config.templates or base.templates


def initial_concept(base: BaseModel, token: str, superclass: str, config: TrainConfig = TrainConfig()) -> Concept:
    """The concept before step 1: embedding = superclass embedding, i* = i_super, o*_V = W_V i_super
    (and o*_K = W_K i_super, trained only when config.lock_keys is False). float32 on the base's device."""
    i_super = superclass_input(base, superclass, training_templates(base, config))  # (d,)
    # Textual inversion edits no layer: the concept is its embedding row alone.
    layers = base.cross_attention_layers() if config.method == "perfusion" else {}
    return Concept(
        token=token,
        superclass=superclass,
        embedding=superclass_embedding(base.tokenizer, base.text_encoder, superclass).to(base.device),
        target_input=i_super.clone(),
        superclass_input=i_super,
        value_targets={name: (layer.to_v.weight.float() @ i_super).detach() for name, layer in layers.items()},
        key_targets=None
        if config.lock_keys or not layers
        else {name: (layer.to_k.weight.float() @ i_super).detach() for name, layer in layers.items()},
        fingerprint=base.fingerprint,
        beta=config.inference_beta,
        tau=config.inference_tau,
        method=config.method,
    )


def _train(
    base: BaseModel,
    config: TrainConfig,
    covariance: Covariance,
    state: Concept,
    token_id: int,
    latents: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor | None,
    on_step: Callable[[StepInfo], None] | None,
    scorer: Scorer | None,
) -> Concept:
    device, unet, text_encoder = base.device, base.unet, base.text_encoder
    scheduler = noise_schedule(base)
    # The trainable tensors live inside `state`, so the processor reads exactly what will be saved.
    # Trainable: the embedding row and o*_V (and o*_K only in the trained-keys ablation). Nothing else.
    state.embedding = torch.nn.Parameter(state.embedding.clone())
    cap = config.embedding_norm_cap
    norm_limit = None if cap is None else cap * float(state.embedding.detach().norm())  # x the superclass's norm
    concept_embedding_table(text_encoder).concept_vectors[token_id] = state.embedding
    state.value_targets = {n: torch.nn.Parameter(v.clone()) for n, v in state.value_targets.items()}
    groups = [{"params": [state.embedding], "lr": config.lr_embedding}]
    if state.value_targets:
        groups.append({"params": list(state.value_targets.values()), "lr": config.lr_value})
    if state.key_targets is not None:
        state.key_targets = {n: torch.nn.Parameter(k.clone()) for n, k in state.key_targets.items()}
        groups.append({"params": list(state.key_targets.values()), "lr": config.lr_value})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    schedule = None
    if config.lr_schedule == "cosine":  # step k (1-based) runs at 0.5 (1 + cos(pi (k - 1) / steps)) x the rate
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)

    rng = random.Random(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batch, micro = config.batch_size, config.batch_size // config.grad_accumulation
    gate = {state.token: (config.train_beta, config.train_tau)}
    autocast = autocast_for(device, config.mixed_precision)
    losses: list[float] = []
    best: tuple[float, int, Concept] | None = None
    tail = _TailAverage(first_step=config.steps - int(config.average_tail * config.steps) + 1)
    started = time.perf_counter()

    templates = training_templates(base, config)
    for step in range(1, config.steps + 1):
        drawn = draw_batch(base, scheduler, latents, weights, templates, state.token, config, rng, generator)
        noisy, timesteps, target, pixel_weights = drawn.noisy, drawn.timesteps, drawn.target, drawn.pixel_weights
        ids = tokenize_prompts(base, drawn.prompts).to(device)  # (batch, m)

        optimizer.zero_grad(set_to_none=True)
        step_loss, concept_encodings = 0.0, []
        # i* changes once per step (after all micro-batches), so one call serves every micro-batch.
        call = PerfusionCall.build([[state]] * micro, covariance, overrides=[gate] * micro, device=device)
        for part in torch.arange(batch).split(micro):
            with autocast:
                encodings = text_encoder(ids[part])[0]  # (micro, m, d); grad reaches the embedding row only
                prediction = unet(
                    noisy[part].to(unet.dtype), timesteps[part], encodings, cross_attention_kwargs={"perfusion": call}
                ).sample
            squared = (prediction.float() - target[part].float()) ** 2  # (micro, c, h, w)
            if pixel_weights is not None:
                squared = squared * pixel_weights[part]  # soft foreground mask, max 1 per image
            loss = squared.mean() * (len(part) / batch)  # parts sum to the full-batch mean
            loss.backward()
            step_loss += float(loss.detach())
            concept_encodings.append(encodings.detach()[ids[part] == token_id].float())
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if norm_limit is not None:
            with torch.no_grad():  # project back onto the ball: the word-like norms the encoder knows
                state.embedding.mul_((norm_limit / state.embedding.norm()).clamp(max=1.0))  # no host sync
        _update_target_input(state, torch.cat(concept_encodings), config.ema_decay)
        tail.add(step, state)
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"concept {state.token!r}: loss became {step_loss} at step {step}; lower the learning rates"
            )
        if on_step is not None:
            on_step(StepInfo(step, config.steps, step_loss, time.perf_counter() - started))
        if scorer is not None and (step % config.select_every == 0 or step == config.steps):
            snapshot = tail.snapshot(state)
            score = scorer(snapshot, step)
            if best is None or score > best[0]:
                best = (score, step, snapshot)

    selected_step, result = (config.steps, tail.snapshot(state)) if best is None else (best[1], best[2])
    result.metadata = {
        "train_config": config.to_dict(),
        "loss": loss_summary(losses),
        "selected_step": selected_step,
        "selected_score": None if best is None else best[0],  # the scorer's value at that step
        # No wall-clock time here (the index row has the attempt's): same inputs, same file, byte for byte.
        "device": str(device),
    }
    return result


@dataclass(frozen=True)
class DenoisingBatch:
    """One optimizer step's training examples (every method's): noised latents and what the UNet must predict."""

    noisy: torch.Tensor  # (batch, c, h, w)
    timesteps: torch.Tensor  # (batch,)
    target: torch.Tensor  # (batch, c, h, w): the noise, or the velocity
    pixel_weights: torch.Tensor | None  # (batch, 1, h, w) soft foreground mask, max 1 per image; None: no masks
    prompts: list[str]


def draw_batch(
    base: BaseModel,
    scheduler: DDPMScheduler,
    latents: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor | None,
    templates: Sequence[str],
    subject: str,
    config: TrainConfig,
    rng: random.Random,
    generator: torch.Generator,
) -> DenoisingBatch:
    """Pick images (and flips), prompts (templates filled with `subject`), latent samples, Gaussian noise and
    timesteps for a full batch. All of a step's randomness is drawn here for the full batch, then split into
    micro-batches, so gradient accumulation computes the same update as one big batch."""
    batch, device = config.batch_size, base.device
    originals = len(latents[0]) // 2  # latents hold [originals, flipped originals]
    picks = [rng.randrange(originals) for _ in range(batch)]
    flips = [rng.random() < config.flip_probability for _ in range(batch)]
    prompts = [rng.choice(templates).format(subject) for _ in range(batch)]
    rows = torch.tensor([p + (originals if f else 0) for p, f in zip(picks, flips, strict=True)])
    mean, std = latents[0][rows], latents[1][rows]  # (batch, c, h, w)
    clean = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * latent_scaling(base)
    noise = torch.randn(clean.shape, generator=generator, device=device)  # Gaussian, never uniform
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
    return DenoisingBatch(
        noisy=scheduler.add_noise(clean, noise, timesteps),
        timesteps=timesteps,
        target=denoising_target(scheduler, clean, noise, timesteps),
        pixel_weights=pick_weights(weights, picks, flips) if weights is not None else None,
        prompts=prompts,
    )


def noise_schedule(base: BaseModel) -> DDPMScheduler:
    """The forward (noising) process of the base model's training: DDPM with the pipeline scheduler's betas.
    Not the pipeline's own scheduler: a sampler such as Euler scales noise by sigma in add_noise, and
    set_timesteps() from an earlier render changes its state."""
    return DDPMScheduler.from_config(base.pipeline.scheduler.config)


def denoising_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """What the UNet predicts: the noise (epsilon) or the velocity (v-prediction, SD2.x 768)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise TrainingError(f"prediction_type {scheduler.config.prediction_type!r} is not supported")


def tokenize_prompts(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    tokenizer = base.tokenizer
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def superclass_input(base: BaseModel, superclass: str, templates: Sequence[str]) -> torch.Tensor:
    """i_super (d,): the text-encoder output at the superclass phrase's last token, averaged over the
    neutral templates filled with the superclass ("a photo of a backpack", ...)."""
    phrase = superclass_token_ids(base.tokenizer, superclass)
    prompts = [t.format(superclass) for t in templates]
    ids = tokenize_prompts(base, prompts)
    encodings = base.text_encoder(ids.to(base.device))[0].float()  # (n, m, d)
    picked = []
    for row, prompt_ids in enumerate(ids.tolist()):
        position = _last_occurrence(prompt_ids, phrase)
        if position is not None:
            picked.append(encodings[row, position])
    if not picked:
        raise TrainingError(f"superclass {superclass!r} does not survive tokenization inside the templates")
    return torch.stack(picked).mean(0)


def _last_occurrence(sequence: list[int], phrase: list[int]) -> int | None:
    """Index of the last token of the last occurrence of `phrase` in `sequence`."""
    for start in range(len(sequence) - len(phrase), -1, -1):
        if sequence[start : start + len(phrase)] == phrase:
            return start + len(phrase) - 1
    return None


def _update_target_input(state: Concept, concept_encodings: torch.Tensor, decay: float) -> None:
    """EMA of i* (paper sec. 4.4): i* <- decay * i* + (1 - decay) * mean_b(e_concept[b]). No gradient.
    concept_encodings (n, d): the encoder outputs at the concept token across the step's batch."""
    if len(concept_encodings):
        mean = concept_encodings.mean(0).to(state.target_input.device)
        state.target_input = decay * state.target_input + (1 - decay) * mean


@torch.no_grad()
def encode_latents(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of [images, horizontally flipped images]: (2n, c, h, w) each.
    Flipped copies are encoded, not flipped in latent space (the VAE is not flip-equivariant)."""
    both = torch.cat([pixels, pixels.flip(-1)]).to(base.pipeline.vae.dtype)
    means, stds = [], []
    for chunk in both.split(8):
        posterior = base.pipeline.vae.encode(chunk).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def latent_scaling(base: BaseModel) -> float:
    return float(getattr(base.pipeline.vae.config, "scaling_factor", 0.18215))


def autocast_for(device: torch.device, mode: str):  # type: ignore[no-untyped-def]
    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _snapshot(state: Concept) -> Concept:
    """A detached float32 CPU copy of the training state."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone()

    return dataclasses.replace(
        state,
        embedding=copy(state.embedding),
        target_input=copy(state.target_input),
        superclass_input=copy(state.superclass_input),
        value_targets={n: copy(v) for n, v in state.value_targets.items()},
        key_targets=None if state.key_targets is None else {n: copy(k) for n, k in state.key_targets.items()},
        metadata={},
    )


class _TailAverage:
    """The running mean of a concept's trained tensors from `first_step` on (steps before it are not kept)."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.count = 0
        self.sums: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, step: int, state: Concept) -> None:
        if step < self.first_step:
            return
        self.count += 1
        for key, tensor in _trained_tensors(state).items():
            value = tensor.detach().float()
            self.sums[key] = self.sums[key].add_(value) if key in self.sums else value.clone()

    def snapshot(self, state: Concept) -> Concept:
        """A CPU float32 copy of the state, its trained tensors replaced by their tail mean (once the tail began)."""
        copy = _snapshot(state)
        if not self.count:
            return copy
        mean = {key: (total / self.count).cpu() for key, total in self.sums.items()}
        copy.embedding, copy.target_input = mean[("embedding", "")], mean[("target_input", "")]
        copy.value_targets = {name: mean[("value", name)] for name in copy.value_targets}
        if copy.key_targets is not None:
            copy.key_targets = {name: mean[("key", name)] for name in copy.key_targets}
        return copy


def _trained_tensors(state: Concept) -> dict[tuple[str, str], torch.Tensor]:
    """(kind, layer name) -> every tensor training changes: the embedding row, i*, o*_V (and o*_K if trained)."""
    tensors = {("embedding", ""): state.embedding, ("target_input", ""): state.target_input}
    tensors.update({("value", n): v for n, v in state.value_targets.items()})
    tensors.update({("key", n): k for n, k in (state.key_targets or {}).items()})
    return tensors


def loss_summary(losses: list[float]) -> dict[str, float]:
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "mean_last_10pct": sum(tail) / len(tail),
        "steps": float(len(losses)),
    }


@torch.no_grad()
def denoising_loss(
    base: BaseModel,
    concept: Concept,
    images: Sequence[ImageInput],
    covariance: Covariance,
    *,
    samples: int = 32,
    seed: int = 1234,
    template: str = "a photo of a {}",
) -> float:
    """Noise-prediction MSE of `concept` on `images` with FIXED noise, timesteps and prompt: a comparable
    number before and after training (the per-step training loss is too noisy to compare)."""
    resolution = base.resolution
    pixels = torch.stack([load_image(img, resolution, concept.token, i) for i, img in enumerate(images)])
    mean, std = encode_latents(base, pixels.to(base.device))
    generator = torch.Generator(device=base.device).manual_seed(seed)
    rows = torch.arange(samples) % len(images)  # unflipped originals only
    clean = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator, device=base.device)
    clean = clean * latent_scaling(base)
    noise = torch.randn(clean.shape, generator=generator, device=base.device)
    scheduler = noise_schedule(base)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (samples,), generator=generator, device=base.device
    )
    install_processors(base.unet)
    embedding = concept.embedding.to(base.device)
    with temporary_concept_token(base.tokenizer, base.text_encoder, concept.token, embedding):
        ids = tokenize_prompts(base, [template.format(concept.token)] * samples)
        encodings = base.text_encoder(ids.to(base.device))[0]
        call = PerfusionCall.build([[concept]] * samples, covariance, device=base.device)
        noisy = scheduler.add_noise(clean, noise, timesteps).to(base.unet.dtype)
        prediction = base.unet(noisy, timesteps, encodings, cross_attention_kwargs={"perfusion": call}).sample
        target = denoising_target(scheduler, clean, noise, timesteps)
        return float(F.mse_loss(prediction.float(), target.float()))
