"""Train one residual concept (Ham et al. 2024; RESIDUALS.md): train_residual_concept(...) -> ResidualConcept.

Trainable: A_i, B_i of every transformer block's proj_out residual dW_i = A_i B_i (AdamW, lr_residual 1e-3;
rank ceil(residual_rank x channels)); the concept token's embedding row only with residual_train_embedding.
Frozen: the whole base model, text encoder included, so its weights are bit-identical afterwards.
Initialisation (not published): A = 0 and B uniform in +-1/sqrt(in) (the LoRA convention), so step 1 starts
at the base model; the token's row is a random vector of the vocabulary's mean norm, distinct from every
word. Prompts: the base's neutral templates filled with "<token> <macro class>" ("a photo of a V* backpack").
Loss: the plain noise-prediction MSE (per-pixel mask weights if masks are given), residuals applied at every
image position (LAG is a sampling-time rule). Batch sampling is Perfusion's (training.draw_batch).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence

import torch

from perfusion.config import TrainConfig
from perfusion.covariance import Covariance
from perfusion.errors import TrainingError
from perfusion.images import ImageInput, mask_weights, training_pixels
from perfusion.models import BaseModel
from perfusion.residual_layers import ResidualCall, install_residual_hooks
from perfusion.residuals import ResidualConcept, blocks_fingerprint, projection_shape, rank_for, transformer_blocks
from perfusion.tokens import concept_embedding_table, superclass_token_ids, temporary_concept_token, validate_token
from perfusion.training import (
    StepInfo,
    autocast_for,
    draw_batch,
    encode_latents,
    loss_summary,
    noise_schedule,
    tokenize_prompts,
    training_templates,
)


def train_residual_concept(
    base: BaseModel,
    images: Sequence[ImageInput],
    token: str,
    superclass: str,
    config: TrainConfig = TrainConfig.for_method(method="residuals"),
    *,
    masks: Sequence[ImageInput] | None = None,
    covariance: Covariance | None = None,  # the common trainer signature; residuals do not use C
    on_step: Callable[[StepInfo], None] | None = None,
    scorer: object = None,
) -> ResidualConcept:
    """Learn one residual concept from a few images. Leaves `base` as it found it (weights and token table)."""
    if config.method != "residuals":
        raise TrainingError(
            f"concept {token!r}: train_residual_concept needs method='residuals', not {config.method!r}"
        )
    if scorer is not None:
        raise TrainingError(f"concept {token!r}: step selection (training.select) is for Perfusion concepts only")
    if not images:
        raise TrainingError(f"concept {token!r}: no training images")
    validate_token(token, base.tokenizer)
    superclass_token_ids(base.tokenizer, superclass)  # fails early on an unusable macro class
    config = dataclasses.replace(config, templates=training_templates(base, config))
    device = base.device
    resolution = config.resolution or base.resolution
    if (wrong := base.resolution_problem(resolution)) is not None:
        raise TrainingError(f"concept {token!r}: resolution {wrong}")
    pixels, weights = training_pixels(list(images), None if masks is None else list(masks), resolution, token)
    latents = encode_latents(base, pixels.to(device))
    if weights is not None:
        weights = mask_weights(weights, latents[0].shape[-1]).to(device)
    state = initial_residual_concept(base, token, superclass, config)
    install_residual_hooks(base.unet)
    from perfusion.attention import install_processors  # attn2 must accept the `residuals` kwarg

    install_processors(base.unet)
    with temporary_concept_token(base.tokenizer, base.text_encoder, token, state.embedding) as token_id:
        return _train(base, config, state, token_id, latents, weights, on_step)


def initial_residual_concept(
    base: BaseModel, token: str, superclass: str, config: TrainConfig = TrainConfig.for_method(method="residuals")
) -> ResidualConcept:
    """The concept before step 1: A = 0 (so dW = 0), B uniform in +-1/sqrt(in), the token's row a random
    vector of the vocabulary's mean norm; float32 on the base's device, seeded by config.seed."""
    generator = torch.Generator().manual_seed(config.seed)
    table = base.text_encoder.get_input_embeddings().weight.detach().float()
    row = torch.randn(table.shape[1], generator=generator)
    row = row * (table.norm(dim=-1).mean().cpu() / row.norm())
    up, down = {}, {}
    for name, block in transformer_blocks(base.unet).items():
        out, inner = projection_shape(block)
        rank = rank_for(min(out, inner), config.residual_rank)
        up[name] = torch.zeros(out, rank)
        down[name] = (torch.rand(rank, inner, generator=generator) * 2 - 1) / math.sqrt(inner)
    device = base.device
    return ResidualConcept(
        token=token,
        superclass=superclass,
        embedding=row.to(device),
        up={n: a.to(device) for n, a in up.items()},
        down={n: b.to(device) for n, b in down.items()},
        fingerprint=base.fingerprint,
        blocks_fingerprint=blocks_fingerprint(base.unet),
    )


def _train(
    base: BaseModel,
    config: TrainConfig,
    state: ResidualConcept,
    token_id: int,
    latents: tuple[torch.Tensor, torch.Tensor],
    weights: torch.Tensor | None,
    on_step: Callable[[StepInfo], None] | None,
) -> ResidualConcept:
    device, unet, text_encoder = base.device, base.unet, base.text_encoder
    scheduler = noise_schedule(base)
    # The trainable tensors live inside `state`, so the hooks read exactly what will be saved.
    state.up = {n: torch.nn.Parameter(a.clone()) for n, a in state.up.items()}
    state.down = {n: torch.nn.Parameter(b.clone()) for n, b in state.down.items()}
    groups = [{"params": [*state.up.values(), *state.down.values()], "lr": config.lr_residual}]
    if config.residual_train_embedding:
        state.embedding = torch.nn.Parameter(state.embedding.clone())
        concept_embedding_table(text_encoder).concept_vectors[token_id] = state.embedding
        groups.append({"params": [state.embedding], "lr": config.lr_embedding})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    schedule = None
    if config.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    rng = random.Random(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    batch, micro = config.batch_size, config.batch_size // config.grad_accumulation
    autocast = autocast_for(device, config.mixed_precision)
    templates = training_templates(base, config)
    subject = f"{state.token} {state.superclass}"  # "a photo of a V* [macro class]"
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        drawn = draw_batch(base, scheduler, latents, weights, templates, subject, config, rng, generator)
        ids = tokenize_prompts(base, drawn.prompts).to(device)  # (batch, m)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        call = ResidualCall.build([[state]] * micro, device=device)  # every position: no LAG in training
        for part in torch.arange(batch).split(micro):
            with autocast:
                encodings = text_encoder(ids[part])[0]
                prediction = unet(
                    drawn.noisy[part].to(unet.dtype),
                    drawn.timesteps[part],
                    encodings,
                    cross_attention_kwargs={"residuals": call},
                ).sample
            squared = (prediction.float() - drawn.target[part].float()) ** 2
            if drawn.pixel_weights is not None:
                squared = squared * drawn.pixel_weights[part]
            loss = squared.mean() * (len(part) / batch)
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()
        if schedule is not None:
            schedule.step()
        losses.append(step_loss)
        if not math.isfinite(step_loss):
            raise TrainingError(f"concept {state.token!r}: loss became {step_loss} at step {step}; lower lr_residual")
        if on_step is not None:
            on_step(StepInfo(step, config.steps, step_loss, time.perf_counter() - started))

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().clone()

    return dataclasses.replace(
        state,
        embedding=copy(state.embedding),
        up={n: copy(a) for n, a in state.up.items()},
        down={n: copy(b) for n, b in state.down.items()},
        metadata={
            "train_config": config.to_dict(),
            "loss": loss_summary(losses),
            "selected_step": config.steps,
            "device": str(device),  # no wall-clock time: same inputs, same file (the index row has the time)
        },
    )
