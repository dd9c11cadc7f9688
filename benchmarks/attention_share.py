"""Where a base model's cross-attention looks: the share of each prompt token, and of the padding together.

    python -m benchmarks.attention_share "a photo of a star" "a dotted purple star with a dot on a blue background"
    python -m benchmarks.attention_share --base /models/sd15 "a photo of a dog"

For each prompt: one render (DDIM, no guidance, seed 0) with every cross-attention layer recording its attention
probabilities, averaged over layers, heads, queries and steps. A key-locked concept's value edit reaches the UNet
through its own token's share (its key is the superclass word's), so this is the ceiling on what it can change.
"""

from __future__ import annotations

import argparse

import torch

import perfusion


class RecordingProcessor:
    """Plain cross-attention (softmax(QK^T / sqrt(d)) V) that keeps each call's mean probability per key."""

    def __init__(self, shares: list[torch.Tensor]) -> None:
        self.shares = shares

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = (
            attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        )
        probs = attn.get_attention_scores(query, key, None)  # (batch * heads, queries, keys)
        self.shares.append(probs.mean(dim=(0, 1)).detach())
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))


def attention_shares(base: perfusion.BaseModel, prompt: str, steps: int = 10) -> tuple[list[str], torch.Tensor]:
    """(the prompt's tokens BOS..EOS, the mean attention share of every key position (77,))."""
    pipeline = base.pipeline
    shares: list[torch.Tensor] = []
    original = pipeline.unet.attn_processors
    recorder = RecordingProcessor(shares)
    pipeline.unet.set_attn_processor({n: recorder if "attn2" in n else p for n, p in original.items()})
    try:
        pipeline(
            prompt=[prompt],
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    finally:
        pipeline.unet.set_attn_processor(original)
    tokens = pipeline.tokenizer.convert_ids_to_tokens(pipeline.tokenizer(prompt).input_ids)
    return tokens, torch.stack(shares).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--base", default="toy")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    base = perfusion.load_base(args.base)
    for prompt in args.prompts:
        tokens, shares = attention_shares(base, prompt, args.steps)
        words = " ".join(f"{t.replace('</w>', '')}:{shares[i]:.3f}" for i, t in enumerate(tokens))
        print(
            f"{prompt!r}: {words} | padding ({len(shares) - len(tokens)} positions) {shares[len(tokens) :].sum():.3f}"
        )


if __name__ == "__main__":
    main()
