"""Intruder dimensions (Shuttleworth et al. 2024, Alg. 1) against float64 SVD references and planted cases."""

from __future__ import annotations

import numpy as np
import pytest

from lorasurgery.linalg.intruders import intruder_dimensions


def reference_max_cosine(W: np.ndarray, tuned: np.ndarray, k: int) -> np.ndarray:
    """Alg. 1 by the definition: full float64 SVDs, max |cos| of each top-k u' against every u of W."""
    U = np.linalg.svd(W, full_matrices=False)[0]
    U_tuned = np.linalg.svd(tuned, full_matrices=False)[0][:, :k]
    return np.abs(U_tuned.T @ U).max(axis=1)


def decaying(d: int, n: int, rng) -> np.ndarray:
    """A W with a distinct, decaying spectrum (like a trained weight): U diag(σ) Vᵀ."""
    U = np.linalg.qr(rng.standard_normal((d, d)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    m = min(d, n)
    return U[:, :m] @ np.diag(np.geomspace(10, 0.1, m)) @ V[:, :m].T


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (48, 48)])
def test_matches_the_float64_definition_for_low_rank_and_dense_updates(shape):
    rng = np.random.default_rng(0)
    W = decaying(*shape, rng)
    A, B, s = rng.standard_normal((4, shape[1])), rng.standard_normal((shape[0], 4)), 0.7
    tuned = W + s * B @ A
    expected = reference_max_cosine(W, tuned, 10)
    for result in (
        intruder_dimensions(W, factors=(A, B, s), k=10),
        intruder_dimensions(W, tuned=tuned, k=10),
    ):
        np.testing.assert_allclose(result.max_cosine, expected, atol=1e-8)
        assert result.count == int((expected < 0.5).sum())
    assert intruder_dimensions(W, factors=(A, B, s), k=10, eps=1.01).count == 10  # every |cos| ≤ 1


@pytest.mark.parametrize("shape", [(40, 60), (60, 40)])
def test_an_update_orthogonal_to_ws_top_directions_creates_one_intruder(shape):
    """ΔW = c·u vᵀ with u, v spread evenly over W's 20 weakest directions: |cos| ≤ 1/√20 with every uⱼ.
    W'W'ᵀ then splits into W's untouched top block and a block holding u: exactly one intruder."""
    rng = np.random.default_rng(1)
    d, n = shape
    U = np.linalg.qr(rng.standard_normal((d, d)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    m = min(d, n)
    W = U[:, :m] @ np.diag(np.geomspace(10, 0.1, m)) @ V[:, :m].T
    u = U[:, m - 20 : m].sum(axis=1) / np.sqrt(20)
    v = V[:, m - 20 : m].sum(axis=1) / np.sqrt(20)
    A, B = v[None, :], u[:, None]  # rank 1: ΔW = s·u vᵀ
    result = intruder_dimensions(W, factors=(A, B, 30.0), k=10)
    assert result.count == 1
    assert result.max_cosine[0] < 0.5 and min(result.max_cosine[1:]) > 0.99  # the rest are W's own
    np.testing.assert_allclose(result.max_cosine, reference_max_cosine(W, W + 30.0 * B @ A, 10), atol=1e-8)


def test_an_update_inside_ws_span_creates_none():
    """ΔW = U_r diag(δ) V_rᵀ along W's own top directions (even reordering them): no intruders."""
    rng = np.random.default_rng(2)
    U = np.linalg.qr(rng.standard_normal((50, 50)))[0]
    V = np.linalg.qr(rng.standard_normal((70, 70)))[0]
    sigma = np.geomspace(10, 0.1, 50)
    W = U @ np.diag(sigma) @ V[:, :50].T
    delta = U[:, 5:9] @ np.diag([12.0, 8.0, 5.0, 3.0]) @ V[:, 5:9].T  # boosts directions 6–9 to the top
    for result in (
        intruder_dimensions(W, tuned=W + delta, k=10),
        intruder_dimensions(W, factors=(V[:, 5:9].T, U[:, 5:9] @ np.diag([12.0, 8.0, 5.0, 3.0]), 1.0), k=10),
    ):
        assert result.count == 0 and min(result.max_cosine) > 0.999


def test_zero_update_and_degenerate_k():
    rng = np.random.default_rng(3)
    W = decaying(20, 30, rng)
    result = intruder_dimensions(W, tuned=W.copy(), k=10)
    assert result.count == 0 and min(result.max_cosine) > 1 - 1e-9
    assert intruder_dimensions(W, tuned=W, k=50).max_cosine.__len__() == 20  # k capped at min(d, n)
    assert intruder_dimensions(W, tuned=W, k=0).count == 0
