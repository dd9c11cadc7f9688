"""Train the DynaIP adapter of the toy MM-DiT on toy-world pairs (pairs.py), base and vision tower frozen.

    python -m perfusion.toyworld.train_dynaip --steps 1500 --out DIR            # DIR/dynaip-adapter.safetensors
    python -m perfusion.toyworld.train_dynaip --steps 1500 --out DIR --resume   # continue a run

Each step: the reference photo -> the toy CLIP's vision tower (layers 1, 2, 4) -> HMoE fusion -> 4 image-prompt
tokens, injected into BOTH streams of every joint block (training half of dynamic decoupling); the target
scene's rectified-flow loss under its shape-word caption. In 10% of the rows the image prompt is dropped
(so guidance has an unconditional model), in 10% the caption. AdamW with warm-up and cosine decay, EMA 0.999.
Seeded and resumable (safetensors checkpoints, never pickle), with a progress bar.

`--image-stream-only F` (ours, not the paper's; default 0): in a fraction F of the steps the text-stream
injection is off, as it is at inference, so the image stream alone must carry the product on those steps
(measured on the toy, the adapter otherwise carries the product's color through the text stream, which
decoupling drops at inference: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from perfusion.dynaip import DynaIPAdapter, ImagePromptCall, feature_levels, reference_features
from perfusion.mmdit import flow_training_pair
from perfusion.models import fingerprint
from perfusion.toyworld.autoencoder import haar_encode
from perfusion.toyworld.clip import pixels_of
from perfusion.toyworld.mmdit_model import (
    ADAPTER_WEIGHTS,
    MMDIT_DIR,
    MMDIT_WEIGHTS,
    build_toy_mmdit_pipeline,
    toy_vision_tower,
)
from perfusion.toyworld.pairs import sample_pair
from perfusion.toyworld.pretrain import CHECKPOINT_MINUTES, resume_state, save_state, update_ema, warmup_cosine
from perfusion.toyworld.world import render

ADAPTER_FILE = ADAPTER_WEIGHTS.name  # what the toy-mmdit base loads beside its weights
PROMPT_DROPOUT = 0.1
CAPTION_DROPOUT = 0.1


def train_dynaip(
    out_dir: Path,
    steps: int,
    *,
    base_weights: Path | None = MMDIT_WEIGHTS,
    batch: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    resume: bool = False,
    device: str = "cpu",
    image_stream_only: float = 0.0,
) -> dict[str, object]:
    if not 0.0 <= image_stream_only <= 1.0:
        raise ValueError(f"image_stream_only is a fraction of the steps in [0, 1], not {image_stream_only}")
    pipeline = build_toy_mmdit_pipeline(weights=base_weights)
    base_fingerprint = fingerprint(pipeline)
    transformer = pipeline.transformer.requires_grad_(False).eval().to(device)
    pipeline.text_encoder.requires_grad_(False).eval().to(device)
    vision = toy_vision_tower().to(device)
    levels = feature_levels(vision.config.num_hidden_layers)
    torch.manual_seed(seed)
    adapter = DynaIPAdapter(transformer, vision.config.hidden_size, levels).to(device)
    models: dict[str, torch.nn.Module] = {"adapter": adapter}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=1e-2)
    ema = {f"adapter.{k}": v.detach().clone() for k, v in adapter.state_dict().items()}
    rng = random.Random(seed)
    step, spent = 0, 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "checkpoint.safetensors"
    if resume and checkpoint.is_file():
        step, spent, rng = resume_state(checkpoint, models, ema, optimizer)
    started, last_save = time.perf_counter() - spent, time.perf_counter()
    losses: list[float] = []
    progress = tqdm(total=steps, unit="step", desc="training the DynaIP adapter", initial=step)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(lr, step, step / steps)
        pairs = [sample_pair(rng) for _ in range(batch)]
        references = pixels_of(np.stack([render(p.reference) for p in pairs])).to(device)
        targets = pixels_of(np.stack([render(p.target) for p in pairs]))
        captions = ["" if rng.random() < CAPTION_DROPOUT else p.caption for p in pairs]
        present = torch.tensor([rng.random() >= PROMPT_DROPOUT for _ in pairs], device=device)
        tokens, _ = adapter.fusion(reference_features(vision, references, levels))
        noisy, sigmas, target = flow_training_pair(haar_encode(targets).to(device))
        states, pooled = pipeline.encode_prompts(pipeline.token_ids(captions))
        # The draw only when asked for, so the default run's random stream is the shipped adapter's.
        both_streams = image_stream_only == 0.0 or rng.random() >= image_stream_only
        call = ImagePromptCall(tokens, present, text_stream=both_streams)
        prediction = pipeline.velocity(noisy, sigmas, states, pooled, {"image_prompt": call})
        loss = (prediction.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        step += 1
        update_ema(ema, models, step)
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if time.perf_counter() - last_save > CHECKPOINT_MINUTES * 60:
            save_state(checkpoint, models, ema, optimizer, step, time.perf_counter() - started, rng)
            last_save = time.perf_counter()
    progress.close()
    save_state(checkpoint, models, ema, optimizer, step, time.perf_counter() - started, rng)
    adapter.load_state_dict({k[len("adapter.") :]: v for k, v in ema.items()})
    adapter.save(str(out_dir / ADAPTER_FILE), base_fingerprint)
    summary: dict[str, object] = {
        "steps": step,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "batch": batch,
        "lr": lr,
        "levels": list(levels),
        "base_fingerprint": base_fingerprint,
        "image_stream_only": image_stream_only,
        "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:])),
        "command": f"python -m perfusion.toyworld.train_dynaip --steps {steps} --batch {batch} --lr {lr} --seed {seed}"
        + (f" --image-stream-only {image_stream_only}" if image_stream_only else ""),
    }
    (out_dir / "train_dynaip.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--base", type=Path, default=MMDIT_WEIGHTS, help="the toy MM-DiT's weights")
    parser.add_argument("--out", type=Path, default=MMDIT_DIR)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--image-stream-only",
        type=float,
        default=0.0,
        help="fraction of steps with the text-stream injection off, as at inference (ours; the paper: 0)",
    )
    args = parser.parse_args()
    summary = train_dynaip(
        args.out,
        args.steps,
        base_weights=args.base,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        resume=args.resume,
        device=args.device,
        image_stream_only=args.image_stream_only,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
