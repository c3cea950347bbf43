"""Rank policies (docs/design.md §4): each picks the planted rank, edges are exact, the budget allocation is
checked against brute force."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgery.linalg.policies import (
    allocate_budget,
    gavish_donoho_omega,
    gavish_donoho_threshold,
    rank_energy,
    rank_fixed,
    rank_gavish_donoho,
    rank_ratio,
)
from lorasurgery.linalg.svd import singular_values

PLANTED_RANK = 10


def planted_spectrum(signal: torch.Tensor, noise: float, d: int = 300, n: int = 500, seed: int = 0):
    """Singular values of U diag(signal) Vᵀ + N(0, noise²) noise, shape (d, n)."""
    g = torch.Generator().manual_seed(seed)
    r = len(signal)
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    M = (U * signal.double()) @ V.T + noise * torch.randn(d, n, generator=g, dtype=torch.float64)
    return torch.linalg.svdvals(M)


def test_energy_and_ratio_pick_the_planted_rank():
    # Ten directions of comparable strength (each ≥ 2% of the energy) over a faint noise floor.
    S = planted_spectrum(torch.linspace(2, 1, PLANTED_RANK), noise=1e-3)
    assert rank_energy(S, 0.99) == PLANTED_RANK
    assert rank_ratio(S, 0.25) == PLANTED_RANK


@pytest.mark.parametrize("seed", range(3))
def test_gavish_donoho_recovers_the_planted_rank_at_moderate_snr(seed):
    # Unit-variance noise: the noise bulk ends near sqrt(300) + sqrt(500) ≈ 40; the signal sits at
    # 1.5–3× that edge, where the optimal threshold must keep it and drop all the noise.
    S = planted_spectrum(torch.linspace(120, 60, PLANTED_RANK), noise=1.0, seed=seed)
    assert rank_gavish_donoho(S, (300, 500)) == PLANTED_RANK


def test_gavish_donoho_of_pure_noise_keeps_nothing_and_needs_the_full_spectrum():
    S = planted_spectrum(torch.zeros(1), noise=1.0)
    assert rank_gavish_donoho(S, (300, 500)) == 0
    beta = 300 / 500
    expected = (0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43) * float(
        np.median(S.numpy())
    )  # averaging median, as in G&D (torch.median takes the lower)
    assert gavish_donoho_threshold(S.numpy(), (300, 500)) == pytest.approx(expected, rel=1e-3)
    assert gavish_donoho_omega(1.0) == pytest.approx(2.86)
    with pytest.raises(ValueError, match="all min"):
        rank_gavish_donoho(S[:50], (300, 500))


def test_gavish_donoho_floor_ignores_rounding_directions():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(200, 12, generator=g) @ torch.randn(12, 300, generator=g)  # exactly rank 12
    S = singular_values(M)
    assert rank_gavish_donoho(S, (200, 300)) > 12  # the ω·median rule alone sees rounding as signal
    assert rank_gavish_donoho(S, (200, 300), floor=float(S[0]) * 300 * 1.2e-7) == 12


def test_energy_edges_without_off_by_one():
    S = torch.tensor([1.0, 1e-9, 1e-20, 0.0, 0.0], dtype=torch.float64)
    assert rank_energy(S, 1.0) == 3  # every nonzero σ, even one below an ulp of the sum
    assert rank_energy(np.sqrt([0.9, 0.1]), 0.9) == 1  # exactly reaching τ counts
    assert rank_energy([np.sqrt(0.5), np.sqrt(0.5)], 0.5) == 1
    assert rank_energy([1.0, 1.0, 1.0, 1.0], 0.75) == 3
    assert rank_energy([1.0, 1.0, 1.0, 1.0], 0.7500001) == 4
    assert rank_energy([3.0], 0.01) == 1
    with pytest.raises(ValueError):
        rank_energy([1.0], 0.0)
    with pytest.raises(ValueError):
        rank_energy([1.0], 1.5)


def test_ratio_is_inclusive_and_ignores_zeros():
    assert rank_ratio([4.0, 2.0, 1.0, 0.0], 0.5) == 2
    assert rank_ratio([4.0, 2.0, 1.0, 0.0], 0.0) == 3


def test_zero_update_gives_zero_everywhere():
    zeros = torch.zeros(6)
    assert rank_energy(zeros, 0.9) == rank_energy(zeros, 1.0) == 0
    assert rank_ratio(zeros, 0.1) == 0
    assert rank_gavish_donoho(zeros, (6, 10)) == 0
    assert rank_fixed(4, (6, 10), S=zeros) == 0
    assert allocate_budget([(zeros, 6, 10)], 10**6) == [0]


def test_max_rank_and_shape_caps():
    S = planted_spectrum(torch.linspace(120, 60, PLANTED_RANK), noise=1.0)
    assert rank_energy(S, 1.0, max_rank=7) == 7
    assert rank_energy(S, 0.99, max_rank=3) == 3
    assert rank_ratio(S, 0.0, max_rank=5) == 5
    assert rank_gavish_donoho(S, (300, 500), max_rank=4) == 4
    assert rank_fixed(64, (32, 100)) == 32
    assert rank_fixed(64, (128, 100), max_rank=16) == 16
    assert rank_fixed(8, (128, 100), S=[1.0, 0.5, 0.0]) == 2
    assert allocate_budget([(S, 300, 500)], 10**9, max_rank=6) == [6]


def brute_force(spectra, budget):
    """Best total energy over all rank tuples that fit, by enumeration."""
    options = [range(0, min(int(np.count_nonzero(np.asarray(S) > 0)), d, n) + 1) for S, d, n in spectra]
    best = 0.0
    for ranks in itertools.product(*options):
        if sum(k * (d + n) for k, (_, d, n) in zip(ranks, spectra)) <= budget:
            best = max(best, sum(float(np.sum(np.square(S[:k]))) for k, (S, _, _) in zip(ranks, spectra)))
    return best


def energy(spectra, ranks):
    return sum(float(np.sum(np.square(np.asarray(S)[:k]))) for k, (S, _, _) in zip(ranks, spectra))


def module_strategy(same_cost: bool):
    """(S descending, d, n) with d, n ≥ 4 ≥ len(S), so every direction is a legal rank."""
    singular = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=4)
    dims = st.just((4, 4)) if same_cost else st.tuples(st.integers(4, 9), st.integers(4, 9))
    return st.tuples(singular, dims).map(lambda t: (np.sort(np.asarray(t[0]))[::-1].copy(), *t[1]))


@settings(max_examples=150, deadline=None)
@given(st.lists(module_strategy(same_cost=False), min_size=1, max_size=3), st.integers(0, 80))
def test_budget_is_feasible_and_within_one_item_of_the_optimum(spectra, budget):
    ranks = allocate_budget(spectra, budget)
    assert sum(k * (d + n) for k, (_, d, n) in zip(ranks, spectra)) <= budget
    assert all(0 <= k <= np.count_nonzero(S > 0) for k, (S, _, _) in zip(ranks, spectra))
    largest_item = max(float(np.max(np.square(S))) for S, _, _ in spectra)
    assert energy(spectra, ranks) >= brute_force(spectra, budget) - largest_item - 1e-9


@settings(max_examples=150, deadline=None)
@given(st.lists(module_strategy(same_cost=True), min_size=1, max_size=3), st.integers(0, 80))
def test_budget_is_exactly_optimal_when_costs_are_equal(spectra, budget):
    ranks = allocate_budget(spectra, budget)
    assert energy(spectra, ranks) == pytest.approx(brute_force(spectra, budget), rel=1e-12, abs=1e-12)


def test_budget_fills_leftover_with_cheaper_modules():
    # Greedy prefix: module 0 (ratio 1.0, cost 6) then module 1's item (cost 5) does not fit in 10;
    # the fill phase then takes module 2's cheaper item (cost 4) which still fits.
    spectra = [(np.array([np.sqrt(6.0)]), 3, 3), (np.array([np.sqrt(4.9)]), 2, 3), (np.array([1.0]), 2, 2)]
    assert allocate_budget(spectra, 10) == [1, 0, 1]


def test_budget_prefers_energy_per_parameter():
    # Same energies; module 1 is four times cheaper, so it gets the directions first.
    spectra = [(np.ones(8), 400, 400), (np.ones(8), 100, 100)]
    assert allocate_budget(spectra, 8 * 200 + 2 * 800) == [2, 8]


def test_budget_scales_to_a_whole_model():
    rng = np.random.default_rng(0)
    spectra = [(np.sort(rng.random(576))[::-1].copy(), 576, 576 if m % 3 else 1536) for m in range(210)]
    start = time.perf_counter()
    ranks = allocate_budget(spectra, 20_000_000)
    assert time.perf_counter() - start < 1.0
    assert sum(k * (d + n) for k, (_, d, n) in zip(ranks, spectra)) <= 20_000_000
