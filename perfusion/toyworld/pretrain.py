"""Pretrain the toy base model's UNet on the toy world from scratch, on the frozen toy CLIP.

    python -m perfusion.toyworld.pretrain --minutes 55            # writes perfusion/assets/toy/toy.safetensors
    python -m perfusion.toyworld.pretrain --minutes 55 --resume   # continue from the last checkpoint
    python -m perfusion.toyworld.pretrain --steps 2200 --device cuda  # a fixed number of steps instead
    python -m perfusion.toyworld.pretrain --init perfusion/assets/toy/toy.safetensors --steps 1800 --lr 5e-4 --out DIR
                                                                  # a second stage from saved weights
    python -m perfusion.toyworld.pretrain --init ... --text-states words --steps 1500 --out DIR
                                                                  # a stage whose UNet reads BOS and the words only

A time budget makes the 2-core CPU recipe fit its hour; a step count makes a run reproducible on any device
(on 2 CPU cores one step of batch 64 takes about 2 s: the shipped first stage, 2,200 steps, took 72 minutes).

The text encoder is the toy CLIP's text tower (clip.py), frozen, as Stable Diffusion's UNet was trained on a
frozen CLIP; captions come from the rich caption language (language.py). Seeded, resumable (a safetensors
checkpoint every few minutes: UNet weights, EMA, optimizer state, RNG states; never pickle), with a progress
bar. Recipe: v-prediction on a cosine schedule in the Haar latent space
(autoencoder.py), Min-SNR-5 loss weighting (Hang et al. 2023: the low-noise steps stop dominating the
gradient, which is where the colors of flat regions are NOT decided), AdamW 1e-3 with warm-up and cosine
decay over the time budget, batch 64, 10% caption dropout (so classifier-free guidance has an unconditional
model), unknown words (below), bf16 autocast where the hardware has it (about 20% faster on CPUs with
AVX-512 BF16; fp32 on CPUs without, which only emulate it), EMA 0.999 of the weights that ship.

Unknown words: in 10% of captions one shape word's input embedding is replaced by a random vector of the same
norm before the frozen encoder reads it. A personal concept's token is exactly such a word; trained this way,
the UNet learns that an unknown word still names some object and that the words around it keep their meaning.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from perfusion.toyworld.autoencoder import haar_encode
from perfusion.toyworld.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from perfusion.toyworld.language import NO_BACKGROUND_RATE, caption
from perfusion.toyworld.model import TEXT_STATES, TOY_DIR, build_toy_pipeline
from perfusion.toyworld.world import MARK_RATE, SHAPES, render, sample_scene

CHECKPOINT_MINUTES = 5.0
MIN_SNR_GAMMA = 5.0
TWO_OBJECTS = 0.4  # fraction of pretraining scenes with two objects
UNKNOWN_WORD_RATE = 0.1  # fraction of captions whose (first) shape word becomes a random embedding


def resolve_precision(precision: str, device: str) -> str:
    """ "auto" -> bf16 where the hardware computes it natively, fp32 elsewhere: a CPU without native bf16
    emulates it (on 2 AVX2-only cores a step took about 45 s in bf16, about 6 s in fp32)."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def batch_of(
    rng: random.Random, size: int, dropout: float, two_objects: float = TWO_OBJECTS
) -> tuple[torch.Tensor, list[str]]:
    """(size, 3, 32, 32) images in [-1, 1] and their captions ("" with probability `dropout`)."""
    scenes = [sample_scene(rng, two_objects=two_objects) for _ in range(size)]
    pixels = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = ["" if rng.random() < dropout else caption(s, rng) for s in scenes]
    return pixels, captions


def swap_in_unknown_words(
    embeddings: torch.Tensor, ids: torch.Tensor, word_ids: torch.Tensor, rate: float
) -> torch.Tensor:
    """(B, L, D) token embeddings where, in a `rate` fraction of the captions, the first token of `word_ids`
    is replaced by a random direction with the mean norm of those words' embeddings (see the module notes)."""
    present = torch.isin(ids, word_ids.to(ids.device))  # (B, L)
    chosen = present.any(dim=1) & (torch.rand(ids.shape[0]) < rate).to(ids.device)
    if not chosen.any():
        return embeddings
    rows = chosen.nonzero().squeeze(1)
    columns = present.float().argmax(dim=1)[rows]  # first shape word of each chosen caption
    with torch.no_grad():
        norm = embeddings[rows, columns].norm(dim=-1).mean()
    noise = torch.randn(len(rows), embeddings.shape[-1]).to(embeddings)
    swapped = embeddings.clone()
    swapped[rows, columns] = noise / noise.norm(dim=-1, keepdim=True) * norm
    return swapped


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-gamma weights for a v-prediction loss: min(SNR, gamma) / (SNR + 1), SNR = ab / (1 - ab).
    (The v-loss is (SNR + 1) x the epsilon loss's x0 error scale; this caps the weight of easy, low-noise steps.)"""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr + 1)


def pretrain(
    out_dir: Path,
    minutes: float,
    batch: int,
    lr: float,
    seed: int,
    resume: bool,
    steps: int | None = None,
    two_objects: float = TWO_OBJECTS,
    device: str = "cpu",
    precision: str = "auto",
    init: Path | None = None,
    text_states: str | None = None,
) -> dict[str, object]:
    """Train until the time budget (`minutes`) or, when given, the step count (`steps`) is spent.

    `init`: start from these shipped weights (a toy.safetensors) instead of a random UNet, with a fresh
    optimizer, EMA and schedule: a second stage when the first one's checkpoint is gone.
    `text_states`: which text states the UNet reads (model.TEXT_STATES); None: those of `init`, else "all".
    """
    precision = resolve_precision(precision, device)
    init_steps = int(read_metadata(init).get("steps", 0)) if init is not None else 0
    pipeline = build_toy_pipeline(weights=init, seed=seed, text_states=text_states)
    text_states = getattr(pipeline.text_encoder, "text_states", "all")
    pipeline.to(device)
    unet, text_encoder, tokenizer, scheduler = (
        pipeline.unet,
        pipeline.text_encoder,
        pipeline.tokenizer,
        pipeline.scheduler,
    )
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError("the toy recipe trains a v-prediction model")
    alphas_cumprod = scheduler.alphas_cumprod
    models = {"unet": unet}  # the text encoder stays frozen
    text_encoder.requires_grad_(False).eval()
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = {f"{name}.{k}": v.detach().clone() for name, m in models.items() for k, v in m.state_dict().items()}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    step, spent = 0, 0.0
    checkpoint = out_dir / "checkpoint.safetensors"
    if resume and checkpoint.is_file():
        step, spent, rng = resume_state(checkpoint, models, ema, optimizer)
    alphas_cumprod = alphas_cumprod.to(device)
    shape_ids = torch.tensor([tokenizer.convert_tokens_to_ids(f"{s}</w>") for s in SHAPES])
    if (shape_ids == tokenizer.unk_token_id).any():  # a shape word split into pieces: the swap would hit EOS
        raise ValueError(f"every shape word must be one token of the toy tokenizer: {SHAPES}")
    text_encoder.get_input_embeddings().register_forward_hook(
        lambda _module, inputs, output: swap_in_unknown_words(output, inputs[0], shape_ids, UNKNOWN_WORD_RATE)
    )
    budget = minutes * 60
    started, last_save = time.perf_counter() - spent, time.perf_counter()
    losses: list[float] = []

    def done() -> float:  # the fraction of the run spent: by steps when counted, else by wall clock
        return step / steps if steps else (time.perf_counter() - started) / budget

    progress = (
        tqdm(total=steps, unit="step", desc="pretraining toy", initial=step)
        if steps
        else tqdm(total=int(budget), unit="s", desc="pretraining toy", initial=int(spent))
    )
    while done() < 1:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(lr, step, done())
        pixels, captions = batch_of(rng, batch, dropout=0.1, two_objects=two_objects)
        latents = haar_encode(pixels).to(device)  # the exact autoencoder (scaling factor 1)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,)).to(device)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids = ids.to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                encodings = text_encoder(ids)[0]  # (b, 77, d): the frozen CLIP's states (text_states: which)
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encodings).sample
        prediction = prediction.float()
        target = scheduler.get_velocity(latents, noise, timesteps)  # v = sqrt(ab) eps - sqrt(1 - ab) x0
        per_sample = (prediction - target).square().mean(dim=(1, 2, 3))
        loss = (min_snr_weight(alphas_cumprod[timesteps]) * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        update_ema(ema, models, step)
        losses.append(loss.item())
        progress.n = step if steps else int(time.perf_counter() - started)
        progress.set_postfix(step=step, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if time.perf_counter() - last_save > CHECKPOINT_MINUTES * 60:
            save_state(checkpoint, models, ema, optimizer, step, time.perf_counter() - started, rng)
            last_save = time.perf_counter()
    progress.close()
    save_state(checkpoint, models, ema, optimizer, step, time.perf_counter() - started, rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    shipped = {k: v.half().cpu().contiguous() for k, v in ema.items() if not k.endswith("position_ids")}
    metadata = {"steps": str(init_steps + step), "seed": str(seed), "text_states": text_states}  # steps: all stages
    save_file(shipped, str(out_dir / "toy.safetensors"), metadata=metadata)
    summary: dict[str, object] = {
        "steps": step,
        "init": None if init is None else {"weights": init.name, "steps": init_steps},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "device": device,
        "batch": batch,
        "two_objects": two_objects,
        "precision": precision,
        "text_states": text_states,
        "unknown_word_rate": UNKNOWN_WORD_RATE,
        "mark_rate": MARK_RATE,
        "no_background_rate": NO_BACKGROUND_RATE,
        "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
    }
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def warmup_cosine(lr: float, step: int, done: float) -> float:
    """The toy runs' learning rate: a 100-step linear warm-up, then cosine decay to 10% as `done` goes 0 -> 1."""
    return lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], models: dict[str, torch.nn.Module], step: int) -> None:
    """ema <- d ema + (1 - d) weights, d = min(0.999, (1 + step) / (10 + step)) (a short warm-up)."""
    decay = min(0.999, (1 + step) / (10 + step))
    for name, model in models.items():
        for key, value in model.state_dict().items():
            ema[f"{name}.{key}"].mul_(decay).add_(value.detach(), alpha=1 - decay)


def save_state(path: Path, models, ema, optimizer, step: int, elapsed: float, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    tensors = {f"model.{n}.{k}": v for n, m in models.items() for k, v in m.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.items()}
    save_checkpoint(path, tensors, optimizer, step, elapsed, rng)


def resume_state(path: Path, models, ema, optimizer) -> tuple[int, float, random.Random]:  # type: ignore[no-untyped-def]
    saved = load_checkpoint(path, optimizer)
    for name, model in models.items():
        prefix = f"model.{name}."
        model.load_state_dict({k[len(prefix) :]: v for k, v in saved.tensors.items() if k.startswith(prefix)})
    for key in ema:
        ema[key].copy_(saved.tensors[f"ema.{key}"])
    return saved.step, saved.elapsed, saved.rng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    parser.add_argument("--two-objects", type=float, default=TWO_OBJECTS, help="fraction of two-object scenes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast precision; auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX), else fp32",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TOY_DIR)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument(
        "--init", type=Path, default=None, help="start from these weights (fresh optimizer and schedule)"
    )
    parser.add_argument(
        "--text-states",
        choices=TEXT_STATES,
        default=None,
        help="the text states the UNet reads: all 77 (as SD) or BOS and the words only; default: those of --init",
    )
    args = parser.parse_args()
    summary = pretrain(
        args.out,
        args.minutes,
        args.batch,
        args.lr,
        args.seed,
        args.resume,
        args.steps,
        args.two_objects,
        args.device,
        args.precision,
        args.init,
        args.text_states,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
