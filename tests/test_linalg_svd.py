"""Singular values and truncated SVDs: the fast routes agree with float64 references, and every
truncation stays within 1% of the Eckart–Young optimum (docs/design.md §4)."""

from __future__ import annotations

import pytest
import torch

from lorasurgery.linalg import svd as svd_module
from lorasurgery.linalg.spectra import spectrum_metrics
from lorasurgery.linalg.svd import (
    choose_singular_value_method,
    choose_svd_method,
    optimal_truncation_error,
    singular_values,
    truncated_svd,
    truncation_error,
)


def planted(d: int, n: int, spectrum: torch.Tensor, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """float32 d × n matrix U diag(spectrum) Vᵀ with Haar U, V, plus N(0, noise²) entries."""
    g = torch.Generator().manual_seed(seed)
    m = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    M = (U * spectrum.to(torch.float64)) @ V.T
    return (M + noise * torch.randn(d, n, generator=g, dtype=torch.float64)).float()


def realistic_matrices():
    g = torch.Generator().manual_seed(1)
    yield "random", torch.randn(300, 500, generator=g)
    yield "random-tall", torch.randn(520, 200, generator=g) * 0.02
    low = torch.linspace(10, 1, 12)
    yield "planted+noise", planted(400, 256, low, noise=0.05, seed=2)
    yield "decaying", planted(256, 384, torch.arange(1, 257).double() ** -1.0, noise=1e-4, seed=3)
    yield "bf16-rounded", torch.randn(192, 576, generator=g).bfloat16().float()


@pytest.mark.parametrize("name,M", list(realistic_matrices()))
def test_gram_route_matches_float64_reference(name, M):
    reference = torch.linalg.svdvals(M.double())
    gram = singular_values(M, method="gram")
    assert gram.dtype == torch.float64 and gram.shape == reference.shape
    assert torch.all(gram[:-1] >= gram[1:])
    assert float((gram - reference).abs().max()) <= 1e-6 * float(reference[0])
    shape = tuple(M.shape)
    ours = spectrum_metrics(gram, shape, torch.float32)
    theirs = spectrum_metrics(reference, shape, torch.float32)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-3), key


def test_gram_floor_stays_below_numerical_rank_threshold():
    # Exactly rank 5 in float32: the Gram route's zeros (~1e-8·σ₁) must not count as rank.
    g = torch.Generator().manual_seed(0)
    M = torch.randn(500, 5, generator=g) @ torch.randn(5, 300, generator=g)
    S = singular_values(M)
    assert choose_singular_value_method(tuple(M.shape), torch.float32) == "gram"
    assert spectrum_metrics(S, tuple(M.shape), torch.float32)["numerical_rank"] == 5


def test_auto_route_depends_on_source_dtype():
    assert choose_singular_value_method((576, 1536), torch.float32) == "gram"
    assert choose_singular_value_method((576, 1536), torch.bfloat16) == "gram"
    assert choose_singular_value_method((576, 1536), torch.float64) == "svdvals"
    assert choose_singular_value_method((1, 1), torch.float32) == "svdvals"  # floor too close
    # A float64 source: the threshold is ~1e-13·σ₁, far below the Gram floor, so svdvals it is.
    M = torch.randn(40, 30, dtype=torch.float64) @ torch.randn(30, 60, dtype=torch.float64)
    S = singular_values(M)
    assert spectrum_metrics(S, (40, 60), torch.float64)["numerical_rank"] == 30


def test_singular_values_edge_shapes():
    assert singular_values(torch.zeros(0, 5)).shape == (0,)
    assert torch.equal(singular_values(torch.zeros(3, 7)), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        singular_values(torch.zeros(3))


SPECTRA = {
    "planted": torch.cat([torch.linspace(5, 3, 8), torch.full((312,), 0.01)]),
    "decaying": torch.arange(1, 321).double() ** -0.5,
    "fast-decay": torch.arange(1, 321).double() ** -2.0,
    "flat": torch.ones(320),
}


@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "krylov", "auto"])
@pytest.mark.parametrize("shape", [(320, 512), (640, 320)])
def test_truncation_within_one_percent_of_optimum(kind, method, shape):
    d, n = shape
    M = planted(d, n, SPECTRA[kind], noise=1e-4)
    spectrum = torch.linalg.svdvals(M.double())
    for k in (1, 8, 24):
        U, S, Vh = truncated_svd(M, k, method=method, spectrum=spectrum)
        assert U.shape == (d, k) and S.shape == (k,) and Vh.shape == (k, n)
        assert torch.all(S[:-1] >= S[1:])
        assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4)
        assert torch.allclose(Vh @ Vh.T, torch.eye(k), atol=1e-4)
        optimum = optimal_truncation_error(spectrum, k)
        assert truncation_error(M, U, S, Vh) <= 1.01 * optimum + 1e-5 * float(spectrum.norm())


def test_randomized_without_spectrum_is_accurate_on_an_eligible_shape():
    M = planted(512, 768, torch.arange(1, 513).double() ** -0.5, noise=1e-4, seed=5)
    assert choose_svd_method((512, 768), 32) == "krylov"
    U, S, Vh = truncated_svd(M, 32)
    optimum = optimal_truncation_error(torch.linalg.svdvals(M.double()), 32)
    assert truncation_error(M, U, S, Vh) <= 1.01 * optimum


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576)])
@pytest.mark.parametrize("p", [0.05, 0.5, 1.0, 2.0])
def test_auto_krylov_unchecked_stays_within_one_percent_on_power_laws(shape, p):
    """What --rank relies on: no spectrum to check against, so the route itself must hold 1%."""
    m = min(shape)
    M = planted(*shape, torch.arange(1, m + 1).double() ** -p, noise=1e-3 / m**0.5, seed=11)
    spectrum = torch.linalg.svdvals(M.double())
    for k in (1, 8, 32, m // 8 - 10):
        assert choose_svd_method(shape, k) == "krylov"
        U, S, Vh = truncated_svd(M, k)
        assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4)
        assert torch.allclose(Vh @ Vh.T, torch.eye(k), atol=1e-4)
        assert truncation_error(M, U, S, Vh) <= 1.01 * optimal_truncation_error(spectrum, k), (p, k)


def test_auto_choice_follows_the_measured_crossover():
    assert choose_svd_method((576, 1536), 16) == "krylov"  # q/min = 0.04
    assert choose_svd_method((576, 1536), 62) == "krylov"  # q/min = 1/8
    assert choose_svd_method((576, 1536), 128) == "gram"  # q/min ≈ 1/4: no gain, risk of >1%
    assert choose_svd_method((192, 576), 8) == "gram"  # small: everything is fast, take exact
    assert choose_svd_method((192, 576), 8, dtype=torch.float64) == "exact"


def test_failed_randomized_result_falls_back_when_the_spectrum_says_so(monkeypatch):
    M = planted(512, 600, torch.arange(1, 513).double() ** -0.5, seed=7)
    spectrum = torch.linalg.svdvals(M.double())

    def useless_subspace(M, k, oversample, niter, seed, dtype):  # a random, wrong k-frame
        U, _ = torch.linalg.qr(torch.randn(M.shape[0], k))
        Vh = torch.linalg.qr(torch.randn(M.shape[1], k))[0].T
        return U, torch.ones(k), Vh

    monkeypatch.setattr(svd_module, "_randomized", useless_subspace)
    U, S, Vh = truncated_svd(M, 16, method="randomized", spectrum=spectrum)
    assert truncation_error(M, U, S, Vh) <= 1.01 * optimal_truncation_error(spectrum, 16)


def test_randomized_is_deterministic_and_leaves_the_global_rng_alone():
    M = torch.randn(600, 700)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = truncated_svd(M, 10, method="randomized", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    second = truncated_svd(M, 10, method="randomized", seed=4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_float64_results_and_rank_edges():
    M = planted(60, 90, torch.linspace(3, 1, 20), seed=9).double()
    U, S, Vh = truncated_svd(M, 5, dtype=torch.float64)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert torch.allclose(S, torch.linalg.svdvals(M)[:5], rtol=1e-12)
    U, S, Vh = truncated_svd(M, 0)
    assert U.shape == (60, 0) and S.shape == (0,) and Vh.shape == (0, 90)
    U, S, Vh = truncated_svd(M, 500, method="gram")  # capped by min(d, n)
    assert S.shape == (60,)
    with pytest.raises(ValueError):
        truncated_svd(M, -1)
    with pytest.raises(ValueError):
        truncated_svd(M, 3, method="qr")


def test_exact_rank_deficient_matrix_is_reproduced():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g)
    for method in ("exact", "gram", "randomized"):
        U, S, Vh = truncated_svd(M, 6, method=method)
        assert truncation_error(M, U, S, Vh) <= 1e-5 * float(M.norm()), method
