"""Singular values and truncated SVDs of dense matrices, choosing the fastest route that stays exact.

Both kernels use the matrix's own device; nothing moves to the CPU but tiny scalars. The timings and
accuracy sweeps behind every threshold here are in docs/extract.md ("How the SVD routes were chosen").

`singular_values(M)` — all min(d, n) singular values, float64, descending:
  - "gram":    eigvalsh of the smaller Gram matrix (M Mᵀ or MᵀM) accumulated in float64, then
               sqrt(clamp(λ, 0)); absolute error ≈ sqrt(min(d, n)·eps64)·σ₁ (eigenvalues are exact to
               ~eps64·σ₁², and the square root turns that into an absolute floor).
  - "svdvals": torch.linalg.svdvals in float64, backward-stable, error ≈ eps64·σ₁.
  "auto" takes the Gram route whenever its floor sits GRAM_SAFETY_FACTOR below the threshold that
  `numerical_rank` uses, σ₁·max(d, n)·eps(source dtype): every float32/bf16/fp16 source but 1 × 1.
  A float64 source's threshold is below the Gram floor, so it gets float64 svdvals.

`truncated_svd(M, k)` — U (d, k), S (k,), Vh (k, n) with ‖M − U diag(S) Vh‖_F within 1% of the
Eckart–Young optimum sqrt(Σ_{i>k} σᵢ²) (docs/design.md §4):
  - "exact":      torch.linalg.svd(full_matrices=False) in the compute dtype (float32 by default).
  - "gram":       eigh of the smaller Gram matrix in float64 → top-k singular subspace, then an SVD of
                  the projection; the error is the optimum up to ~sqrt(k·eps64)·σ₁.
  - "randomized": torch.svd_lowrank (Halko et al.), q = k + oversample (≥ 10) columns, niter ≥ 2,
                  seeded without touching the global RNG.
  - "krylov":     randomized block Krylov (Musco & Musco 2015): an orthonormal basis of
                  [AΩ, (AAᵀ)AΩ, (AAᵀ)²AΩ], Ω of max(k, 8) columns, then Rayleigh–Ritz. Subspace
                  iteration throws away all but its last block; keeping them all buys the same
                  accuracy with fewer passes over the matrix.
  "auto": block Krylov (AUTO_KRYLOV_ITERS) only when the sketch is a small fraction of the matrix
  (RANDOMIZED_MIN_DIM, RANDOMIZED_MAX_SKETCH_FRACTION), else the Gram route (float32 results) or exact
  float64 SVD (float64 results, where the Gram floor would waste precision). With the full spectrum
  passed in, any route's result is checked against the Eckart–Young optimum and recomputed by the Gram
  route on a miss; without it no cheap certificate exists. An explicit "randomized" or "krylov" keeps
  the caller's niter and is still checked when a spectrum is given.
"""

from __future__ import annotations

import contextlib
import math

import torch

from lorasurgery.linalg.gram import numerical_rank_tolerance  # noqa: F401  (torch-free, used here too)

SVD_METHODS = ("auto", "exact", "gram", "randomized", "krylov")
SINGULAR_VALUE_METHODS = ("auto", "gram", "svdvals")

# The randomized routes pay off only when the sketch is a small fraction of the matrix.
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_MAX_SKETCH_FRACTION = 1 / 8
# "auto" runs the randomized block Krylov route: blocks of max(k, KRYLOV_MIN_BLOCK) columns and
# AUTO_KRYLOV_ITERS iterations, enough for the 1% below on the planted spectra of docs/extract.md.
KRYLOV_MIN_BLOCK = 8
AUTO_KRYLOV_ITERS = 2
# A truncation may cost at most this factor over the Eckart–Young optimum (docs/design.md §4).
OPTIMUM_TOLERANCE = 1.01
# The Gram route must keep this margin below the numerical-rank threshold to be trusted.
GRAM_SAFETY_FACTOR = 10.0
# Columns of float64 converted at once when accumulating a Gram matrix: bounds the extra memory to
# 32 MB whatever the matrix size (a 49152 × 576 embedding would otherwise need a 226 MB copy).
GRAM_BLOCK_ELEMENTS = 1 << 22

_EPS64 = torch.finfo(torch.float64).eps


# --------------------------------------------------------------------------------------------- Gram


def _gram(M: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(G, left): float64 Gram matrix of the smaller side; left=True means G = M Mᵀ (d × d).

    Accumulated over blocks of the long side so that only a block is ever held in float64.
    """
    d, n = M.shape
    left = d <= n
    X = M if left else M.T  # (small, long): G = X Xᵀ either way
    small, long = X.shape
    block = max(1, GRAM_BLOCK_ELEMENTS // max(small, 1))
    G = torch.zeros(small, small, dtype=torch.float64, device=M.device)  # (small, small)
    for start in range(0, long, block):
        chunk = X[:, start : start + block].to(torch.float64)  # (small, block)
        G.addmm_(chunk, chunk.T)
    return G, left


def _project(M: torch.Tensor, basis: torch.Tensor, left: bool) -> torch.Tensor:
    """float64 projection of M onto `basis` (small, k): basisᵀ M (k, n) if left else M basis (d, k)."""
    X = M if left else M.T  # (small, long)
    small, long = X.shape
    block = max(1, GRAM_BLOCK_ELEMENTS // max(small, 1))
    parts = [
        basis.T @ X[:, start : start + block].to(torch.float64)  # (k, block)
        for start in range(0, long, block)
    ]
    P = torch.cat(parts, dim=1) if parts else basis.new_zeros(basis.shape[1], 0)  # (k, long)
    return P if left else P.T


# -------------------------------------------------------------------------------- singular values


def gram_error_floor(shape: tuple[int, int]) -> float:
    """Absolute error of Gram-route singular values, in units of σ₁: ≈ sqrt(min(d, n)·eps64)."""
    return math.sqrt(max(min(shape), 1) * _EPS64)


def choose_singular_value_method(shape: tuple[int, int], source_dtype: torch.dtype) -> str:
    """ "gram" when its error floor stays ≥ GRAM_SAFETY_FACTOR below the numerical-rank threshold."""
    if not source_dtype.is_floating_point:
        return "svdvals"
    threshold = numerical_rank_tolerance(shape, source_dtype)
    return "gram" if threshold >= GRAM_SAFETY_FACTOR * gram_error_floor(shape) else "svdvals"


def singular_values(
    M: torch.Tensor, *, method: str = "auto", source_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """All min(d, n) singular values of the 2-D matrix M, float64, descending, on M's device.

    `source_dtype` is the dtype the matrix was stored in (default M.dtype); it sets how accurate the
    values must be (see the module docstring): a float64 source forces the svdvals route.
    """
    if M.dim() != 2:
        raise ValueError(f"singular_values expects a 2-D matrix, got shape {tuple(M.shape)}")
    if method not in SINGULAR_VALUE_METHODS:
        raise ValueError(f"unknown singular-value method {method!r}; choose from {SINGULAR_VALUE_METHODS}")
    source_dtype = M.dtype if source_dtype is None else source_dtype
    shape = (M.shape[0], M.shape[1])
    if min(shape) == 0:
        return torch.zeros(0, dtype=torch.float64, device=M.device)
    if method == "auto":
        method = choose_singular_value_method(shape, source_dtype)
    if method == "svdvals":
        return torch.linalg.svdvals(M.to(torch.float64))  # (min(d, n),) descending
    if M.device.type == "cpu":  # numpy's symmetric rank-k update: see linalg.gram
        from lorasurgery.linalg.gram import gram_singular_values

        X = M.detach() if M.dtype in (torch.float32, torch.float64) else M.detach().to(torch.float32)
        return torch.from_numpy(gram_singular_values(X.numpy()))
    G, _ = _gram(M)  # (small, small)
    eigenvalues = torch.linalg.eigvalsh(G)  # ascending; tiny negatives are rounding
    return eigenvalues.clamp_min(0).sqrt().flip(0)


# ---------------------------------------------------------------------------------- truncated SVD


def choose_svd_method(shape: tuple[int, int], k: int, oversample: int = 10, dtype=torch.float32) -> str:
    """The route "auto" takes for a rank-k truncation of a matrix of `shape` (see module docstring)."""
    smallest = min(shape)
    sketch = k + max(oversample, 10)
    if smallest >= RANDOMIZED_MIN_DIM and sketch <= RANDOMIZED_MAX_SKETCH_FRACTION * smallest:
        return "krylov"
    return "exact" if dtype == torch.float64 else "gram"


def optimal_truncation_error(spectrum: torch.Tensor, k: int) -> float:
    """Eckart–Young: the least ‖M − M_k‖_F over rank-k M_k is sqrt(Σ_{i>k} σᵢ²) (full spectrum)."""
    tail = spectrum.to(torch.float64)[k:]
    return float(tail.square().sum().sqrt())


def truncation_error(M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """‖M − U diag(S) Vh‖_F, computed directly (one d × k × n product) in the factors' dtype."""
    residual = torch.addmm(M.to(U.dtype), U * S, Vh, alpha=-1)  # (d, n)
    return float(torch.linalg.vector_norm(residual, dtype=torch.float64))


def _exact(M: torch.Tensor, k: int, dtype: torch.dtype):
    U, S, Vh = torch.linalg.svd(M.to(dtype), full_matrices=False)  # (d, m), (m,), (m, n)
    return U[:, :k], S[:k], Vh[:k]


def _gram_truncated(M: torch.Tensor, k: int, dtype: torch.dtype):
    G, left = _gram(M)  # (small, small) float64
    _, vectors = torch.linalg.eigh(G)  # ascending eigenvalues; columns are eigenvectors
    basis = vectors[:, -k:].flip(1)  # (small, k): top-k singular subspace of the small side
    P = _project(M, basis, left)  # (k, n) if left else (d, k)
    # An SVD of the small projection orthonormalises both sides and orders the values; the
    # approximation U S Vh is the projection of M onto `basis`, the optimum up to rounding.
    u, s, vh = torch.linalg.svd(P, full_matrices=False)
    if left:
        U, Vh = basis @ u, vh  # (d, k), (k, n)
    else:
        U, Vh = u, vh @ basis.T  # (d, k), (k, n)
    return U.to(dtype), s.to(dtype), Vh.to(dtype)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch.manual_seed(seed) inside, the caller's RNG state (CPU and this device) restored after."""
    if device.type == "cpu":
        devices, device_type = [], "cuda"  # fork the CPU generator only
    else:
        index = device.index
        if index is None:  # "cuda" means the current device
            index = torch.cuda.current_device() if device.type == "cuda" else 0
        devices, device_type = [index], device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield


def _randomized(M: torch.Tensor, k: int, oversample: int, niter: int, seed: int, dtype: torch.dtype):
    q = min(k + max(oversample, 10), min(M.shape))
    with _seeded(seed, M.device):
        U, S, V = torch.svd_lowrank(M.to(dtype), q=q, niter=max(niter, 2))  # (d, q), (q,), (n, q)
    return U[:, :k], S[:k], V[:, :k].T


def _block_krylov(M: torch.Tensor, k: int, iters: int, seed: int, dtype: torch.dtype):
    """Randomized block Krylov SVD (Musco & Musco 2015) with Rayleigh–Ritz on the Krylov basis.

    Subspace iteration keeps only its last block; this keeps every block of the Krylov space
    [AΩ, (AAᵀ)AΩ, …], which reaches the same accuracy with ~40% fewer passes over the matrix.
    """
    X = M.to(dtype)
    wide = X.shape[0] <= X.shape[1]
    A = X if wide else X.mT  # (small, long): the basis lives on the small side
    b = max(k, KRYLOV_MIN_BLOCK)
    with _seeded(seed, M.device):
        omega = torch.randn(A.shape[1], b, dtype=dtype, device=M.device)  # (long, b)
    Y = torch.linalg.qr(A @ omega).Q  # (small, b)
    blocks = [Y]
    for _ in range(iters):
        Y = torch.linalg.qr(A @ (A.mT @ Y)).Q  # (small, b), orthonormalised at every step
        blocks.append(Y)
    Q = torch.linalg.qr(torch.cat(blocks, dim=1)).Q  # (small, m), m = b·(iters + 1)
    P = (A.mT @ Q).to(torch.float64)  # (long, m) = (QᵀA)ᵀ
    # Rayleigh–Ritz in float64: Ritz vectors of small values stay accurate, so Vh stays orthonormal.
    eigenvalues, W = torch.linalg.eigh(P.mT @ P)  # ascending; (m,), (m, m)
    W = W[:, -k:].flip(1)  # (m, k): top-k Ritz vectors
    s = eigenvalues[-k:].flip(0).clamp_min(0).sqrt()  # (k,)
    left = Q @ W.to(dtype)  # (small, k)
    # U diag(s) Vh = Q W Wᵀ Qᵀ A, the projection of A onto the Ritz subspace, whatever s's rounding;
    # a direction with s = 0 carries nothing and gets a zero row.
    right = (P @ W) * torch.where(s > 0, 1 / s, torch.zeros_like(s))  # (long, k)
    U, Vh = (left, right.mT.to(dtype)) if wide else (right.to(dtype), left.mT)
    return U, s.to(dtype), Vh


def truncated_svd(
    M: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    spectrum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k SVD of M: U (d, k), S (k,) descending, Vh (k, n), in `dtype` on M's device.

    k is capped by min(d, n). `spectrum`, when given, must be ALL min(d, n) singular values of M
    (e.g. from `singular_values`); a randomized result is then checked against the Eckart–Young
    optimum and recomputed exactly if it misses OPTIMUM_TOLERANCE. `seed` makes the randomized
    route deterministic without disturbing the global RNG.
    """
    if M.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D matrix, got shape {tuple(M.shape)}")
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose from {SVD_METHODS}")
    if k < 0:
        raise ValueError(f"rank must be ≥ 0, got {k}")
    d, n = M.shape
    k = min(k, d, n)
    if k == 0:
        return M.new_zeros(d, 0, dtype=dtype), M.new_zeros(0, dtype=dtype), M.new_zeros(0, n, dtype=dtype)
    exact_route = "exact" if dtype == torch.float64 else "gram"
    if method == "auto":
        method = choose_svd_method((d, n), k, oversample, dtype)
        if method == "krylov":
            niter = AUTO_KRYLOV_ITERS
    if method == "exact":
        return _exact(M, k, dtype)
    if method == "gram":
        return _gram_truncated(M, k, dtype)
    if k + max(oversample, 10) > min(d, n):
        return _exact(M, k, dtype) if exact_route == "exact" else _gram_truncated(M, k, dtype)
    if method == "krylov":
        U, S, Vh = _block_krylov(M, k, niter, seed, dtype)
    else:
        U, S, Vh = _randomized(M, k, oversample, niter, seed, dtype)
    if spectrum is not None:
        optimum = optimal_truncation_error(spectrum, k)
        # Rounding floor: the residual is formed in `dtype`, so errors below a few ulps of ‖M‖_F
        # cannot be told apart from the optimum.
        floor = 8 * torch.finfo(dtype).eps * float(spectrum.to(torch.float64).square().sum().sqrt())
        if truncation_error(M, U, S, Vh) > OPTIMUM_TOLERANCE * optimum + floor:
            return _exact(M, k, dtype) if exact_route == "exact" else _gram_truncated(M, k, dtype)
    return U, S, Vh
