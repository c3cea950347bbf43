"""The LoRA paper's analyses: subspace similarity grid and amplification factor (docs/design.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from lorasurgery.linalg.analyses import amplification, subspace_similarity, subspace_similarity_grid
from lorasurgery.linalg.svd import singular_values


def haar_rows(r: int, n: int, g: torch.Generator) -> torch.Tensor:
    """r orthonormal rows spanning a uniformly random r-dimensional subspace of R^n."""
    Q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return Q.T


def test_a_subspace_is_fully_similar_to_itself():
    g = torch.Generator().manual_seed(0)
    V = haar_rows(8, 100, g)
    grid = subspace_similarity_grid(V, V)
    assert torch.allclose(grid, torch.ones(8, 8, dtype=torch.float64))
    result = subspace_similarity(V, V)
    assert result["subspace_similarity_1_1"] == pytest.approx(1.0)
    assert len(result["subspace_similarity"]) == 8 and len(result["subspace_similarity"][0]) == 8


def test_grid_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    V1, V2 = haar_rows(5, 40, g), haar_rows(7, 40, g)
    grid = subspace_similarity_grid(V1, V2)
    assert grid.shape == (5, 7)
    for i in range(1, 6):
        for j in range(1, 8):
            direct = float((V1[:i] @ V2[:j].T).square().sum()) / min(i, j)
            assert float(grid[i - 1, j - 1]) == pytest.approx(direct, rel=1e-12)


def test_independent_random_subspaces_overlap_by_max_i_j_over_n():
    # E‖U_iᵀU_j‖_F² = i·j/n for independent uniform subspaces, so E φ(i, j) = max(i, j)/n.
    g = torch.Generator().manual_seed(2)
    n, r, trials = 256, 8, 60
    mean = (
        sum(subspace_similarity_grid(haar_rows(r, n, g), haar_rows(r, n, g)) for _ in range(trials)) / trials
    )
    index = torch.arange(1, r + 1, dtype=torch.float64)
    expected = torch.maximum(index[:, None], index[None, :]) / n
    # φ(1, 1) is a single squared cosine (variance ≈ 2/n²), the larger entries average many terms.
    assert torch.allclose(mean, expected, rtol=0.35, atol=0.0)
    assert float((mean / expected).mean()) == pytest.approx(1.0, abs=0.08)


def test_shared_top_direction_shows_in_phi_1_1():
    g = torch.Generator().manual_seed(3)
    V1 = haar_rows(4, 64, g)
    V2 = torch.cat([V1[:1], haar_rows(3, 64, g)])  # same top direction (not orthogonalised)
    assert subspace_similarity(V1, V2)["subspace_similarity_1_1"] == pytest.approx(1.0)


def weight(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A weight with a decaying spectrum, like trained W."""
    m = min(d, k)
    U, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64))
    return (U * torch.arange(1, m + 1, dtype=torch.float64) ** -0.7) @ V.T


def top_factors(delta: torch.Tensor, r: int):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :r], Vh[:r], float(S.square().sum().sqrt())


def test_update_along_w_top_directions_amplifies_little_and_random_update_a_lot():
    g = torch.Generator().manual_seed(4)
    d, k, r = 96, 128, 4
    W = weight(d, k, g)
    U_w, S_w, Vh_w = torch.linalg.svd(W, full_matrices=False)
    aligned = (U_w[:, :r] * torch.tensor([0.3, 0.2, 0.2, 0.1], dtype=torch.float64)) @ Vh_w[:r]
    U_r, Vh_r, fro = top_factors(aligned, r)
    result = amplification(U_r, Vh_r, fro, W)
    assert set(result) == {"amplification", "amplification_random_baseline", "amplification_w_top_baseline"}
    w_top = float(S_w[:r].square().sum().sqrt())
    assert result["amplification_w_top_baseline"] == pytest.approx(w_top, rel=1e-9)
    # Aligned with W's top-r frame: U_rᵀ W V_r carries exactly W's top-r energy.
    assert result["amplification"] == pytest.approx(fro / w_top, rel=1e-9)
    assert result["amplification_random_baseline"] == pytest.approx(r * float(W.norm()) / math.sqrt(d * k))

    random_delta = haar_rows(r, d, g).T @ haar_rows(r, k, g) * 0.2
    U_r, Vh_r, fro_random = top_factors(random_delta, r)
    random_result = amplification(U_r, Vh_r, fro_random, W, w_singular_values=S_w)
    assert random_result["amplification"] > 10 * result["amplification"]


def test_random_baseline_matches_monte_carlo():
    # RMS of ‖U_rᵀ W V_r‖_F over Haar frames is r·‖W‖_F/sqrt(d·k) exactly; the mean is close.
    g = torch.Generator().manual_seed(5)
    d, k, r, trials = 64, 48, 4, 400
    W = weight(d, k, g) + 0.05 * torch.randn(d, k, generator=g, dtype=torch.float64)
    norms = torch.tensor(
        [float((haar_rows(r, d, g) @ W @ haar_rows(r, k, g).T).norm()) for _ in range(trials)],
        dtype=torch.float64,
    )
    baseline = amplification(torch.eye(d, r, dtype=torch.float64), torch.eye(r, k), 1.0, W)[
        "amplification_random_baseline"
    ]
    assert float(norms.square().mean().sqrt()) == pytest.approx(baseline, rel=0.05)
    assert float(norms.mean()) == pytest.approx(baseline, rel=0.10)


def test_amplification_degenerate_cases_stay_json_safe():
    W = torch.zeros(6, 5)
    W[0, 0] = 1.0
    U_r = torch.eye(6, 1)[:, :1].roll(1, 0)  # e_2: orthogonal to W's only direction
    Vh_r = torch.eye(1, 5)
    assert amplification(U_r, Vh_r, 1.0, W)["amplification"] is None
    assert amplification(U_r, Vh_r, 0.0, W)["amplification"] == 0.0
    assert amplification(U_r, Vh_r, 1.0, W, w_singular_values=singular_values(W))[
        "amplification_w_top_baseline"
    ] == pytest.approx(1.0)
