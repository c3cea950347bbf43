"""docs/design.md §5's metrics straight from a float64 dense SVD: the reference rank-report is checked against."""

from __future__ import annotations

import numpy as np
import pytest
import torch

RANKS = ("numerical_rank", "energy_rank_90", "energy_rank_99", "optimal_rank")
FLOATS = ("fro_norm", "spectral_norm", "stable_rank", "effective_rank", "participation_ratio")


def reference_metrics(M: torch.Tensor) -> dict:
    """The docs/design.md §5 definitions, straight from a float64 dense SVD."""
    S = torch.linalg.svdvals(M.double())
    d, k = M.shape
    energy = torch.cumsum(S**2, 0) / (S**2).sum()
    p = S / S.sum()
    p = p[p > 0]
    numerical = int((S > S[0] * max(d, k) * torch.finfo(torch.float32).eps).sum())
    beta = min(d, k) / max(d, k)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return {
        "fro_norm": float(S.norm()),
        "spectral_norm": float(S[0]),
        "stable_rank": float((S**2).sum() / S[0] ** 2),
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "participation_ratio": float((S**2).sum() ** 2 / (S**4).sum()),
        "numerical_rank": numerical,
        "energy_rank_90": int((energy < 0.9 - 1e-12).sum()) + 1,
        "energy_rank_99": int((energy < 0.99 - 1e-12).sum()) + 1,
        "optimal_rank": min(int((S > omega * float(np.median(S.numpy()))).sum()), numerical),
    }


def assert_close(metrics: dict, reference: dict, where: str) -> None:
    for key in FLOATS:
        assert metrics[key] == pytest.approx(reference[key], rel=1e-3), (where, key)
    for key in RANKS:
        assert abs(metrics[key] - reference[key]) <= 1, (where, key, metrics[key], reference[key])
