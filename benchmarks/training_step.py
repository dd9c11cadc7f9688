"""Perfusion training step time / a plain fine-tuning step with the same trainable size.

    python benchmarks/training_step.py [--steps 30] [--batch 8]

The baseline trains the same number of parameters the plain way: the concept token's embedding row and
one additive vector per cross-attention layer on the value projection (same shape as o*_V), with no C^-1,
no gate, no i* EMA. Same tiny base model, batch, images, noise schedule and optimizer. Per-step medians,
first steps dropped (warm-up).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import perfusion
from perfusion.corpus import NEUTRAL_TEMPLATES
from perfusion.tokens import add_concept_token, concept_embedding_table, superclass_embedding
from pipeline.demo import PRODUCTS, product_images


def perfusion_steps(base, images, covariance, steps: int, batch: int) -> list[float]:  # type: ignore[no-untyped-def]
    stamps: list[float] = []
    config = perfusion.TrainConfig(steps=steps, batch_size=batch)
    perfusion.train_concept(
        base,
        images,
        "<bench-1>",
        "mug",
        config,
        covariance=covariance,
        on_step=lambda info: stamps.append(info.seconds),
    )
    return [b - a for a, b in itertools.pairwise(stamps)]


def plain_steps(base, images, steps: int, batch: int) -> list[float]:  # type: ignore[no-untyped-def]
    device, unet, scheduler = base.device, base.unet, base.pipeline.scheduler
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for i in images]
    )
    with torch.no_grad():
        posterior = base.pipeline.vae.encode(pixels).latent_dist
    row = torch.nn.Parameter(superclass_embedding(base.tokenizer, base.text_encoder, "mug"))
    token_id = add_concept_token(base.tokenizer, base.text_encoder, "<bench-2>", row)
    concept_embedding_table(base.text_encoder).concept_vectors[token_id] = row
    biases = []
    for layer in base.cross_attention_layers().values():
        bias = torch.nn.Parameter(torch.zeros(layer.to_v.out_features))
        layer.to_v.register_forward_hook(lambda module, inputs, output, bias=bias: output + bias)
        biases.append(bias)
    optimizer = torch.optim.AdamW([{"params": biases, "lr": 0.03}, {"params": [row], "lr": 0.006}], weight_decay=0.0)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    durations = []
    for _ in range(steps):
        begin = time.perf_counter()
        picks = torch.tensor([rng.randrange(len(images)) for _ in range(batch)])
        clean = (
            posterior.mean[picks] + posterior.std[picks] * torch.randn(posterior.mean[picks].shape, generator=generator)
        ) * 0.18215
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        prompts = [rng.choice(NEUTRAL_TEMPLATES).format("<bench-2>") for _ in range(batch)]
        ids = base.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        optimizer.zero_grad(set_to_none=True)
        encodings = base.text_encoder(ids.to(device))[0]
        prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, encodings).sample
        F.mse_loss(prediction, noise).backward()
        optimizer.step()
        durations.append(time.perf_counter() - begin)
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = product_images(PRODUCTS[0], count=4)
    base = perfusion.load_base("tiny")
    covariance = perfusion.estimate_covariance(base)
    ours: list[float] = []
    plain: list[float] = []
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        ours += perfusion_steps(base, images, covariance, args.steps, args.batch)[3:]
        plain += plain_steps(perfusion.load_base("tiny"), images, args.steps, args.batch)[3:]
    ours_ms, plain_ms = statistics.median(ours) * 1000, statistics.median(plain) * 1000
    print(
        f"tiny base model, batch {args.batch}, {args.rounds} x {args.steps} steps each, "
        f"CPU ({torch.get_num_threads()} threads)"
    )
    print(f"Perfusion step: {ours_ms:.1f} ms (median)   plain fine-tuning step, same trainable size: {plain_ms:.1f} ms")
    print(f"ratio Perfusion / plain = {ours_ms / plain_ms:.2f}")


if __name__ == "__main__":
    main()
