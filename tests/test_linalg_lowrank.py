"""Factored kernels against float64 dense references: the SVD of s·B@A, its optimal truncation, sums."""

from __future__ import annotations

import pytest
import torch

from lorasurgery.linalg.lowrank import balanced_factors, concatenated_factors, lowrank_svd


def _factors(r: int, out: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g, dtype=torch.float64), torch.randn(
        out, r, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("scale", [0.7, -2.0])
def test_lowrank_svd_is_the_dense_svd(scale):
    A, B = _factors(6, 15, 20, 0)
    svd = lowrank_svd(A, B, scale)
    dense = scale * B @ A
    torch.testing.assert_close(svd.S, torch.linalg.svdvals(dense)[:6], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(svd.U * svd.S @ svd.Vh, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_balanced_factors_reach_the_eckart_young_optimum(k):
    A, B = _factors(6, 15, 20, 1)
    dense = -1.5 * B @ A
    a, b = balanced_factors(lowrank_svd(A, B, -1.5), k)
    assert a.shape == (k, 20) and b.shape == (15, k)
    optimum = float(torch.linalg.svdvals(dense)[k:].square().sum().sqrt())
    assert abs(float(torch.linalg.norm(dense - b @ a)) - optimum) <= 1e-10 * (1 + optimum)
    # balanced: both factors carry Σ^½, so their Gram matrices have the same eigenvalues
    torch.testing.assert_close(torch.linalg.svdvals(a), torch.linalg.svdvals(b), rtol=1e-10, atol=1e-12)


def test_concatenated_factors_sum_exactly():
    (A1, B1), (A2, B2) = _factors(4, 15, 20, 2), _factors(3, 15, 20, 3)
    a, b = concatenated_factors([(A1, B1, 0.5), (A2, B2, -2.0)])
    assert a.shape == (7, 20) and b.shape == (15, 7)
    torch.testing.assert_close(b @ a, 0.5 * B1 @ A1 - 2.0 * B2 @ A2, rtol=1e-12, atol=1e-12)
