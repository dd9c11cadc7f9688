"""DynaIP's image-prompt adapter for an MM-DiT base (DYNAIP.md): reference features in, image-prompt tokens
out, injected by added cross-attention into the joint blocks.

Hierarchical Mixture-of-Experts fusion (HMoE): a vision tower's states at a low, a mid and the last layer,
f_l (B, N, Dv), each pass their own expert E_l (K learned queries attending over the N patch states, then a
projection to the adapter width W) to tokens T_l = E_l(f_l) (B, K, W); a router gives per-level weights
w = softmax(R [mean f_1; ...; mean f_L]) (B, L), and the image prompt is sum_l w_l T_l. At inference the
weights may be given instead (the "granularity" knob: more weight on low levels, finer detail).

Decoupled injection, per joint block and per stream s in {image, text} (IP-Adapter style):
    h_s <- h_s + scale * softmax(q_s k_ip^T / sqrt(d)) v_ip,   k_ip = K_s T, v_ip = V_s T
with q_s the block's own query of that stream. Dynamic decoupling (the paper's strategy): both streams
during training, the image stream only at inference (`ImagePromptCall.text_stream`).

Several products in one prompt (the paper's multi-subject claim; the routing is our choice, it is silent):
each product j has its own tokens T_j and a placeholder word at text position p_j. Every image token n
takes each product's injection in proportion to how it splits its attention among the placeholder words,
in the same block:
    a_nj = mean_h softmax_j(q_hn . k_h,p_j / sqrt(d)),   h_img,n <- h_img,n + scale * sum_j a_nj IP(q_n, T_j)
(the joint softmax's denominator cancels in the split), so the star's reference lands where the image
attends to "star" and the square's where it attends to "square". With one product a_n1 = 1: the
single-product injection exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class LevelExpert(nn.Module):
    """One level's projector: K learned queries attend over the level's states (B, N, Dv) -> (B, K, W)."""

    def __init__(self, vision_width: int, width: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.queries = nn.Parameter(torch.randn(tokens, vision_width) / vision_width**0.5)
        self.pool = nn.MultiheadAttention(vision_width, num_heads=4, batch_first=True)
        self.out = nn.Sequential(nn.Linear(vision_width, width), nn.LayerNorm(width))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        states = self.norm(states)
        queries = self.queries.expand(states.shape[0], -1, -1)
        pooled, _ = self.pool(queries, states, states, need_weights=False)
        return self.out(pooled)


class HierarchicalFusion(nn.Module):
    """HMoE feature fusion (module docstring): per-level experts mixed by a router."""

    def __init__(self, vision_width: int, width: int, tokens: int, levels: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(LevelExpert(vision_width, width, tokens) for _ in range(levels))
        self.router = nn.Linear(levels * vision_width, levels)

    def forward(
        self, features: Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: one (B, N, Dv) per level -> image-prompt tokens (B, K, W) and the level weights (B, L).
        `weights` (L,) or (B, L) overrides the router (the granularity knob); they must sum to 1."""
        if len(features) != len(self.experts):
            raise ValueError(f"expected {len(self.experts)} feature levels, got {len(features)}")
        if weights is None:
            weights = torch.softmax(self.router(torch.cat([f.mean(dim=1) for f in features], dim=-1)), dim=-1)
        else:
            weights = torch.as_tensor(weights, dtype=features[0].dtype, device=features[0].device)
            weights = weights.expand(features[0].shape[0], len(self.experts))
            if not torch.allclose(weights.sum(dim=-1), torch.ones(())):
                raise ValueError(f"granularity weights must sum to 1, got {weights[0].tolist()}")
        tokens = torch.stack([expert(f) for expert, f in zip(self.experts, features, strict=True)], dim=1)
        return (weights[:, :, None, None] * tokens).sum(dim=1), weights


@dataclass
class ImagePromptCall:
    """What one MM-DiT forward pass injects: per-row image-prompt tokens (B, T, W) (rows of the batch in the
    transformer's order; a row with no product has `present` False), and which streams receive them."""

    tokens: torch.Tensor
    present: torch.Tensor  # (B,) bool
    token_mask: torch.Tensor | None = None  # (B, T) bool: the real tokens of rows padded to the longest prompt
    text_stream: bool = False  # True while training (both streams); False at inference: dynamic decoupling
    scale: float = 1.0
    # Several products a row (module docstring): the product j of each token (B, T) and the text position of
    # each product's placeholder word (B, J), -1 where a row has fewer products. None: one product a row.
    token_product: torch.Tensor | None = None
    product_positions: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ImagePromptCall:
        """The same call with its tensors where the transformer is (tokens in its dtype)."""

        def moved(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(device)

        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device, dtype),
            present=self.present.to(device),
            token_mask=moved(self.token_mask),
            token_product=moved(self.token_product),
            product_positions=moved(self.product_positions),
        )


class DynaIPJointAttnProcessor(nn.Module):
    """diffusers' joint attention (JointAttnProcessor2_0, same math) plus the decoupled image-prompt
    cross-attention of the module docstring. With no `image_prompt` it is the stock processor exactly."""

    def __init__(self, inner_dim: int, prompt_width: int, has_text_stream_output: bool) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(prompt_width, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(prompt_width, inner_dim, bias=False)
        # The last joint block drops its text output (context_pre_only): nothing to inject there.
        self.text_k_ip = nn.Linear(prompt_width, inner_dim, bias=False) if has_text_stream_output else None
        self.text_v_ip = nn.Linear(prompt_width, inner_dim, bias=False) if has_text_stream_output else None
        for layer in (self.to_v_ip, self.text_v_ip):  # zero values: an untrained adapter changes nothing
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_prompt: ImagePromptCall | None = None,
        **_: object,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, image_length = hidden_states.shape[:2]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, H*d) -> (B, H, N, d)
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(batch, -1, x.shape[1] * x.shape[-1])

        query, key, value = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = None
        if encoder_hidden_states is not None:
            text_query = split(attn.add_q_proj(encoder_hidden_states))
            text_key = split(attn.add_k_proj(encoder_hidden_states))
            text_value = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            joint = F.scaled_dot_product_attention(
                torch.cat([query, text_query], dim=2),
                torch.cat([key, text_key], dim=2),
                torch.cat([value, text_value], dim=2),
            )
        else:
            joint = F.scaled_dot_product_attention(query, key, value)
        joint = merge(joint).to(query.dtype)
        image_out, text_out = joint[:, :image_length], joint[:, image_length:]

        if image_prompt is not None and image_prompt.scale != 0:
            tokens = image_prompt.tokens.to(hidden_states.dtype)
            gate = (image_prompt.scale * image_prompt.present.to(hidden_states.dtype)).view(batch, 1, 1)
            mask = None if image_prompt.token_mask is None else image_prompt.token_mask[:, None, None, :]
            ip_key, ip_value = split(self.to_k_ip(tokens)), split(self.to_v_ip(tokens))
            if image_prompt.product_positions is None or text_query is None:
                injected = merge(F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=mask))
            else:
                injected = _routed_injection(query, text_key, ip_key, ip_value, image_prompt, merge)
            image_out = image_out + gate * injected
            if image_prompt.text_stream and text_query is not None and self.text_k_ip is not None:
                assert self.text_v_ip is not None
                text_out = text_out + gate * merge(
                    F.scaled_dot_product_attention(
                        text_query, split(self.text_k_ip(tokens)), split(self.text_v_ip(tokens)), attn_mask=mask
                    )
                )

        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if encoder_hidden_states is None:
            return image_out
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def _routed_injection(
    query: torch.Tensor,
    text_key: torch.Tensor,
    ip_key: torch.Tensor,
    ip_value: torch.Tensor,
    call: ImagePromptCall,
    merge: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_j a_nj IP(q_n, T_j) of the module docstring. query (B, H, N, d), text_key (B, H, L, d), ip_key and
    ip_value (B, H, T, d) -> (B, N, H d)."""
    assert call.product_positions is not None and call.token_product is not None
    positions = call.product_positions.to(query.device)  # (B, J)
    present = positions >= 0
    index = positions.clamp(min=0)[:, None, :, None].expand(-1, text_key.shape[1], -1, text_key.shape[-1])
    words = text_key.gather(2, index)  # (B, H, J, d): each product's placeholder key
    logits = (query.float() @ words.float().transpose(-1, -2)) / query.shape[-1] ** 0.5  # (B, H, N, J), fp32
    logits = logits.masked_fill(~present[:, None, None, :], float("-inf"))
    share = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1).to(query.dtype)  # (B, N, J)
    token_mask = (
        call.token_mask if call.token_mask is not None else torch.ones_like(call.token_product, dtype=torch.bool)
    )
    out = torch.zeros(
        query.shape[0], query.shape[2], query.shape[1] * query.shape[3], dtype=query.dtype, device=query.device
    )
    for product in range(positions.shape[1]):
        mine = (token_mask & (call.token_product == product)).to(query.device)
        mine[:, 0] |= ~mine.any(dim=1)  # a row without product j attends somewhere; its share a_nj is 0
        part = merge(F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=mine[:, None, None, :]))
        out = out + share[..., product : product + 1] * part
    return out


def install_adapter(transformer: nn.Module, prompt_width: int) -> nn.ModuleDict:
    """Put a DynaIP processor on every joint block's attention; returns them by block name (the adapter's
    trainable injection weights; the base's own weights are untouched)."""
    processors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, Attention) and name.endswith(".attn") and module.added_kv_proj_dim is not None:
            inner = module.to_q.out_features
            processors[name] = DynaIPJointAttnProcessor(inner, prompt_width, not module.context_pre_only)
            module.set_processor(processors[name])
    if not processors:
        raise ValueError("no joint-attention blocks found: DynaIP needs an MM-DiT (SD3Transformer2DModel)")
    return nn.ModuleDict({name.replace(".", "_"): p for name, p in processors.items()})


ADAPTER_FORMAT = "dynaip-adapter"
ADAPTER_VERSION = "1"


def feature_levels(vision_layers: int) -> tuple[int, int, int]:
    """Low, mid and last layer of a vision tower (DYNAIP.md: a small tower's low / mid / last; for ViT-L's 24
    layers the paper's reviews name 10 and 17). 4 layers -> (1, 2, 4)."""
    return max(1, vision_layers // 4), max(1, vision_layers // 2), vision_layers


@torch.no_grad()
def reference_features(vision: nn.Module, pixels: torch.Tensor, levels: Sequence[int]) -> list[torch.Tensor]:
    """(B, 3, H, W) preprocessed reference images -> one (B, N, Dv) state per level (hidden_states[l]: the
    output of layer l, CLS and patch positions) of a transformers CLIPVisionModel."""
    hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    return [hidden[level] for level in levels]


class DynaIPAdapter(nn.Module):
    """The trainable part of DynaIP on one MM-DiT: the fusion and every joint block's injection weights."""

    def __init__(self, transformer: nn.Module, vision_width: int, levels: Sequence[int], tokens: int = 4) -> None:
        super().__init__()
        self.levels = tuple(int(level) for level in levels)
        self.tokens = tokens
        config = transformer.config  # an SD3Transformer2DModel's
        width = int(config.num_attention_heads * config.attention_head_dim)  # type: ignore[union-attr, operator]
        self.fusion = HierarchicalFusion(vision_width, width, tokens, len(self.levels))
        self.injections = install_adapter(transformer, prompt_width=width)

    def save(self, path: str, base_fingerprint: str) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().half().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "base_fingerprint": base_fingerprint,
            "levels": ",".join(map(str, self.levels)),
            "tokens": str(self.tokens),
        }
        save_file(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str, transformer: nn.Module, vision_width: int, base_fingerprint: str) -> DynaIPAdapter:
        """Read an adapter file onto `transformer`; BaseModelError naming the file when it is not an adapter
        of this version or was trained on another base."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from perfusion.errors import BaseModelError

        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise BaseModelError(f"{path}: not a readable safetensors adapter file ({error})") from error
        if metadata.get("format") != ADAPTER_FORMAT or metadata.get("version") != ADAPTER_VERSION:
            raise BaseModelError(
                f"{path}: not a DynaIP adapter of version {ADAPTER_VERSION} (format={metadata.get('format')!r}, "
                f"version={metadata.get('version')!r})"
            )
        if metadata.get("base_fingerprint") != base_fingerprint:
            raise BaseModelError(
                f"{path}: this adapter was trained on another base (fingerprint {metadata.get('base_fingerprint')}, "
                f"this base {base_fingerprint}); train one for this base"
            )
        levels = [int(level) for level in metadata["levels"].split(",")]
        adapter = cls(transformer, vision_width, levels, int(metadata["tokens"]))
        state = {k: v.float() for k, v in load_file(path).items()}
        adapter.load_state_dict(state)
        return adapter
