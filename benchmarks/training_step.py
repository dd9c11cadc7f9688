"""Perfusion training step time / a plain fine-tuning step with the same trainable size; residuals / Perfusion.

    python -m benchmarks.training_step [--steps 30] [--batch 8]
    python -m benchmarks.training_step --model SD1.5 --device cuda   # SD1.5-shaped, fp16 weights, bf16 autocast

The baseline trains the same number of parameters the plain way: the concept token's embedding row and
one additive vector per cross-attention layer on the value projection (same shape as o*_V), with no C^-1,
no gate, no i* EMA. Same base model, batch, images, noise schedule, optimizer and autocast. Per-step medians,
first steps dropped (warm-up). On CUDA the base is loaded in fp16 as the pipeline's workers load it, and the
peak GPU memory of a Perfusion training is reported (what a worker needs per concept). A Personalized
Residuals training of the same steps and batch runs in the same rounds (target: <= 1.2x Perfusion's step).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import perfusion
from benchmarks.shapes import sd15_base
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


def residual_steps(base, images, steps: int, batch: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Per-step times of a Personalized Residuals training of the same steps and batch (RESIDUALS.md)."""
    stamps: list[float] = []
    config = perfusion.TrainConfig.for_method(method="residuals", steps=steps, batch_size=batch)
    perfusion.methods.method_named("residuals").train(
        base, images, "<bench-3>", "mug", config, on_step=lambda info: stamps.append(info.seconds)
    )
    return [b - a for a, b in itertools.pairwise(stamps)]


def plain_steps(base, images, steps: int, batch: int) -> list[float]:  # type: ignore[no-untyped-def]
    device, unet, scheduler = base.device, base.unet, base.pipeline.scheduler
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(i, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for i in images]
    ).to(device, base.dtype)
    with torch.no_grad():
        posterior = base.pipeline.vae.encode(pixels).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )  # as TrainConfig's "auto"
    row = torch.nn.Parameter(superclass_embedding(base.tokenizer, base.text_encoder, "mug").float().to(device))
    token_id = add_concept_token(base.tokenizer, base.text_encoder, "<bench-2>", row)
    concept_embedding_table(base.text_encoder).concept_vectors[token_id] = row
    biases = []
    for layer in base.cross_attention_layers().values():
        bias = torch.nn.Parameter(torch.zeros(layer.to_v.out_features, device=device))
        layer.to_v.register_forward_hook(lambda module, inputs, output, bias=bias: output + bias.to(output.dtype))
        biases.append(bias)
    optimizer = torch.optim.AdamW([{"params": biases, "lr": 0.03}, {"params": [row], "lr": 0.006}], weight_decay=0.0)
    rng, generator = random.Random(0), torch.Generator(device=device).manual_seed(0)
    durations = []
    for _ in range(steps):
        begin = time.perf_counter()
        picks = torch.tensor([rng.randrange(len(images)) for _ in range(batch)], device=device)
        clean = (
            mean[picks] + std[picks] * torch.randn(mean[picks].shape, generator=generator, device=device)
        ) * 0.18215
        noise = torch.randn(clean.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=device)
        prompts = [rng.choice(NEUTRAL_TEMPLATES).format("<bench-2>") for _ in range(batch)]
        ids = base.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            encodings = base.text_encoder(ids.to(device))[0]
            prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, encodings).sample
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not its queueing
        durations.append(time.perf_counter() - begin)
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "SD1.5"], default="tiny", help="SD1.5: its shapes, random weights")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else None  # as pipeline/tasks.py loads a base on a GPU

    def load():  # type: ignore[no-untyped-def]  # a fresh base: the plain baseline hooks its layers
        return sd15_base(device, dtype) if args.model == "SD1.5" else perfusion.load_base("tiny", device=device)

    base = load()
    images = product_images(PRODUCTS[0], count=4, size=base.resolution)
    covariance = perfusion.estimate_covariance(base)
    ours: list[float] = []
    plain: list[float] = []
    residual: list[float] = []
    peak_gib = 0.0
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours += perfusion_steps(base, images, covariance, args.steps, args.batch)[3:]
        if device.type == "cuda":
            peak_gib = max(peak_gib, torch.cuda.max_memory_allocated() / 2**30)
        residual += residual_steps(base, images, args.steps, args.batch)[3:]
        plain += plain_steps(load(), images, args.steps, args.batch)[3:]
    ours_ms, plain_ms = statistics.median(ours) * 1000, statistics.median(plain) * 1000
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{args.model} base model ({base.resolution} px), batch {args.batch}, {args.rounds} x {args.steps} steps each, "
        f"{where}" + (", fp16 weights, bf16 autocast" if device.type == "cuda" else "")
    )
    print(f"Perfusion step: {ours_ms:.1f} ms (median)   plain fine-tuning step, same trainable size: {plain_ms:.1f} ms")
    print(f"ratio Perfusion / plain = {ours_ms / plain_ms:.2f}")
    residual_ms = statistics.median(residual) * 1000
    print(
        f"Personalized Residuals step: {residual_ms:.1f} ms; ratio residuals / Perfusion = "
        f"{residual_ms / ours_ms:.2f} (target <= 1.20)"
    )
    if device.type == "cuda":
        print(f"peak GPU memory of a Perfusion training: {peak_gib:.2f} GiB (model included)")


if __name__ == "__main__":
    main()
