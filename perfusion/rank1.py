"""The gated rank-1 edit as pure tensor functions (paper eq. 2-3, sec. 4.3; PERFUSION.md).

Notation (einsum legend):
    b  batch rows            m  tokens per prompt (77)       d  text-encoder width
    j  concept slots of a row (padded to the widest row; padded slots are inactive)
    o  output width of the projection W (o x d)

Single concept, eq. (3):
    energy = i*^T C^-1 i*                  s(e) = i*^T C^-1 e / energy
    gate(e) = sigmoid((s(e) - beta) / tau)
    h(e) = W (e - s(e) i*) + gate(e) o*

Several concepts (sec. 4.3, appendix B), exact: let U = [u_1..u_r] be a C^-1-orthonormal basis of
span(i*_1..i*_J) (C^-1 = L L^T, Q an orthonormal basis of L^T I, U = L^-T Q). Then
    e_perp = e - sum_k u_k (u_k^T C^-1 e)
    h(e)   = W e_perp + sum_k gate_k(e) o*_k            gate_k with that concept's own beta_k, tau_k
Approximation (endorsed by the first author): e_perp ~ e - sum_k s_k(e) i*_k.

Implementation form: W e_perp = W e - (W U)(U^T C^-1 e). The caller computes W e as usual (the unedited
projection, bias included); the edit is two small bmm's per layer. Coefficients are computed in float32
whatever the model dtype (C^-1 can be ill-conditioned; SD1.5's cond. number is ~4e3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gate(similarity: torch.Tensor, beta: torch.Tensor | float, tau: torch.Tensor | float) -> torch.Tensor:
    """eq. (3): sigmoid((s - beta) / tau). (0.75, 0.1): s=1 -> 0.924, s=0 -> 0.00055."""
    return torch.sigmoid((similarity - beta) / tau)


def similarity(encodings: torch.Tensor, target_input: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """s(e) = i*^T C^-1 e / (i*^T C^-1 i*) for encodings (..., d) and one i* (d,) -> (...)."""
    direction = c_inv @ target_input  # (d,)
    return (encodings @ direction) / (target_input @ direction)


def single_concept_edit(
    encodings: torch.Tensor,
    weight: torch.Tensor,
    target_input: torch.Tensor,
    target_output: torch.Tensor,
    c_inv: torch.Tensor,
    beta: float,
    tau: float,
) -> torch.Tensor:
    """eq. (3) written literally, for one concept: (..., d) -> (..., o). The reference the batched form
    (`edit_projection`) is tested against."""
    s = similarity(encodings, target_input, c_inv)  # (...)
    e_perp = encodings - s[..., None] * target_input  # (..., d)
    return e_perp @ weight.T + gate(s, beta, tau)[..., None] * target_output


def orthonormal_basis(target_inputs: torch.Tensor, c_inv_cholesky: torch.Tensor) -> torch.Tensor:
    """U (r, d): rows u_k orthonormal in the C^-1 metric (U C^-1 U^T = I), spanning the i*_k (r = rank).

    target_inputs (j, d); c_inv_cholesky L (d, d) lower-triangular with C^-1 = L L^T.
    PERFUSION.md writes Q = QR(L^T I^T), U^T = L^-T Q. We take Q from an SVD instead: the same subspace,
    hence the same projector e - U^T U C^-1 e, but it also handles concepts whose i* coincide or nearly do
    (two untrained products of one superclass start at the same i_super): their shared direction is
    removed once instead of failing.
    """
    lower = c_inv_cholesky.to(torch.float64)
    whitened = lower.T @ target_inputs.to(torch.float64).T  # (d, j)
    q, singular, _ = torch.linalg.svd(whitened, full_matrices=False)  # q (d, j)
    rank = int((singular > 1e-9 * singular.max()).sum())
    basis_t = torch.linalg.solve_triangular(lower.T, q[:, :rank], upper=True)  # (d, r) = L^-T Q
    return basis_t.T


@dataclass(frozen=True)
class EditBasis:
    """Per-row quantities of one forward call, shared by every layer (built once per UNet call).

    projection_basis  (b, j, d)  vectors whose span is removed from e (u_k exact; i*_k approximate)
    projection_dirs   (b, d, j)  coefficient directions: coeff = e @ dirs (C^-1 u_k; C^-1 i*_k / energy_k)
    similarity_dirs   (b, d, j)  s_k(e) = e @ dirs[:, :, k] = i*_k^T C^-1 e / energy_k
    beta, tau         (b, j)     each concept's own gate
    active            (b, j)     False for padded slots: gate forced to 0, basis rows zero
    """

    projection_basis: torch.Tensor
    projection_dirs: torch.Tensor
    similarity_dirs: torch.Tensor
    beta: torch.Tensor
    tau: torch.Tensor
    active: torch.Tensor

    def to(self, device: torch.device | str) -> EditBasis:
        return EditBasis(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def build_edit_basis(
    rows: list[list[tuple[torch.Tensor, float, float]]],
    c_inv: torch.Tensor,
    c_inv_cholesky: torch.Tensor,
    exact: bool = True,
) -> EditBasis:
    """rows[b] = [(i*_k (d,), beta_k, tau_k), ...] for the concepts active in batch row b (may be empty).

    Rows with the same concepts share the same math but are computed independently: J is small and the
    QR is (d x J), so this costs microseconds next to a UNet call.
    """
    batch, width = len(rows), max((len(r) for r in rows), default=0)
    dim = c_inv.shape[0]
    # Built on the CPU in float64 whatever device the concepts live on; EditBasis.to() moves the result.
    c_inv64 = c_inv.detach().to("cpu", torch.float64)
    c_inv_cholesky = c_inv_cholesky.detach().to("cpu", torch.float64)
    projection_basis = torch.zeros(batch, width, dim, dtype=torch.float64)
    projection_dirs = torch.zeros(batch, dim, width, dtype=torch.float64)
    similarity_dirs = torch.zeros(batch, dim, width, dtype=torch.float64)
    beta = torch.zeros(batch, width, dtype=torch.float64)
    tau = torch.ones(batch, width, dtype=torch.float64)
    active = torch.zeros(batch, width, dtype=torch.bool)
    for b, concepts in enumerate(rows):
        if not concepts:
            continue
        count = len(concepts)
        inputs = torch.stack([i.detach().to("cpu", torch.float64) for i, _, _ in concepts])  # (j, d)
        directions = inputs @ c_inv64  # (j, d): C^-1 i*_k (C^-1 is symmetric)
        energy = (directions * inputs).sum(-1)  # (j,)
        similarity_dirs[b, :, :count] = (directions / energy[:, None]).T
        if exact:
            basis = orthonormal_basis(inputs, c_inv_cholesky)  # (r, d), r <= j; unused slots stay zero
            projection_basis[b, : len(basis)] = basis
            projection_dirs[b, :, : len(basis)] = (basis @ c_inv64).T
        else:
            projection_basis[b, :count] = inputs
            projection_dirs[b, :, :count] = similarity_dirs[b, :, :count]
        beta[b, :count] = torch.tensor([bt for _, bt, _ in concepts], dtype=torch.float64)
        tau[b, :count] = torch.tensor([t for _, _, t in concepts], dtype=torch.float64)
        active[b, :count] = True
    return EditBasis(
        projection_basis=projection_basis.float(),
        projection_dirs=projection_dirs.float(),
        similarity_dirs=similarity_dirs.float(),
        beta=beta.float(),
        tau=tau.float(),
        active=active,
    )


def edit_projection(
    encodings: torch.Tensor,
    projected: torch.Tensor,
    weight: torch.Tensor,
    basis: EditBasis,
    target_outputs: torch.Tensor,
) -> torch.Tensor:
    """Apply the gated edit to an already computed projection.

    encodings (b, m, d); projected = W e (+ bias) (b, m, o); weight W (o, d); target_outputs o*_k (b, j, o).
    Returns h (b, m, o) = W e_perp (+ bias) + sum_k gate_k(e) o*_k.
    """
    if basis.active.shape[1] == 0:
        return projected
    # float32 even inside a bf16/fp16 autocast region (training on GPU): s(e) near the gate's threshold
    # must not be rounded to bf16's 8 bits.
    with torch.autocast(encodings.device.type, enabled=False):
        enc = encodings.float()
        coefficients = torch.bmm(enc, basis.projection_dirs)  # (b, m, j): u_k^T C^-1 e
        sims = torch.bmm(enc, basis.similarity_dirs)  # (b, m, j): s_k(e)
        gates = gate(sims, basis.beta[:, None, :], basis.tau[:, None, :])  # (b, m, j)
        gates = gates * basis.active[:, None, :]
        weighted_basis = basis.projection_basis @ weight.float().T  # (b, j, o): W u_k
        correction = torch.bmm(gates, target_outputs.float()) - torch.bmm(coefficients, weighted_basis)
    return projected + correction.to(projected.dtype)
