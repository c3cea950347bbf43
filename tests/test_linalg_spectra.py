"""Spectrum metrics (docs/design.md §5 names and formulas) and Minka's MLE dimension."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lorasurgery.linalg.spectra import METRIC_NAMES, mle_dimension, spectrum_metrics
from lorasurgery.linalg.svd import singular_values


def test_metrics_of_a_known_spectrum():
    metrics = spectrum_metrics(torch.tensor([4.0, 3.0, 0.0]), (3, 5), torch.float32)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["fro_norm"] == pytest.approx(5.0)
    assert metrics["spectral_norm"] == 4.0
    assert metrics["numerical_rank"] == 2
    assert metrics["stable_rank"] == pytest.approx(25 / 16)
    p = np.array([4 / 7, 3 / 7])
    assert metrics["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert metrics["participation_ratio"] == pytest.approx(625 / (256 + 81))
    assert metrics["energy_rank_90"] == 2  # 16/25 = 64% after one
    assert metrics["energy_rank_99"] == 2


def test_flat_spectrum_has_every_rank_equal_to_its_size():
    metrics = spectrum_metrics(np.ones(8), (8, 8), torch.float32)
    for key in ("stable_rank", "effective_rank", "participation_ratio"):
        assert metrics[key] == pytest.approx(8.0)
    assert metrics["numerical_rank"] == metrics["energy_rank_99"] == 8
    assert metrics["energy_rank_90"] == 8  # 7/8 = 87.5% < 90%


def test_zero_matrix_is_all_zeros_and_json_ready():
    metrics = spectrum_metrics(torch.zeros(4), (4, 6), torch.bfloat16)
    assert all(value == 0 for value in metrics.values())
    json.dumps(metrics, allow_nan=False)


def test_values_are_plain_python_numbers():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(64, 96, generator=g)
    metrics = spectrum_metrics(singular_values(M), (64, 96), torch.float32)
    for key, value in metrics.items():
        expected = int if "rank" in key and key not in ("stable_rank", "effective_rank") else float
        assert type(value) is expected, key
    json.dumps(metrics, allow_nan=False)


def test_numerical_rank_uses_the_source_dtype():
    # σ = 1 and 1e-4: a real direction for float32 (threshold 10·1.2e-7) but below bf16's (10·7.8e-3).
    S = torch.tensor([1.0, 1e-4] + [0.0] * 8, dtype=torch.float64)
    assert spectrum_metrics(S, (10, 10), torch.float32)["numerical_rank"] == 2
    assert spectrum_metrics(S, (10, 10), torch.bfloat16)["numerical_rank"] == 1


def test_metrics_need_the_full_spectrum():
    with pytest.raises(ValueError, match="pad"):
        spectrum_metrics(torch.ones(3), (8, 10), torch.float32)


def test_planted_low_rank_metrics():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(200, 12, generator=g) @ torch.randn(12, 300, generator=g)
    metrics = spectrum_metrics(singular_values(M), (200, 300), torch.float32)
    assert metrics["numerical_rank"] == 12
    assert metrics["optimal_rank"] == 12  # rounding directions are not signal
    assert metrics["energy_rank_99"] <= 12
    assert metrics["fro_norm"] == pytest.approx(float(M.double().norm()), rel=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
def test_mle_dimension_finds_a_planted_subspace(transpose):
    # 600 samples in R^40 lying near an 8-dimensional subspace: Minka's MLE recovers 8, whichever
    # way round the weight matrix is stored (the longer side is taken as the samples).
    g = torch.Generator().manual_seed(2)
    X = torch.randn(600, 8, generator=g) @ torch.randn(8, 40, generator=g) * 3
    X = X + 0.05 * torch.randn(600, 40, generator=g)
    assert mle_dimension(X.T if transpose else X) == 8


def test_mle_dimension_of_a_constant_matrix_is_zero():
    assert mle_dimension(torch.zeros(30, 10)) == 0
    assert mle_dimension(torch.ones(10, 30)) == 0
