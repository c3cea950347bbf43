"""extract's rank policies on planted spectra, and --budget against brute force.

The checkpoints are synthetic (a few 2-D weights named like a Llama block) so that every ΔW has a
spectrum chosen here: ΔW = U diag(σ) Vᵀ with random orthonormal U, V, optionally plus noise.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter


def planted(d: int, n: int, sigmas, seed: int) -> torch.Tensor:
    """A d × n matrix with exactly the singular values `sigmas` (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return ((U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T).float()


def write_pair(root: Path, deltas: dict[str, torch.Tensor], seed: int = 0) -> tuple[Path, Path]:
    """base (random weights) and ft = base + ΔW per tensor, as two checkpoint folders."""
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(delta.shape, generator=g) * 0.05 for name, delta in deltas.items()}
    for folder, tensors in (("base", base), ("ft", {n: base[n] + deltas[n] for n in deltas})):
        (root / folder).mkdir(parents=True)
        save_file(tensors, root / folder / "model.safetensors")
        (root / folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root / "base", root / "ft"


SIGMAS = [8.0, 4.0, 2.0, 1.0, 0.5]  # Σσ² = 85.25


@pytest.fixture(scope="module")
def clean_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    deltas = {f"model.layers.{i}.mlp.up_proj.weight": planted(64, 96, SIGMAS, seed=i) for i in range(2)}
    return write_pair(root, deltas)


@pytest.mark.parametrize(
    "policy, expected",
    [
        (Policy(rank=3), 3),
        (Policy(energy=0.9), 2),  # 80/85.25 = 0.938 ≥ 0.9 > 64/85.25
        (Policy(energy=0.99), 4),  # 85/85.25 = 0.997
        (Policy(energy=1.0), 5),  # every nonzero σ; the float32 rounding directions are not
        (Policy(ratio=0.24), 3),  # σ ≥ 1.92: 8, 4, 2
        (Policy(ratio=0.1), 4),  # σ ≥ 0.8: 8, 4, 2, 1
        (Policy(auto=True), 5),  # no noise: capped at the numerical rank
        (Policy(budget=2 * 3 * (64 + 96)), 3),  # two identical spectra: 3 ranks each
    ],
)
def test_each_policy_picks_the_planted_rank(clean_pair, tmp_path, policy, expected):
    base, ft = clean_pair
    report = extract_adapter(ExtractRequest(base, ft, tmp_path / "out", policy=policy))
    assert [m.rank for m in report.modules] == [expected, expected]
    tail = sum(s * s for s in SIGMAS[expected:]) / sum(s * s for s in SIGMAS)
    for module in report.modules:  # Eckart–Young, to float32 precision
        assert module.retained_energy == pytest.approx(1 - tail, abs=1e-5)


@pytest.mark.parametrize(
    "policy", [Policy(rank=5), Policy(energy=1.0), Policy(auto=True), Policy(budget=10**6)]
)
def test_max_rank_caps_every_policy(clean_pair, tmp_path, policy):
    base, ft = clean_pair
    report = extract_adapter(ExtractRequest(base, ft, tmp_path / "out", policy=policy, max_rank=2))
    assert [m.rank for m in report.modules] == [2, 2]


def test_auto_recovers_a_planted_rank_under_noise_where_energy_counts_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n, rank = 96, 160, 5
    deltas = {}
    for i in range(2):
        signal = planted(d, n, [3.0, 2.5, 2.0, 1.5, 1.2], seed=10 + i)
        deltas[f"model.layers.{i}.mlp.down_proj.weight"] = signal + 0.01 * torch.randn(d, n, generator=g)
    base, ft = write_pair(tmp_path, deltas)
    auto = extract_adapter(ExtractRequest(base, ft, tmp_path / "auto", policy=Policy(auto=True)))
    assert [m.rank for m in auto.modules] == [rank, rank]
    energy = extract_adapter(ExtractRequest(base, ft, tmp_path / "energy", policy=Policy(energy=0.999)))
    assert all(m.rank > 3 * rank for m in energy.modules)  # the noise holds > 0.1 % of the energy
    ratio = extract_adapter(ExtractRequest(base, ft, tmp_path / "ratio", policy=Policy(ratio=0.3)))
    assert [m.rank for m in ratio.modules] == [rank, rank]


def _best_energy(spectra, costs, budget) -> float:
    """max Σ_m Σ_{i≤k_m} σ²_{m,i} over all rank tuples with Σ k_m·cost_m ≤ budget (brute force)."""
    best = 0.0
    for ks in itertools.product(*(range(len(s) + 1) for s in spectra)):
        if sum(k * c for k, c in zip(ks, costs)) <= budget:
            best = max(best, sum(sum(x * x for x in s[:k]) for s, k in zip(spectra, ks)))
    return best


def test_budget_allocation_matches_brute_force(tmp_path):
    """Three modules of equal cost (d + n = 16) and two of different costs; every budget from 0 to
    all-in. Equal costs: the greedy σ² allocation is exactly optimal. Different costs: it is optimal
    up to one direction that did not fit (the fractional-knapsack bound); measured here too."""
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (6, 10), "b": (8, 8), "c": (4, 12), "d": (3, 20), "e": (9, 9)}
    spectra = {
        k: sorted((float(x) for x in torch.rand(min(shape), generator=g) * 3 + 0.1), reverse=True)
        for k, shape in shapes.items()
    }
    deltas = {
        f"model.layers.{i}.mlp.{k}_proj.weight": planted(*shapes[k], spectra[k], seed=20 + i)
        for i, k in enumerate(shapes)
    }
    base, ft = write_pair(tmp_path, deltas)
    names = list(deltas)
    costs = [sum(shapes[n.split(".")[-2][0]]) for n in names]
    spec = [spectra[n.split(".")[-2][0]] for n in names]

    def ours(budget: int, subset: list[int]) -> tuple[float, dict]:
        include = "|".join(names[i].removesuffix(".weight").replace(".", r"\.") + "$" for i in subset)
        out = tmp_path / f"out-{budget}-{len(subset)}"
        try:
            report = extract_adapter(
                ExtractRequest(base, ft, out, policy=Policy(budget=budget), include=include)
            )
        except Exception as error:  # every module got rank 0: nothing to write
            assert "nothing to write" in str(error)
            return 0.0, {}
        ranks = {m.name + ".weight": m.rank for m in report.modules}
        assert report.totals["params"] <= budget
        energy = sum(sum(x * x for x in spec[i][: ranks.get(names[i], 0)]) for i in subset)
        return energy, ranks

    equal = [0, 1, 2]  # cost 16 each
    for budget in range(16, 16 * 19, 16):
        energy, _ = ours(budget, equal)
        optimum = _best_energy([spec[i] for i in equal], [costs[i] for i in equal], budget)
        assert energy == pytest.approx(optimum, rel=1e-4), budget
    mixed = [2, 3, 4]  # costs 16, 23, 18
    for budget in (20, 40, 57, 75, 100, 150, 200, 301):
        energy, _ = ours(budget, mixed)
        optimum = _best_energy([spec[i] for i in mixed], [costs[i] for i in mixed], budget)
        largest_direction = max(s[0] ** 2 for s in (spec[i] for i in mixed))
        assert optimum - largest_direction <= energy * (1 + 1e-4) <= optimum * (1 + 1e-4), budget
