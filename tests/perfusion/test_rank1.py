"""The gated rank-1 edit's math, asserted numerically (PERFUSION.md)."""

from __future__ import annotations

import pytest
import torch

from perfusion.rank1 import build_edit_basis, edit_projection, gate, orthonormal_basis, similarity, single_concept_edit
from tests.helpers import random_vectors

DIM, OUT = 12, 7


@pytest.fixture
def metric() -> tuple[torch.Tensor, torch.Tensor]:
    """A random SPD C^-1 (float64) with condition number ~1e2, and its Cholesky factor."""
    a = random_vectors(DIM, DIM, seed=1)
    c = a @ a.T / DIM + 0.05 * torch.eye(DIM, dtype=torch.float64)
    c_inv = torch.linalg.inv(c)
    c_inv = (c_inv + c_inv.T) / 2
    return c_inv, torch.linalg.cholesky(c_inv)


def _edit(e, weight, rows, targets, metric, exact=True):
    c_inv, chol = metric
    basis = build_edit_basis(rows, c_inv.float(), chol, exact=exact)
    return edit_projection(e.float(), e.float() @ weight.float().T, weight.float(), basis, targets.float())


@pytest.mark.parametrize(
    ("beta", "tau", "at_one", "at_zero"),
    [(0.75, 0.1, 0.924, 0.00055), (0.7, 0.15, 0.881, 0.0093), (0.4, 0.15, 0.982, 0.065)],
)
def test_gate_matches_the_reference_values(beta, tau, at_one, at_zero):
    assert gate(torch.tensor(1.0), beta, tau).item() == pytest.approx(at_one, abs=1e-3)
    assert gate(torch.tensor(0.0), beta, tau).item() == pytest.approx(at_zero, rel=2e-2)


def test_similarity_is_one_at_the_target_input(metric):
    i_star = random_vectors(1, DIM, seed=2)[0]
    assert similarity(i_star, i_star, metric[0]).item() == pytest.approx(1.0)


def test_closed_gate_leaves_only_the_projected_base_output(metric):
    """beta far above any similarity: no o* leaks; h = W e_perp, and h = W e exactly where s(e) = 0."""
    c_inv, _ = metric
    weight, i_star, o_star = random_vectors(OUT, DIM, 3), random_vectors(1, DIM, 4)[0], random_vectors(1, OUT, 5)
    e = random_vectors(5, DIM, 6)[None]  # (1, m, d)
    h = _edit(e, weight, [[(i_star, 1e4, 0.1)]], o_star[None], metric)
    s = similarity(e[0], i_star, c_inv)
    expected = (e[0] - s[:, None] * i_star) @ weight.T
    torch.testing.assert_close(h[0].double(), expected, atol=1e-5, rtol=1e-5)
    # an encoding C^-1-orthogonal to i*: the layer is exactly the unedited one
    orthogonal = e[0, 0] - similarity(e[0, 0], i_star, c_inv) * i_star
    h_orth = _edit(orthogonal[None, None], weight, [[(i_star, 1e4, 0.1)]], o_star[None], metric)
    torch.testing.assert_close(h_orth[0, 0].double(), orthogonal @ weight.T, atol=1e-5, rtol=1e-5)


def test_target_input_maps_to_gated_target_output(metric):
    """e = i*  ->  h = W (e - i*) + gate(1) o* = gate(1) o*."""
    weight, i_star, o_star = random_vectors(OUT, DIM, 3), random_vectors(1, DIM, 4)[0], random_vectors(1, OUT, 5)
    h = _edit(i_star[None, None], weight, [[(i_star, 0.75, 0.1)]], o_star[None], metric)
    expected = gate(torch.tensor(1.0), 0.75, 0.1).item() * o_star[0]
    torch.testing.assert_close(h[0, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_batched_edit_equals_the_literal_single_concept_formula(metric):
    c_inv, _ = metric
    weight, i_star, o_star = random_vectors(OUT, DIM, 3), random_vectors(1, DIM, 4)[0], random_vectors(1, OUT, 5)[0]
    e = random_vectors(9, DIM, 7)
    e[3] = i_star  # one token exactly at the concept
    literal = single_concept_edit(e, weight, i_star, o_star, c_inv, 0.7, 0.15)
    for exact in (True, False):  # with one concept, exact and approximate projections are the same
        batched = _edit(e[None], weight, [[(i_star, 0.7, 0.15)]], o_star[None, None], metric, exact=exact)
        torch.testing.assert_close(batched[0].double(), literal, atol=1e-5, rtol=1e-5)


def test_exact_basis_is_orthonormal_in_the_inverse_covariance_metric(metric):
    c_inv, chol = metric
    inputs = random_vectors(3, DIM, 8)
    basis = orthonormal_basis(inputs, chol)  # (3, d)
    torch.testing.assert_close(basis @ c_inv @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    # span: each i* is reproduced by its C^-1 projection onto the basis
    reprojected = (inputs @ c_inv @ basis.T) @ basis
    torch.testing.assert_close(reprojected, inputs, atol=1e-10, rtol=0)


def test_exact_projection_removes_every_concept_direction_in_the_metric(metric):
    """e_perp must be C^-1-orthogonal to every i*_k. The Euclidean u (u . e) bug fails this."""
    c_inv, chol = metric
    inputs = random_vectors(3, DIM, 9)
    e = random_vectors(6, DIM, 10)
    basis = build_edit_basis([[(i, 0.7, 0.15) for i in inputs]], c_inv.float(), chol, exact=True)
    coefficients = e.float() @ basis.projection_dirs[0]  # (m, j)
    e_perp = e.float() - coefficients @ basis.projection_basis[0]
    residual = e_perp.double() @ c_inv @ inputs.T  # (m, j)
    assert residual.abs().max().item() < 1e-4 * e.abs().max().item() * c_inv.abs().max().item()
    euclidean = e - (e @ basis.projection_basis[0].double().T) @ basis.projection_basis[0].double()
    assert (euclidean @ c_inv @ inputs.T).abs().max().item() > 1e-2  # the bug is detectable


def test_exact_equals_approximation_for_metric_orthogonal_concepts(metric):
    c_inv, _ = metric
    first, raw = random_vectors(2, DIM, 11)
    second = raw - (first @ c_inv @ raw) / (first @ c_inv @ first) * first  # C^-1-orthogonal to first
    weight, targets = random_vectors(OUT, DIM, 12), random_vectors(2, OUT, 13)[None]
    e = random_vectors(8, DIM, 14)[None]
    rows = [[(first, 0.7, 0.15), (second, 0.6, 0.2)]]
    exact = _edit(e, weight, rows, targets, metric, exact=True)
    approx = _edit(e, weight, rows, targets, metric, exact=False)
    torch.testing.assert_close(exact, approx, atol=1e-4, rtol=1e-4)
    # ...and they do differ when the concepts are not orthogonal (so the check above means something)
    skewed = [[(first, 0.7, 0.15), (first + 0.5 * raw, 0.6, 0.2)]]
    assert (
        _edit(e, weight, skewed, targets, metric) - _edit(e, weight, skewed, targets, metric, exact=False)
    ).abs().max() > 1e-3


def test_each_concept_uses_its_own_gate(metric):
    weight, targets = random_vectors(OUT, DIM, 3), random_vectors(2, OUT, 5)[None]
    first, second = random_vectors(2, DIM, 15)
    e = first[None, None]
    open_second = _edit(e, weight, [[(first, 0.7, 0.15), (second, -5.0, 0.1)]], targets, metric)
    closed_second = _edit(e, weight, [[(first, 0.7, 0.15), (second, 50.0, 0.1)]], targets, metric)
    # only the second concept's gate changed: the difference is (gate_open - gate_closed) * o*_2
    diff = (open_second - closed_second)[0, 0]
    torch.testing.assert_close(diff, targets[0, 1].float(), atol=1e-4, rtol=1e-4)


def test_rows_without_concepts_are_untouched_in_a_mixed_batch(metric):
    weight, i_star = random_vectors(OUT, DIM, 3), random_vectors(1, DIM, 4)[0]
    e = random_vectors(2 * 5, DIM, 16).reshape(2, 5, DIM)
    targets = random_vectors(1, OUT, 5)[None].expand(2, 1, OUT)
    h = _edit(e, weight, [[(i_star, 0.7, 0.15)], []], targets, metric)
    assert torch.equal(h[1], (e[1].float() @ weight.float().T))
    assert not torch.allclose(h[0], e[0].float() @ weight.float().T)


def test_half_precision_inputs_keep_their_dtype_and_accuracy(metric):
    c_inv, chol = metric
    weight, i_star, o_star = random_vectors(OUT, DIM, 3), random_vectors(1, DIM, 4)[0], random_vectors(1, OUT, 5)
    e = random_vectors(6, DIM, 17)[None]
    basis = build_edit_basis([[(i_star, 0.7, 0.15)]], c_inv.float(), chol)
    half = edit_projection(e.half(), (e.half() @ weight.half().T), weight.half(), basis, o_star[None].half())
    full = edit_projection(e.float(), e.float() @ weight.float().T, weight.float(), basis, o_star[None].float())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2)


def test_coinciding_target_inputs_project_their_shared_direction_once(metric):
    """Two concepts with the same i* (untrained products of one superclass): the projection is the
    single-concept one, and each concept's gate still adds its own o*."""
    c_inv, chol = metric
    i_star = random_vectors(1, DIM, 4)[0]
    assert orthonormal_basis(torch.stack([i_star, i_star]), chol).shape == (1, DIM)
    weight, targets = random_vectors(OUT, DIM, 3), random_vectors(2, OUT, 5)
    e = random_vectors(6, DIM, 18)
    both = _edit(e[None], weight, [[(i_star, 0.7, 0.15), (i_star, 0.7, 0.15)]], targets[None], metric)
    literal = single_concept_edit(e, weight, i_star, targets[0], c_inv, 0.7, 0.15)
    literal = literal + gate(similarity(e, i_star, c_inv), 0.7, 0.15)[:, None] * targets[1]
    torch.testing.assert_close(both[0].double(), literal, atol=1e-5, rtol=1e-5)


def test_unrelated_encodings_rarely_open_the_gate_at_stable_diffusion_width():
    """d = 768: for e and i* drawn from the distribution C describes, s(e) has RMS 1/sqrt(energy) ~ 1/sqrt(d),
    so the gate (beta 0.7, tau 0.15) stays shut for unrelated encodings."""
    dim = 768
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    c = mixing @ mixing.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    c_inv = torch.linalg.inv(c)
    samples = torch.randn(2000, dim, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(c).T
    i_star = samples[0]
    s = similarity(samples[1:], i_star, c_inv)
    assert (gate(s, 0.7, 0.15) > 0.1).double().mean().item() < 0.01
    assert s.pow(2).mean().item() == pytest.approx(1 / (i_star @ c_inv @ i_star).item(), rel=0.15)
