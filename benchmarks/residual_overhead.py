"""UNet forward time with residual concepts mixed in one batch (LAG on and off) / the stock UNet, SD1.5-shaped.

    python -m benchmarks.residual_overhead [--latent 32] [--batch 16] [--concepts 4] [--rounds 3] [--device cpu]

Random weights and random residuals (shape is what costs time). The batch's rows cycle through --concepts
residual concepts (row b uses concept b mod k), each applied by its own low-rank product (no merging), with
LAG's masks from the same pass's cross-attention. The stock UNet is a copy with diffusers' own processors and
no hooks. Runs are interleaved (stock, LAG, no LAG, stock, ...) and medians compared. The default latent is
32 (256 px) so a CPU run takes minutes; --latent 64 is the 512 px figure. Target: LAG <= +10% over stock.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.shapes import build_unet
from perfusion.attention import install_processors
from perfusion.residual_layers import ResidualCall, install_residual_hooks
from perfusion.residuals import ResidualConcept, projection_shape, rank_for, transformer_blocks


def random_residual(unet: torch.nn.Module, index: int, device: torch.device, dtype: torch.dtype) -> ResidualConcept:
    up, down = {}, {}
    for name, block in transformer_blocks(unet).items():
        out, inner = projection_shape(block)
        rank = rank_for(min(out, inner), 0.05)
        up[name] = torch.randn(out, rank, device=device, dtype=dtype) * 0.01
        down[name] = torch.randn(rank, inner, device=device, dtype=dtype) / inner**0.5
    return ResidualConcept(f"<r{index}>", "thing", torch.zeros(768), up, down, "bench", "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent size (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=16, help="UNet batch rows")
    parser.add_argument("--concepts", type=int, default=4, help="distinct residual concepts across the rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.float16 if args.fp16 else torch.float32
    torch.manual_seed(0)
    unet = build_unet("SD1.5", device="cpu").to(device, dtype).eval()
    stock = copy.deepcopy(unet)  # diffusers' processors, no hooks
    install_processors(unet)
    install_residual_hooks(unet)
    d = unet.config.cross_attention_dim
    concepts = [random_residual(unet, k, device, dtype) for k in range(args.concepts)]
    rows = [[concepts[b % args.concepts]] for b in range(args.batch)]
    # prompt ids: the concept token at position 5, its macro class at 6 (LAG's C), the rest ordinary words
    ids = torch.full((args.batch, 77), 3)
    ids[:, 5], ids[:, 6] = 1000, 7
    phrases = {c.token: (1000, [7]) for c in concepts}
    started = time.perf_counter()
    calls = {
        "LAG": ResidualCall.build(rows, prompt_ids=ids, token_phrases=phrases, device=device),
        "no LAG": ResidualCall.build(rows, device=device),
    }
    build_ms = (time.perf_counter() - started) / 2 * 1000
    latents = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    encodings = torch.randn(args.batch, 77, d, device=device, dtype=dtype)
    timestep = torch.tensor([500] * args.batch, device=device)

    def forward(variant: str) -> float:
        model = stock if variant == "stock" else unet
        kwargs = None if variant == "stock" else {"residuals": calls[variant]}
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            model(latents, timestep, encodings, cross_attention_kwargs=kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    variants = ("stock", "LAG", "no LAG")
    for variant in variants:
        forward(variant)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(forward(variant))
    base = statistics.median(times["stock"])
    print(
        f"SD1.5-shaped UNet, latent {args.latent}x{args.latent}, batch {args.batch} with {args.concepts} residual "
        f"concepts mixed, {device}, {dtype}, {args.rounds} interleaved rounds"
    )
    print(f"stock UNet: {base * 1000:.1f} ms (median)")
    for variant in ("LAG", "no LAG"):
        median = statistics.median(times[variant])
        print(
            f"residuals, {variant}: {median * 1000:.1f} ms, ratio {median / base:.3f} "
            f"(overhead {100 * (median / base - 1):+.1f}%; target <= +10%)"
        )
    print(f"ResidualCall.build (once per render, not per step): {build_ms:.2f} ms")


if __name__ == "__main__":
    main()
