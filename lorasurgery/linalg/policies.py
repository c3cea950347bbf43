"""Rank selection from a spectrum (docs/design.md §4): fixed, energy, ratio, Gavish–Donoho, joint budget.

Every policy takes singular values σ₁ ≥ σ₂ ≥ … (a torch tensor on any device, a numpy array or a
list) and returns a plain int. Shared rules:
- never more than the number of nonzero singular values (a zero direction carries nothing);
- 0 exactly when there is nothing to keep (ΔW = 0): callers skip such modules;
- `max_rank` (`--max-rank`) caps every policy.
The spectra are short vectors (≤ a few thousand values), so the arithmetic runs in float64 numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorasurgery.errors import OptionError

_EPS64 = np.finfo(np.float64).eps


def as_spectrum(S) -> np.ndarray:
    """float64 numpy copy of singular values, checked to be a 1-D, finite, nonnegative vector."""
    if hasattr(S, "detach"):  # a torch tensor (torch is not imported for numpy input)
        import torch

        values = S.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        values = np.asarray(S, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"a spectrum is a 1-D vector of singular values, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("singular values must be finite and nonnegative")
    return values


def full_spectrum(S, shape, who: str, hint: str = "") -> np.ndarray:
    """as_spectrum(S), checked to hold all min(d, n) singular values of a d × n matrix: `who` needs
    the whole spectrum (a truncated one moves its median and its sums)."""
    values = as_spectrum(S)
    d, n = shape
    if len(values) != min(d, n):
        raise ValueError(
            f"{who} needs all min(d, n) = {min(d, n)} singular values of the {d} × {n} "
            f"matrix, got {len(values)}{hint}"
        )
    return values


def nonzero_count(S) -> int:
    """How many singular values are > 0 (the hard cap of every policy)."""
    return int(np.count_nonzero(as_spectrum(S) > 0))


def _cap(k: int, S: np.ndarray, max_rank: int | None) -> int:
    k = min(k, int(np.count_nonzero(S > 0)))
    if max_rank is not None:
        k = min(k, max_rank)
    return max(int(k), 0)


def rank_fixed(K: int, shape: tuple[int, int], S=None, max_rank: int | None = None) -> int:
    """`--rank K`: K capped by min(d, n), by `max_rank`, and (when S is given) by the nonzero count."""
    if K < 0:
        raise ValueError(f"rank must be ≥ 0, got {K}")
    k = min(K, *shape)
    if max_rank is not None:
        k = min(k, max_rank)
    if S is not None:
        k = min(k, nonzero_count(S))
    return int(k)


def rank_energy(S, tau: float, max_rank: int | None = None) -> int:
    """`--energy τ`: smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσᵢ² (τ in (0, 1]).

    τ = 1 keeps every nonzero σ — decided by counting, not by comparing sums, because a σᵢ² below
    one ulp of the running sum would leave the cumulative sum unchanged. For τ < 1 the comparison
    allows the cumulative sum's own rounding (≤ n·eps·Σσ²), so that e.g. σ² = [0.9, 0.1] with τ = 0.9
    gives k = 1 even if 0.9 came back from a square as 0.8999999999999999.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {tau}")
    S = as_spectrum(S)
    if tau >= 1:
        return _cap(len(S), S, max_rank)
    energy = np.cumsum(np.square(S))  # (n,) nondecreasing
    if len(S) == 0 or energy[-1] == 0:
        return 0
    total = energy[-1]
    target = tau * total - len(S) * _EPS64 * total
    k = int(np.searchsorted(energy, target, side="left")) + 1  # first index with energy ≥ target
    return _cap(k, S, max_rank)


def rank_ratio(S, rho: float, max_rank: int | None = None) -> int:
    """`--ratio ρ`: the number of σᵢ ≥ ρ·σ₁ (descending S, so it is a prefix); zero σ never kept."""
    if rho < 0:
        raise ValueError(f"ratio must be ≥ 0, got {rho}")
    S = as_spectrum(S)
    if len(S) == 0 or S[0] == 0:
        return 0
    return _cap(int(np.count_nonzero(S >= rho * S[0])), S, max_rank)


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014, unknown noise level)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho_threshold(S, shape: tuple[int, int]) -> float:
    """Hard threshold ω(β)·median(σ) with β = min(d, n)/max(d, n).

    The median is over ALL min(d, n) singular values of the matrix, so S must be the full spectrum
    (len(S) == min(d, n)); a truncated spectrum would move the median up and the threshold with it.
    """
    S = full_spectrum(S, shape, "Gavish–Donoho")
    d, n = shape
    if len(S) == 0:
        return 0.0
    beta = min(d, n) / max(d, n)
    return gavish_donoho_omega(beta) * float(np.median(S))


def gavish_donoho_known_threshold(shape: tuple[int, int], sigma: float) -> float:
    """Hard threshold λ*(β)·√n·σ for a d × n matrix with white noise of known standard deviation σ
    per entry (Gavish & Donoho 2014, eq. 11; n = max(d, n), β = min/max):
    λ*(β) = √(2(β+1) + 8β / ((β+1) + √(β² + 14β + 1))), 4/√3 for a square matrix."""
    d, n = shape
    if min(d, n) == 0 or sigma <= 0:
        return 0.0
    beta = min(d, n) / max(d, n)
    lam = np.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + np.sqrt(beta**2 + 14 * beta + 1)))
    return float(lam * np.sqrt(max(d, n)) * sigma)


def rank_gavish_donoho(S, shape: tuple[int, int], max_rank: int | None = None, floor: float = 0.0) -> int:
    """`--auto`: the number of σᵢ > ω(β)·median(σ) (full spectrum required, see the threshold).

    `floor` (absolute, default 0) is a level below which σ counts as zero — pass the numerical-rank
    threshold. Gavish–Donoho assumes white noise; an exactly low-rank matrix has only rounding
    "noise" (not Marchenko–Pastur distributed) in its tail, and the ω·median rule would then keep
    some rounding directions: a rank-12 float32 product gave 20 without the floor.
    """
    threshold = max(gavish_donoho_threshold(S, shape), floor)
    S = as_spectrum(S)
    return _cap(int(np.count_nonzero(S > threshold)), S, max_rank)


def allocate_budget(
    spectra: Sequence[tuple[object, int, int]], budget_params: int, max_rank: int | None = None
) -> list[int]:
    """`--budget P`: ranks k_m maximising Σ_m Σ_{i≤k_m} σ_{m,i}² subject to Σ_m k_m·(d_m + n_m) ≤ P.

    `spectra` holds (S_m, d_m, n_m) per module. Each kept direction i of module m is an item of
    gain σ_{m,i}² and cost c_m = d_m + n_m (one column of B and one row of A).

    Why greedy by gain/cost: within a module the gains σ_{m,i}² are non-increasing and the cost is
    constant, so the ratios σ_{m,i}²/c_m are non-increasing too. Sorting all items by ratio
    therefore lists every module's directions in their own order (ties broken by position), and any
    prefix of that list is a valid choice of ranks. A prefix of the ratio-sorted list is the optimum
    of the fractional relaxation for the budget it spends, hence of the integer problem at that
    budget: taking the longest prefix that fits is exactly optimal for the budget it uses, and it
    is exactly optimal for P whenever the prefix fills P or all modules cost the same. Otherwise the
    first item that does not fit can leave up to one module-cost of P unused, and the true optimum
    may beat the prefix by at most that item's gain (the relaxation bound). To narrow that gap the
    leftover budget is then filled with the following items in ratio order that still fit; a module
    whose item was passed over can never fit again (the leftover only shrinks and its cost is
    fixed), so the prefix structure per module is kept. The result is within one σ² (of the first
    skipped item) of the optimum — in practice a negligible share of the total energy.

    Cost O(N log N) for N = Σ_m min(nonzero_m, max_rank) items: one merged sort, a cumulative sum,
    and a fill phase of at most (largest cost / smallest cost) steps.
    """
    if budget_params < 0:
        raise ValueError(f"budget must be ≥ 0 parameters, got {budget_params}")
    gains, costs, modules, positions = [], [], [], []
    for m, (S, d, n) in enumerate(spectra):
        values = as_spectrum(S)
        keep = int(np.count_nonzero(values > 0))
        keep = min(keep, d, n, max_rank if max_rank is not None else keep)
        gains.append(np.square(values[:keep]))
        costs.append(np.full(keep, d + n, dtype=np.int64))
        modules.append(np.full(keep, m, dtype=np.int64))
        positions.append(np.arange(keep, dtype=np.int64))
    ranks = np.zeros(len(spectra), dtype=np.int64)
    if not gains or sum(len(g) for g in gains) == 0:
        return ranks.tolist()
    gain = np.concatenate(gains)
    cost = np.concatenate(costs)
    module = np.concatenate(modules)
    position = np.concatenate(positions)
    # Descending ratio; ties by module then position so each module's items stay in their own order.
    order = np.lexsort((position, module, -(gain / cost)))
    gain, cost, module = gain[order], cost[order], module[order]

    spent = np.cumsum(cost)  # (N,) parameters used by each prefix
    prefix = int(np.searchsorted(spent, budget_params, side="right"))  # longest prefix that fits
    taken = np.zeros(len(gain), dtype=bool)
    taken[:prefix] = True
    leftover = budget_params - (int(spent[prefix - 1]) if prefix else 0)
    start = prefix
    while start < len(gain):
        fits = np.flatnonzero(cost[start:] <= leftover)
        if len(fits) == 0:
            break
        j = start + int(fits[0])  # next item in ratio order that fits
        taken[j] = True
        leftover -= int(cost[j])
        start = j + 1
    np.add.at(ranks, module[taken], 1)
    return ranks.tolist()


@dataclass(frozen=True)
class Policy:
    """Exactly one rank policy of extract, resize and combine (see docs/extract.md)."""

    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    auto: bool = False
    budget: int | None = None

    def validate(self) -> None:
        chosen = [
            name
            for name, value in (
                ("--rank", self.rank),
                ("--energy", self.energy),
                ("--ratio", self.ratio),
                ("--auto", self.auto or None),
                ("--budget", self.budget),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise OptionError(
                "choose exactly one rank policy: --rank, --energy, --ratio, --auto or --budget"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(f"--energy must be in (0, 1], got {self.energy}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise OptionError(f"--ratio must be in (0, 1], got {self.ratio}")
        for name, value in (("--rank", self.rank), ("--budget", self.budget)):
            if value is not None and value < 1:
                raise OptionError(f"{name} must be at least 1, got {value}")

    @property
    def per_module_spectrum(self) -> bool:
        """energy, ratio and auto choose each module's rank from its own singular values."""
        return self.energy is not None or self.ratio is not None or self.auto

    def module_rank(self, S, shape: tuple[int, int], floor: float = 0.0, max_rank: int | None = None) -> int:
        """The rank this policy keeps of one module with spectrum S (all min(d, n) values for --auto).

        `floor`: σ at or below it are rounding, not signal (the numerical-rank threshold): --energy
        counts only the σ above it (τ = 1 keeps every numerically nonzero σ), --auto never keeps one.
        Not for --budget, which decides all modules jointly (`allocate_budget`).
        """
        S = as_spectrum(S)
        if self.rank is not None:
            k = rank_fixed(self.rank, shape, S[S > floor])
        elif self.energy is not None:
            k = rank_energy(S[S > floor], self.energy)
        elif self.ratio is not None:
            k = rank_ratio(S, self.ratio)
        elif self.auto:
            k = rank_gavish_donoho(S, shape, floor=floor)
        else:
            raise ValueError("--budget chooses ranks jointly: use allocate_budget")
        k = min(k, *shape)
        return min(k, max_rank) if max_rank is not None else k

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.ratio is not None:
            return f"ratio {self.ratio}"
        if self.budget is not None:
            return f"budget {self.budget:,} parameters"
        return "auto (Gavish–Donoho)"
