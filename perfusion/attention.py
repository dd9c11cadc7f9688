"""The Perfusion cross-attention processor (diffusers' processor seam, attn2 only).

Installed on every cross-attention layer, it computes queries, keys and values as diffusers'
AttnProcessor2_0 does, then applies the gated rank-1 edit (perfusion/rank1.py) to K and V:
    K = W_K e_perp + sum_k gate_k o*_K,k      o*_K,k = W_K i_super,k   (key locking: never trained)
    V = W_V e_perp + sum_k gate_k o*_V,k      o*_V,k learned per layer
Local locking (default): K and V both see the concept prompt's encodings. Global locking: the K path,
gate included, sees the encodings of the same prompt with each concept word replaced by its superclass
(aligned to the concept prompt's positions, see tokens.substitute_superclass).

Per-call state travels in `cross_attention_kwargs={"perfusion": PerfusionCall}`: which concepts each batch
row uses, and the per-row basis shared by all layers. No call state -> the unedited layer, exactly.
Self-attention (attn1) receives the same kwargs from the UNet, so its processor is wrapped to drop the
`perfusion` entry (otherwise diffusers logs a warning on every call).
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

GateOverrides = Mapping[str, tuple[float, float]]  # concept token -> (beta, tau)
# Called by every cross-attention layer of a recorded call: (layer name, (b, n, m) attention probabilities of
# each of the n image positions over the m prompt positions, averaged over heads), b in the UNet's batch order.
AttentionRecorder = Callable[[str, torch.Tensor], None]
# Where a concept may edit the prompt: "all" positions its gate opens at (the paper); only its own "token";
# everywhere but the other concepts' tokens ("not_other_tokens"; a row with one concept is then the paper's).
CONFINEMENTS = ("all", "token", "not_other_tokens")


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
    # Per-call caches (see apply_edit): [(encodings, version, dtype, mix)] and (layer, path, dtype) -> matrix.
    _mixes: list[tuple[torch.Tensor, int, torch.dtype, torch.Tensor]] = field(default_factory=list, repr=False)
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
        elsewhere, however open, is ignored); "not_other_tokens", every position but another concept's token."""
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
        position_mask = None
        if confine != "all" and prompt_ids is not None:
            ids, token_ids = prompt_ids  # (b, m)
            position_mask = torch.zeros(len(rows), ids.shape[1], width)
            for b, row in enumerate(rows):
                for j, concept in enumerate(row):
                    if confine == "token":
                        position_mask[b, :, j] = (ids[b] == token_ids[concept.token]).float()
                    else:
                        others = [token_ids[c.token] for c in row if c.token != concept.token]
                        position_mask[b, :, j] = (~torch.isin(ids[b], torch.tensor(others, dtype=ids.dtype))).float()
            position_mask = position_mask.to(device)
        return cls(
            concepts=concepts,
            slots=slots.to(device),
            basis=basis.to(device),
            key_encodings=key_encodings.to(device) if key_encodings is not None else None,
            record_attention=record_attention,
            position_mask=position_mask,
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
        if perfusion is not None and perfusion.concepts:
            if perfusion.batch_size != batch_size:
                raise RenderError(
                    f"the Perfusion call describes {perfusion.batch_size} rows but the UNet batch has "
                    f"{batch_size}; build the call for the batch the UNet sees (guidance doubles it)"
                )
            name = self.layer_name
            key = apply_edit(
                perfusion, name, "k", key_input, key, attn.to_k.weight, lambda: self._key_targets(attn, perfusion)
            )
            value = apply_edit(
                perfusion,
                name,
                "v",
                encoder_hidden_states,
                value,
                attn.to_v.weight,
                lambda: self._value_targets(perfusion),
            )

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, n, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, m, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if perfusion is not None and perfusion.record_attention is not None:
            # the probabilities scaled_dot_product_attention computes below (its default scale, 1/sqrt(head_dim))
            scores = query.float() @ key.float().transpose(-1, -2) / math.sqrt(head_dim)  # (b, heads, n, m)
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            perfusion.record_attention(self.layer_name, scores.softmax(-1).mean(1))
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
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
) -> torch.Tensor:
    """h = W e_perp (+ bias) + sum_k gate_k(e) o*_k, as rank1.edit_projection (eq. 4), in one batched product:

        h = projected + [gate_k(e) | -c_k(e)]  @  [o*_k ; W u_k]        c_k(e) = e @ projection_dirs[:, :, k]
            (b, m, o)     (b, m, 2j): "mix"      (b, 2j, o): "matrix"

    The mix depends only on the encodings, which every attn2 layer of a UNet call shares (and, while rendering,
    every denoising step): it is computed once per encodings tensor, gates in float32 (s(e) near the threshold
    must not be rounded). The matrix depends only on the layer and the call: cached for renders; in training
    (gradients on) it is rebuilt every forward, since o*_V is being learned. Without gradients the product runs
    in the projection's dtype as one fused kernel; with gradients in float32, as the reference does.
    targets() -> o*_k for each row's slots: (b, j, o)."""
    training = torch.is_grad_enabled()
    dtype = torch.float32 if training else projected.dtype
    mix = _mix(call, encodings, dtype)
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


def _mix(call: PerfusionCall, encodings: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[gate_k(e) | -c_k(e)] for every row and position: (b, m, 2j). Padded slots have gate 0 and a zero basis."""
    for tensor, version, cached_dtype, mix in call._mixes:
        # Identity, not equality: holding `tensor` keeps its id from being reused; _version catches in-place edits.
        if tensor is encodings and version == encodings._version and cached_dtype == dtype:
            return mix
    basis = call.basis
    with torch.autocast(encodings.device.type, enabled=False):
        enc = encodings.float()
        coefficients = torch.bmm(enc, basis.projection_dirs)  # (b, m, j): u_k^T C^-1 e
        sims = torch.bmm(enc, basis.similarity_dirs)  # (b, m, j): s_k(e), eq. (2)
        gates = gate(sims, basis.beta[:, None, :], basis.tau[:, None, :]) * basis.active[:, None, :]  # eq. (3)
        if call.position_mask is not None:  # confined: off the concept's own token, the base's projection
            gates, coefficients = gates * call.position_mask, coefficients * call.position_mask
        mix = torch.cat([gates, -coefficients], dim=-1).to(dtype)
    call._mixes[:] = [entry for entry in call._mixes if entry[0] is not encodings][-3:]  # K and V inputs, 2 dtypes
    call._mixes.append((encodings, encodings._version, dtype, mix))
    return mix


class SelfAttentionPassthrough:
    """Wraps an attn1 processor so the UNet's `perfusion` kwarg is accepted and dropped."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(self, *args: object, perfusion: PerfusionCall | None = None, **kwargs: object) -> torch.Tensor:
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
