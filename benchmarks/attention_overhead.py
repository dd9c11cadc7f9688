"""UNet forward time with Perfusion on attn2 (1 and 4 concepts active) / without, SD1.5-shaped UNet.

    python -m benchmarks.attention_overhead [--latent 64] [--batch 2] [--rounds 3] [--device cpu] [--fp16]

Random weights (shape is what costs time). Runs are interleaved (none, 1, 4, none, 1, 4, ...) and the
median per variant is compared, so machine noise hits all variants alike. The PerfusionCall is built
once per render (all denoising steps share it); its build time is reported separately.
Target: overhead <= 3%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.shapes import build_unet
from perfusion.attention import PerfusionCall, install_processors
from perfusion.concept import Concept
from perfusion.covariance import Covariance
from perfusion.models import cross_attention_layers


def random_covariance(d: int) -> Covariance:
    a = torch.randn(d, 4 * d, dtype=torch.float64)
    return Covariance.from_second_moment(a @ a.T / (4 * d), "bench", 4 * d)


def random_concept(unet: torch.nn.Module, d: int, index: int, device: torch.device, dtype: torch.dtype) -> Concept:
    layers = cross_attention_layers(unet)
    return Concept(
        token=f"<c{index}>",
        superclass="thing",
        embedding=torch.randn(d),
        target_input=torch.randn(d),
        superclass_input=torch.randn(d, device=device, dtype=dtype),
        value_targets={
            name: torch.randn(layer.to_v.out_features, device=device, dtype=dtype) for name, layer in layers.items()
        },
        fingerprint="bench",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent size (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.float16 if args.fp16 else torch.float32
    torch.manual_seed(0)
    unet = build_unet("SD1.5", device="cpu").to(device).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    d = unet.config.cross_attention_dim
    covariance = random_covariance(d)
    concepts = [random_concept(unet, d, k, device, dtype) for k in range(4)]
    latents = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    encodings = torch.randn(args.batch, 77, d, device=device, dtype=dtype)
    timestep = torch.tensor([500] * args.batch, device=device)

    started = time.perf_counter()
    calls = {
        1: PerfusionCall.build([concepts[:1]] * args.batch, covariance, device=device),
        4: PerfusionCall.build([concepts] * args.batch, covariance, device=device),
    }
    build_ms = (time.perf_counter() - started) / 2 * 1000
    stock = dict(unet.attn_processors)  # name -> processor, to restore the baseline

    def forward(variant: int) -> float:
        if variant == 0:
            unet.set_attn_processor(dict(stock))  # a copy: diffusers pops entries from the dict it is given
            kwargs = None
        else:
            install_processors(unet)
            kwargs = {"perfusion": calls[variant]}
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            unet(latents, timestep, encodings, cross_attention_kwargs=kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    for variant in (0, 1, 4):
        forward(variant)  # warm-up
    times: dict[int, list[float]] = {0: [], 1: [], 4: []}
    for _ in range(args.rounds):
        for variant in (0, 1, 4):
            times[variant].append(forward(variant))
    base = statistics.median(times[0])
    print(
        f"SD1.5-shaped UNet, latent {args.latent}x{args.latent}, batch {args.batch}, {device}, {dtype}, "
        f"{args.rounds} interleaved rounds"
    )
    print(f"without Perfusion: {base * 1000:.1f} ms (median)")
    for variant in (1, 4):
        median = statistics.median(times[variant])
        print(
            f"{variant} concept(s) active: {median * 1000:.1f} ms, ratio {median / base:.3f} "
            f"(overhead {100 * (median / base - 1):+.1f}%; target <= +3%)"
        )
    print(f"PerfusionCall.build (once per render, not per step): {build_ms:.2f} ms")


if __name__ == "__main__":
    main()
