"""The Perfusion cross-attention processor (diffusers' processor seam, attn2 only).

Installed on every cross-attention layer, it computes queries, keys and values as diffusers'
AttnProcessor2_0 does, then applies the gated rank-1 edit (perfusion/rank1.py) to K and V:
    K = W_K e_perp + sum_k gate_k o*_K,k      o*_K,k = W_K i_super,k   (key locking: never trained)
    V = W_V e_perp + sum_k gate_k o*_V,k      o*_V,k learned per layer
Local locking (default): K and V both see the concept prompt's encodings. Global locking: the K path,
gate included, sees the encodings of the same prompt with each concept word replaced by its superclass
(aligned to the concept prompt's positions, see tokens.substitute_superclass). Where each concept may edit
(CONFINEMENTS): the paper's every position its gate opens at, or confined by prompt position or, per image
position, by region (regional_attention).

Per-call state travels in `cross_attention_kwargs={"perfusion": PerfusionCall}`: which concepts each batch
row uses, and the per-row basis shared by all layers. No call state -> the unedited layer, exactly.
Residual concepts' call (`"residuals"`, perfusion/residual_layers.py) is handed this layer's cross-attention
probabilities when its localized sampling needs them. Self-attention (attn1) receives the same kwargs from
the UNet, so its processor is wrapped to drop both entries (otherwise diffusers logs a warning on every call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from perfusion.concept import Concept
from perfusion.covariance import Covariance
from perfusion.errors import RenderError
from perfusion.models import cross_attention_layers
from perfusion.rank1 import EditBasis, build_edit_basis, gate
from perfusion.residual_layers import ResidualCall

GateOverrides = Mapping[str, tuple[float, float]]  # concept token -> (beta, tau)
# Called by every cross-attention layer of a recorded call: (layer name, (b, n, m) attention probabilities of
# each of the n image positions over the m prompt positions, averaged over heads), b in the UNet's batch order.
AttentionRecorder = Callable[[str, torch.Tensor], None]
# Where a concept may edit the prompt: "all" positions its gate opens at (the paper); only its own "token";
# everywhere but the other concepts' tokens ("not_other_tokens"; a row with one concept is then the paper's);
# "regions": per image position, as the paper inside the region its own token's cross-attention draws and
# only at its token elsewhere (see regional_attention). Rows with one concept are the paper's under all but "token".
CONFINEMENTS = ("all", "token", "not_other_tokens", "regions")
# gamma of regional_attention's weights: each concept's attention share is raised to it before normalising.
REGION_SHARPNESS = 1.0


@dataclass
class PerfusionCall:
    """State of one UNet forward: concepts per batch row, in the UNet's batch order (with classifier-free
    guidance, diffusers stacks [negative rows, positive rows]; both halves carry the row's concepts,
    because the edited layer is the model for that row)."""

    concepts: list[Concept]  # the distinct concepts used in this call
    slots: torch.Tensor  # (b, j) index into `concepts` for each row's slot; padded slots point at 0
    basis: EditBasis  # per-row quantities shared by every layer
    key_encodings: torch.Tensor | None = None  # (b, m, d): global locking's K-path input; None = local
    record_attention: AttentionRecorder | None = None  # diagnostics: costs one extra QK^T softmax a layer
    # (b, m, j): 1 where slot j's concept may edit prompt position m, 0 where that position is left exactly as the
    # base computes it (gate and projection both off); None: every position (the paper). See build(confine=).
    position_mask: torch.Tensor | None = None
    # (1 + j, b, m, j), confine="regions" only: [0] each slot open at its own token only (the pass whose attention
    # defines the regions); [1 + r] the edit region r's image positions see: slot r open everywhere but the other
    # slots' tokens, every other slot at its own token only.
    region_masks: torch.Tensor | None = None
    # Per-call caches (see apply_edit): [(encodings, version, dtype, mask, mix)], (layer, path, dtype) -> matrix.
    _mixes: list[tuple[torch.Tensor, int, torch.dtype, torch.Tensor | None, torch.Tensor]] = field(
        default_factory=list, repr=False
    )
    _matrices: dict[tuple[str, str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.slots.shape[0])

    @classmethod
    def build(
        cls,
        rows: Sequence[Sequence[Concept]],
        covariance: Covariance,
        *,
        overrides: Sequence[GateOverrides] | None = None,
        exact: bool = True,
        key_encodings: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        record_attention: AttentionRecorder | None = None,
        confine: str = "all",
        prompt_ids: tuple[torch.Tensor, Mapping[str, int]] | None = None,
    ) -> PerfusionCall:
        """rows[b]: the concepts active in batch row b (possibly none); overrides[b]: per-row beta/tau.
        Embedding-only concepts (textual inversion) act through their token alone and are left out here.
        confine (CONFINEMENTS) other than "all" sets position_mask from prompt_ids=(ids (b, m), concept token ->
        token id): "token", each concept edits only the positions of row b that hold its own token (its gate
        elsewhere, however open, is ignored); "not_other_tokens", every position but another concept's token;
        "regions" sets region_masks instead (regional_attention)."""
        if confine not in CONFINEMENTS:
            raise RenderError(f"confine must be one of {CONFINEMENTS}, not {confine!r}")
        if confine != "all" and prompt_ids is None:
            raise RenderError(f"confine={confine!r} needs the prompt_ids of the batch")
        rows = [[c for c in row if c.edits] for row in rows]
        concepts: list[Concept] = []
        index: dict[int, int] = {}
        for row in rows:
            for concept in row:
                if id(concept) not in index:
                    index[id(concept)] = len(concepts)
                    concepts.append(concept)
        width = max((len(row) for row in rows), default=0)
        slots = torch.zeros(len(rows), width, dtype=torch.long)
        gated_rows = []
        for b, row in enumerate(rows):
            row_overrides = overrides[b] if overrides is not None else {}
            slots[b, : len(row)] = torch.tensor([index[id(c)] for c in row], dtype=torch.long)
            gated_rows.append([(c.target_input, *row_overrides.get(c.token, (c.beta, c.tau))) for c in row])
        basis = build_edit_basis(gated_rows, covariance.c_inv, covariance.cholesky, exact=exact)
        position_mask = region_masks = None
        if confine != "all" and prompt_ids is not None:
            ids, token_ids = prompt_ids  # (b, m)
            own_token = torch.zeros(len(rows), ids.shape[1], width)  # (b, m, j): slot j's token positions
            for b, row in enumerate(rows):
                for j, concept in enumerate(row):
                    own_token[b, :, j] = (ids[b] == token_ids[concept.token]).float()
            # (b, m, j): every position but another slot's token (a concept's token appears in its row only once
            # per mention, and two slots never share a token)
            not_others = (1 - (own_token.sum(-1, keepdim=True) - own_token)).clamp(min=0)
            if confine == "token":
                position_mask = own_token.to(device)
            elif confine == "not_other_tokens":
                position_mask = not_others.to(device)
            else:
                variants = [own_token]
                for r in range(width):
                    variant = own_token.clone()
                    variant[:, :, r] = not_others[:, :, r]
                    variants.append(variant)
                region_masks = torch.stack(variants).to(device)
        return cls(
            concepts=concepts,
            slots=slots.to(device),
            basis=basis.to(device),
            key_encodings=key_encodings.to(device) if key_encodings is not None else None,
            record_attention=record_attention,
            position_mask=position_mask,
            region_masks=region_masks,
        )


class PerfusionAttnProcessor:
    """AttnProcessor2_0 plus the gated rank-1 edit of K and V. Stateless apart from its layer name:
    concept tensors arrive with each call, so one installed UNet serves any mix of concepts."""

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        perfusion: PerfusionCall | None = None,
        residuals: ResidualCall | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.layer_name}: PerfusionAttnProcessor is for cross-attention (attn2) only")
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, query_len, key_len) for scaled_dot_product_attention
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key_input = encoder_hidden_states
        if perfusion is not None and perfusion.key_encodings is not None:
            key_input = perfusion.key_encodings.to(encoder_hidden_states.dtype)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key_input = attn.norm_encoder_hidden_states(key_input)
        key = attn.to_k(key_input)  # (b, m, inner)
        value = attn.to_v(encoder_hidden_states)  # (b, m, inner)
        head_dim = key.shape[-1] // attn.heads
        query = _heads(query, attn.heads)  # (b, heads, n, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if perfusion is not None and perfusion.concepts and perfusion.batch_size != batch_size:
            raise RenderError(
                f"the Perfusion call describes {perfusion.batch_size} rows but the UNet batch has "
                f"{batch_size}; build the call for the batch the UNet sees (guidance doubles it)"
            )

        def edited(mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            """K and V in (b, heads, m, head_dim), with the concepts' edits under `mask` (None: the call's)."""
            k, v = key, value
            if perfusion is not None and perfusion.concepts:
                name, call = self.layer_name, perfusion
                k = apply_edit(
                    call, name, "k", key_input, k, attn.to_k.weight, lambda: self._key_targets(attn, call), mask
                )
                v = apply_edit(
                    call, name, "v", encoder_hidden_states, v, attn.to_v.weight, lambda: self._value_targets(call), mask
                )
            k = _heads(k, attn.heads)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            return k, _heads(v, attn.heads)

        if perfusion is not None and perfusion.concepts and perfusion.region_masks is not None:
            regions = perfusion.region_masks
            hidden_states = regional_attention(perfusion, regions, self.layer_name, query, edited, attention_mask)
            if residuals is not None and residuals.localized:
                residuals.observe(self.layer_name, attention_probabilities(query, edited(None)[0], attention_mask))
        else:
            k, v = edited(None)
            recorder = perfusion.record_attention if perfusion is not None else None
            if recorder is not None or (residuals is not None and residuals.localized):
                probabilities = attention_probabilities(query, k, attention_mask)
                if recorder is not None:
                    recorder(self.layer_name, probabilities)
                if residuals is not None:  # LAG's maps (perfusion/residual_layers.py)
                    residuals.observe(self.layer_name, probabilities)
            hidden_states = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _value_targets(self, call: PerfusionCall) -> torch.Tensor:
        """o*_V for each row's slots: (b, j, out). Gathered from one (n_concepts, out) table."""
        table = torch.stack([c.value_targets[self.layer_name] for c in call.concepts])
        return table.to(call.slots.device)[call.slots]

    def _key_targets(self, attn: Attention, call: PerfusionCall) -> torch.Tensor:
        """o*_K for each row's slots: (b, j, out). Key locking: W_K i_super, recomputed from the frozen W_K
        (so it can never drift or be trained); a concept trained without locking carries its own."""
        weight = attn.to_k.weight.float()
        rows = [
            c.key_targets[self.layer_name] if c.key_targets is not None else weight @ c.superclass_input.to(weight)
            for c in call.concepts
        ]
        return torch.stack(rows).to(call.slots.device)[call.slots]


def apply_edit(
    call: PerfusionCall,
    layer_name: str,
    path: str,
    encodings: torch.Tensor,
    projected: torch.Tensor,
    weight: torch.Tensor,
    targets: Callable[[], torch.Tensor],
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """h = W e_perp (+ bias) + sum_k gate_k(e) o*_k, as rank1.edit_projection (eq. 4), in one batched product:

        h = projected + [gate_k(e) | -c_k(e)]  @  [o*_k ; W u_k]        c_k(e) = e @ projection_dirs[:, :, k]
            (b, m, o)     (b, m, 2j): "mix"      (b, 2j, o): "matrix"

    The mix depends only on the encodings, which every attn2 layer of a UNet call shares (and, while rendering,
    every denoising step): it is computed once per encodings tensor, gates in float32 (s(e) near the threshold
    must not be rounded). The matrix depends only on the layer and the call: cached for renders; in training
    (gradients on) it is rebuilt every forward, since o*_V is being learned. Without gradients the product runs
    in the projection's dtype as one fused kernel; with gradients in float32, as the reference does.
    targets() -> o*_k for each row's slots: (b, j, o). position_mask (b, m, j): where each slot may edit; None:
    the call's own position_mask."""
    training = torch.is_grad_enabled()
    dtype = torch.float32 if training else projected.dtype
    mix = _mix(call, encodings, dtype, position_mask if position_mask is not None else call.position_mask)
    key = (layer_name, path, dtype)
    matrix = call._matrices.get(key)
    if matrix is None:
        with torch.autocast(encodings.device.type, enabled=False):
            weighted_basis = call.basis.projection_basis @ weight.float().T  # (b, j, o): W u_k
            matrix = torch.cat([targets().float(), weighted_basis], dim=1).to(dtype)  # (b, 2j, o)
        if not training:
            call._matrices[key] = matrix
    if not training:
        return torch.baddbmm(projected, mix, matrix)
    with torch.autocast(encodings.device.type, enabled=False):
        return projected + torch.bmm(mix, matrix).to(projected.dtype)


def _mix(
    call: PerfusionCall, encodings: torch.Tensor, dtype: torch.dtype, position_mask: torch.Tensor | None
) -> torch.Tensor:
    """[gate_k(e) | -c_k(e)] for every row and position: (b, m, 2j). Padded slots have gate 0 and a zero basis.
    Where position_mask (b, m, j) is 0, the slot's gate and projection are both off: the base's projection."""
    for tensor, version, cached_dtype, mask, mix in call._mixes:
        # Identity, not equality: holding `tensor` keeps its id from being reused; _version catches in-place edits.
        if tensor is encodings and version == encodings._version and cached_dtype == dtype and mask is position_mask:
            return mix
    basis = call.basis
    with torch.autocast(encodings.device.type, enabled=False):
        enc = encodings.float()
        coefficients = torch.bmm(enc, basis.projection_dirs)  # (b, m, j): u_k^T C^-1 e
        sims = torch.bmm(enc, basis.similarity_dirs)  # (b, m, j): s_k(e), eq. (2)
        gates = gate(sims, basis.beta[:, None, :], basis.tau[:, None, :]) * basis.active[:, None, :]  # eq. (3)
        if position_mask is not None:
            gates, coefficients = gates * position_mask, coefficients * position_mask
        mix = torch.cat([gates, -coefficients], dim=-1).to(dtype)
    # keep one entry per (K or V input, dtype, mask): 2 x 2 x (2 + slots) at most
    variants = 1 if call.region_masks is None else call.region_masks.shape[0] + 1
    call._mixes[:] = [e for e in call._mixes if not (e[0] is encodings and e[2] == dtype and e[3] is position_mask)]
    call._mixes[:] = call._mixes[-(4 * variants - 1) :]
    call._mixes.append((encodings, encodings._version, dtype, position_mask, mix))
    return mix


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, length, heads x head_dim) -> (b, heads, length, head_dim)."""
    return tensor.view(tensor.shape[0], tensor.shape[1], heads, -1).transpose(1, 2)


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(b, n, m): softmax(Q K^T / sqrt(head_dim)) as scaled_dot_product_attention computes it, head-averaged.
    query (b, heads, n, head_dim), key (b, heads, m, head_dim)."""
    scores = query.float() @ key.float().transpose(-1, -2) / math.sqrt(query.shape[-1])  # (b, heads, n, m)
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    return scores.softmax(-1).mean(1)


def regional_attention(
    call: PerfusionCall,
    masks: torch.Tensor,
    layer_name: str,
    query: torch.Tensor,
    edited: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Each concept's edit confined, per image position, to where its own token draws the cross-attention
    (as Personalized Residuals' localized sampling and FreeFuse do, with no boxes and in the same pass):

        A   = softmax(Q K_tok^T / sqrt(d))          (b, n, m)  K_tok: every concept edited at its own token only
        a_r = A @ t_r                               (b, n)     t_r (m,): 1 at slot r's token
        w_r = a_r^g / sum_s a_s^g                   (b, n)     g = REGION_SHARPNESS; rows with no concept token
                                                               (negative prompts): 1 / slots, the row's slots
        out = sum_r w_r * softmax(Q K_r^T / sqrt(d)) V_r        K_r, V_r: region_masks[1 + r]

    so the image positions drawn to slot r's token read the prompt as the paper's edit for r alone, with the
    other concepts present only at their own tokens. A row with one concept gets w_0 = 1: the paper exactly.
    Costs (1 + slots) attention products a layer instead of 1; still one UNet pass. query (b, heads, n, d);
    edited(mask) -> K, V (b, heads, m, d) under that mask; masks: the call's region_masks (1 + j, b, m, j).
    Returns (b, heads, n, d)."""
    key_tok, _ = edited(masks[0])
    probabilities = attention_probabilities(query, key_tok, attention_mask)  # (b, n, m)
    if call.record_attention is not None:
        call.record_attention(layer_name, probabilities)
    drawn = torch.bmm(probabilities, masks[0]) ** REGION_SHARPNESS  # (b, n, j)
    total = drawn.sum(-1, keepdim=True)
    active = call.basis.active.float()  # (b, j)
    fallback = active / active.sum(-1, keepdim=True).clamp(min=1)
    fallback[:, 0] += (active.sum(-1) == 0).float()  # a row with no concept: every region is the base, take one
    weights = torch.where(total > 0, drawn / total.clamp(min=torch.finfo(drawn.dtype).tiny), fallback[:, None, :])
    out = torch.zeros_like(query)
    for region in range(masks.shape[0] - 1):
        key, value = edited(masks[1 + region])
        region_out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out + weights[:, None, :, region, None].to(out.dtype) * region_out
    return out


class SelfAttentionPassthrough:
    """Wraps an attn1 processor so the UNet's `perfusion` kwarg is accepted and dropped."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(
        self,
        *args: object,
        perfusion: PerfusionCall | None = None,
        residuals: ResidualCall | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        return self.inner(*args, **kwargs)  # type: ignore[operator]


def install_processors(unet: torch.nn.Module) -> dict[str, PerfusionAttnProcessor]:
    """Put PerfusionAttnProcessor on every attn2 (and the passthrough on attn1). Idempotent."""
    installed: dict[str, PerfusionAttnProcessor] = {}
    for name, layer in cross_attention_layers(unet).items():
        if not isinstance(layer.processor, PerfusionAttnProcessor):
            layer.set_processor(PerfusionAttnProcessor(name))
        installed[name] = layer.processor
    for name, module in unet.named_modules():
        if (
            name.endswith("attn1")
            and isinstance(module, Attention)
            and not isinstance(module.processor, SelfAttentionPassthrough)
        ):
            module.set_processor(SelfAttentionPassthrough(module.processor or AttnProcessor2_0()))
    return installed
