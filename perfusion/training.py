"""Train one concept (paper sec. 4.4): train_concept(base, images, token, superclass, config) -> Concept.

Trainable: the concept token's embedding row (AdamW lr 0.006) and o*_V for every cross-attention layer
(lr 0.03, initialised to W_V i_super). Frozen: everything else, so the base weights are bit-identical
afterwards; o*_K = W_K i_super is never a parameter (key locking). i* starts at i_super and follows an EMA
of the concept token's encodings, i* <- 0.99 i* + 0.01 mean_b(e_concept[b]), with no gradient. The loss is
the standard noise-prediction MSE with Gaussian noise, weighted per pixel by an optional soft foreground
mask normalised by its per-image max. The forward pass is the same gated edit as inference (eq. 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from perfusion.attention import PerfusionCall, install_processors
from perfusion.concept import DEFAULT_BETA, DEFAULT_TAU, Concept
from perfusion.corpus import NEUTRAL_TEMPLATES
from perfusion.covariance import Covariance, estimate_covariance
from perfusion.errors import TrainingError
from perfusion.models import BaseModel
from perfusion.tokens import (
    add_concept_token,
    concept_embedding_table,
    remove_concept_token,
    superclass_embedding,
    superclass_token_ids,
)

ImageInput = Image.Image | str | os.PathLike[str] | np.ndarray


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400  # paper: at most 400 (210 on average)
    batch_size: int = 16  # paper: 16 images per optimizer step
    grad_accumulation: int = 1  # micro-batch = batch_size / grad_accumulation (same result, less memory)
    lr_value: float = 0.03  # o*_V (paper)
    lr_embedding: float = 0.006  # the concept token's embedding (paper)
    weight_decay: float = 0.0  # AdamW; decay would pull o*_V and the embedding toward zero
    train_beta: float = 0.75  # training-time gate (paper: b=0.75, T=0.1)
    train_tau: float = 0.1
    inference_beta: float = DEFAULT_BETA  # written into the concept as its default gate
    inference_tau: float = DEFAULT_TAU
    ema_decay: float = 0.99  # i* <- decay * i* + (1 - decay) * mean concept encoding
    resolution: int | None = None  # None: the base model's native size
    flip_probability: float = 0.5  # horizontal flips; set 0 for asymmetric concepts
    select_every: int = 25  # step-selection cadence (paper: every 25 steps)
    lock_keys: bool = True  # False: the "trained keys" ablation, o*_K trained like o*_V
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; or "no", "fp16", "bf16"
    seed: int = 0
    templates: tuple[str, ...] = NEUTRAL_TEMPLATES

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append("steps must be >= 1")
        if self.batch_size < 1 or self.grad_accumulation < 1 or self.batch_size % self.grad_accumulation:
            problems.append("batch_size must be a positive multiple of grad_accumulation")
        if self.lr_value <= 0 or self.lr_embedding <= 0:
            problems.append("learning rates must be > 0")
        if not 0 <= self.flip_probability <= 1:
            problems.append("flip_probability must be in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            problems.append("ema_decay must be in [0, 1)")
        if self.train_tau <= 0 or self.inference_tau <= 0:
            problems.append("gate temperatures (tau) must be > 0")
        if self.mixed_precision not in {"auto", "no", "fp16", "bf16"}:
            problems.append("mixed_precision must be one of auto, no, fp16, bf16")
        if not self.templates or any("{}" not in t for t in self.templates):
            problems.append("templates must be non-empty and each contain '{}' for the concept")
        if problems:
            raise TrainingError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if masks is not None and len(masks) != len(images):
        raise TrainingError(f"concept {token!r}: {len(masks)} masks for {len(images)} images; give one per image")
    device = base.device
    covariance = covariance or estimate_covariance(base)
    resolution = config.resolution or base.resolution
    pixels = torch.stack([_load_image(img, resolution, token, i) for i, img in enumerate(images)])
    weights = None
    if masks is not None:
        weights = torch.stack([_load_mask(m, resolution, token, i) for i, m in enumerate(masks)])
    latents = _encode_latents(base, pixels.to(device))  # (mean, std) for [originals, flipped]
    latent_size = latents[0].shape[-1]
    if weights is not None:
        weights = _mask_weights(weights, latent_size).to(device)  # (n, 1, h, w), max 1 per image

    superclass_token_ids(base.tokenizer, superclass)  # fail early on an empty superclass
    install_processors(base.unet)
    init_embedding = superclass_embedding(base.tokenizer, base.text_encoder, superclass).to(device)
    token_id = add_concept_token(base.tokenizer, base.text_encoder, token, init_embedding)
    try:
        return _train(base, config, covariance, token, token_id, superclass, latents, weights, on_step, scorer)
    finally:
        remove_concept_token(base.tokenizer, base.text_encoder, token)


def _train(
    base: BaseModel,
    config: TrainConfig,
    covariance: Covariance,
    token: str,
    token_id: int,
    superclass: str,
    latents: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor | None,
    on_step: Callable[[StepInfo], None] | None,
    scorer: Scorer | None,
) -> Concept:
    device, unet, text_encoder = base.device, base.unet, base.text_encoder
    layers = base.cross_attention_layers()
    i_super = superclass_input(base, superclass, config.templates)  # (d,)

    # The trainable state, held in a Concept so the processor reads exactly what will be saved.
    embedding = torch.nn.Parameter(concept_embedding_table(text_encoder).concept_vectors[token_id].clone())
    concept_embedding_table(text_encoder).concept_vectors[token_id] = embedding
    values = {n: torch.nn.Parameter((layer.to_v.weight.float() @ i_super).detach()) for n, layer in layers.items()}
    keys = None
    if not config.lock_keys:
        keys = {n: torch.nn.Parameter((layer.to_k.weight.float() @ i_super).detach()) for n, layer in layers.items()}
    state = Concept(
        token=token,
        superclass=superclass,
        embedding=embedding,
        target_input=i_super.clone(),  # i* starts at i_super (eq. EMA below)
        superclass_input=i_super,
        value_targets=values,
        key_targets=keys,
        fingerprint=base.fingerprint,
        beta=config.inference_beta,
        tau=config.inference_tau,
    )
    groups = [{"params": list(values.values()), "lr": config.lr_value}]
    groups.append({"params": [embedding], "lr": config.lr_embedding})
    if keys is not None:
        groups.append({"params": list(keys.values()), "lr": config.lr_value})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    rng = random.Random(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    micro_batch = config.batch_size // config.grad_accumulation
    gate = {token: (config.train_beta, config.train_tau)}
    scheduler = base.pipeline.scheduler
    autocast = _autocast(device, config.mixed_precision)
    losses: list[float] = []
    best: tuple[float, int, Concept] | None = None
    started = time.perf_counter()

    for step in range(1, config.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.grad_accumulation):
            picks = [rng.randrange(len(latents[0]) // 2) for _ in range(micro_batch)]
            flips = [rng.random() < config.flip_probability for _ in range(micro_batch)]
            rows = torch.tensor([p + (len(latents[0]) // 2 if f else 0) for p, f in zip(picks, flips, strict=True)])
            mean, std = latents[0][rows], latents[1][rows]
            clean = (mean + std * torch.randn(mean.shape, generator=generator, device=device)) * _scaling(base)
            noise = torch.randn(clean.shape, generator=generator, device=device)  # Gaussian (eq. of DDPM)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (micro_batch,), generator=generator, device=device
            )
            noisy = scheduler.add_noise(clean, noise, timesteps)
            prompts = [rng.choice(config.templates).format(token) for _ in range(micro_batch)]
            ids = base.tokenizer(
                prompts,
                padding="max_length",
                max_length=base.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            with autocast:
                encodings = text_encoder(ids)[0]  # (b, m, d), grad flows to the embedding row only
                call = PerfusionCall.build(
                    [[state]] * micro_batch, covariance, overrides=[gate] * micro_batch, device=device
                )
                prediction = unet(noisy, timesteps, encodings, cross_attention_kwargs={"perfusion": call}).sample
            target = (
                noise
                if scheduler.config.prediction_type == "epsilon"
                else scheduler.get_velocity(clean, noise, timesteps)
            )
            squared = (prediction.float() - target.float()) ** 2  # (b, c, h, w)
            if weights is not None:
                squared = squared * _pick_weights(weights, picks, flips)  # (b, 1, h, w) soft mask
            loss = squared.mean() / config.grad_accumulation
            loss.backward()
            step_loss += float(loss.detach())
            _update_target_input(state, encodings.detach(), ids, token_id, config.ema_decay)
        optimizer.step()
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise TrainingError(f"concept {token!r}: loss became {step_loss} at step {step}; lower the learning rates")
        if on_step is not None:
            on_step(StepInfo(step, config.steps, step_loss, time.perf_counter() - started))
        if scorer is not None and (step % config.select_every == 0 or step == config.steps):
            snapshot = _snapshot(state)
            score = scorer(snapshot, step)
            if best is None or score > best[0]:
                best = (score, step, snapshot)

    selected_step, result = (config.steps, _snapshot(state)) if best is None else (best[1], best[2])
    result.metadata = {
        "train_config": config.to_dict(),
        "loss": _loss_summary(losses),
        "selected_step": selected_step,
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(device),
    }
    return result


@torch.no_grad()
def superclass_input(base: BaseModel, superclass: str, templates: Sequence[str]) -> torch.Tensor:
    """i_super (d,): the text-encoder output at the superclass phrase's last token, averaged over the
    neutral templates filled with the superclass ("a photo of a backpack", ...)."""
    phrase = superclass_token_ids(base.tokenizer, superclass)
    prompts = [t.format(superclass) for t in templates]
    ids = base.tokenizer(
        prompts,
        padding="max_length",
        max_length=base.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
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


def _update_target_input(
    state: Concept, encodings: torch.Tensor, ids: torch.Tensor, token_id: int, decay: float
) -> None:
    """EMA of i* (paper sec. 4.4): i* <- decay * i* + (1 - decay) * mean_b(e_concept[b]). No gradient."""
    at_token = ids == token_id  # (b, m)
    if bool(at_token.any()):
        mean = encodings[at_token].float().mean(0).to(state.target_input.device)  # (d,)
        state.target_input = decay * state.target_input + (1 - decay) * mean


def _load_image(image: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(3, r, r) in [-1, 1]: shorter side resized to r (bicubic), then center-cropped."""
    picture = _open(image, token, index, "RGB")
    array = np.asarray(_resize_crop(picture, resolution, Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def _load_mask(mask: ImageInput, resolution: int, token: str, index: int) -> torch.Tensor:
    """(1, r, r) in [0, 1], same geometry as the image."""
    picture = _open(mask, token, index, "L", kind="mask")
    array = np.asarray(_resize_crop(picture, resolution, Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(array)[None] / 255.0


def _open(image: ImageInput, token: str, index: int, mode: str, kind: str = "image") -> Image.Image:
    try:
        if isinstance(image, Image.Image):
            picture = image
        elif isinstance(image, np.ndarray):
            picture = Image.fromarray(image)
        else:
            with Image.open(image) as opened:
                opened.load()
                picture = opened.copy()
        return picture.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as error:
        label = image if isinstance(image, str | os.PathLike) else f"#{index}"
        raise TrainingError(
            f"concept {token!r}: {kind} {label} cannot be decoded ({error}); replace or remove it"
        ) from error


def _resize_crop(picture: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    scale = size / min(picture.size)
    resized = picture.resize(
        (max(size, round(picture.width * scale)), max(size, round(picture.height * scale))), resample
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


@torch.no_grad()
def _encode_latents(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of [images, horizontally flipped images]: (2n, c, h, w) each.
    Flipped copies are encoded, not flipped in latent space (the VAE is not flip-equivariant)."""
    both = torch.cat([pixels, pixels.flip(-1)]).to(base.pipeline.vae.dtype)
    means, stds = [], []
    for chunk in both.split(8):
        posterior = base.pipeline.vae.encode(chunk).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


def _mask_weights(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(n, 1, h, w) loss weights at latent resolution, each normalised by its own max (paper sec. 4.4)."""
    small = F.interpolate(masks, size=(latent_size, latent_size), mode="area")
    peak = small.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 0, small / peak.clamp_min(1e-8), torch.ones_like(small))


def _pick_weights(weights: torch.Tensor, picks: list[int], flips: list[bool]) -> torch.Tensor:
    return torch.stack([weights[p].flip(-1) if f else weights[p] for p, f in zip(picks, flips, strict=True)])


def _scaling(base: BaseModel) -> float:
    return float(getattr(base.pipeline.vae.config, "scaling_factor", 0.18215))


def _autocast(device: torch.device, mode: str):  # type: ignore[no-untyped-def]
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


def _loss_summary(losses: list[float]) -> dict[str, float]:
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
    pixels = torch.stack([_load_image(img, resolution, concept.token, i) for i, img in enumerate(images)])
    mean, std = _encode_latents(base, pixels.to(base.device))
    generator = torch.Generator(device=base.device).manual_seed(seed)
    rows = torch.arange(samples) % len(images)  # unflipped originals only
    clean = mean[rows] + std[rows] * torch.randn(mean[rows].shape, generator=generator, device=base.device)
    clean = clean * _scaling(base)
    noise = torch.randn(clean.shape, generator=generator, device=base.device)
    scheduler = base.pipeline.scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (samples,), generator=generator, device=base.device
    )
    install_processors(base.unet)
    token_id = add_concept_token(base.tokenizer, base.text_encoder, concept.token, concept.embedding.to(base.device))
    try:
        ids = base.tokenizer(
            [template.format(concept.token)] * samples,
            padding="max_length",
            max_length=base.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        encodings = base.text_encoder(ids.to(base.device))[0]
        call = PerfusionCall.build([[concept]] * samples, covariance, device=base.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = base.unet(noisy, timesteps, encodings, cross_attention_kwargs={"perfusion": call}).sample
        target = (
            noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
        )
        del token_id
        return float(F.mse_loss(prediction.float(), target.float()))
    finally:
        remove_concept_token(base.tokenizer, base.text_encoder, concept.token)
