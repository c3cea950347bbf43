"""Per-matrix spectrum metrics for rank-report (docs/design.md §5), from singular values alone.

`spectrum_metrics(S, shape, source_dtype)` returns exactly the metric names of docs/design.md §5 with plain
Python floats/ints (JSON-ready). S must be the full spectrum — all min(d, n) singular values —
because `optimal_rank` (Gavish–Donoho) takes the median over all of them; `singular_values` in
lorasurgery.linalg.svd (dense) or `lowrank_svd(...).S` (adapters, padded with zeros up to
min(d, n)) provide it.

The zero matrix has fro_norm = spectral_norm = 0 and every rank and rank-like ratio 0 (there is
no direction at all), never NaN.

`mle_dimension(M)` is Minka's (2000) MLE of the PCA dimension through scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np

from lorasurgery.linalg.gram import numerical_rank_tolerance
from lorasurgery.linalg.policies import full_spectrum, rank_energy, rank_gavish_donoho

METRIC_NAMES = (
    "fro_norm",
    "spectral_norm",
    "numerical_rank",
    "stable_rank",
    "effective_rank",
    "participation_ratio",
    "energy_rank_90",
    "energy_rank_99",
    "optimal_rank",
)

# No direction at all: norms and every rank-like quantity are 0 (the ratios would be 0/0).
ZERO_MATRIX_METRICS = {
    "fro_norm": 0.0,
    "spectral_norm": 0.0,
    "numerical_rank": 0,
    "stable_rank": 0.0,
    "effective_rank": 0.0,
    "participation_ratio": 0.0,
    "energy_rank_90": 0,
    "energy_rank_99": 0,
    "optimal_rank": 0,
}


def spectrum_metrics(S, shape: tuple[int, int], source_dtype="F32") -> dict:
    """docs/design.md §5 metrics of a d × n matrix from its singular values S (descending, all min(d, n)).

    `source_dtype` (a torch dtype or a safetensors code such as "BF16") sets numerical_rank's eps.

    - fro_norm            sqrt(Σσ²)
    - spectral_norm       σ₁
    - numerical_rank      #{σᵢ > σ₁·max(d, n)·eps(source_dtype)}
    - stable_rank         Σσ²/σ₁²
    - effective_rank      exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ/Σσ, 0·ln 0 = 0 (Roy & Vetterli 2007)
    - participation_ratio (Σσ²)²/Σσ⁴
    - energy_rank_90/99   smallest k with Σ_{i≤k}σᵢ² ≥ 0.90 / 0.99·Σσ²
    - optimal_rank        #{σᵢ > ω(β)·median(σ)} (Gavish–Donoho, unknown noise), never above
                          numerical_rank (rounding directions of an exactly low-rank matrix are
                          not signal; see policies.rank_gavish_donoho)
    """
    values = full_spectrum(S, shape, "spectrum_metrics", " (pad a low-rank spectrum with zeros)")
    sigma_1 = float(values[0]) if len(values) else 0.0
    if sigma_1 == 0.0:
        return dict(ZERO_MATRIX_METRICS)
    # Ratios are formed on σ/σ₁ so that σ⁴ can neither overflow nor underflow.
    normalised = values / sigma_1  # (m,) in [0, 1]
    squares = np.square(normalised)
    sum_squares = float(squares.sum())
    sum_fourth = float(np.square(squares).sum())
    p = normalised / normalised.sum()
    positive = p[p > 0]  # 0·ln 0 = 0
    entropy = float(-(positive * np.log(positive)).sum())
    threshold = sigma_1 * numerical_rank_tolerance(shape, source_dtype)
    return {
        "fro_norm": sigma_1 * math.sqrt(sum_squares),
        "spectral_norm": sigma_1,
        "numerical_rank": int(np.count_nonzero(values > threshold)),
        "stable_rank": sum_squares,
        "effective_rank": math.exp(entropy),
        "participation_ratio": sum_squares**2 / sum_fourth,
        "energy_rank_90": rank_energy(values, 0.90),
        "energy_rank_99": rank_energy(values, 0.99),
        "optimal_rank": rank_gavish_donoho(values, shape, floor=threshold),
    }


def mle_dimension(M) -> int:
    """Minka's MLE of the intrinsic dimension via scikit-learn's PCA(n_components="mle").

    scikit-learn treats rows as samples and columns as features, centres the columns, and accepts
    "mle" only when n_samples ≥ n_features. A weight matrix has no natural sample axis, so the
    longer side is taken as the samples: the d × n matrix itself when d ≥ n (rows of W are samples
    in R^n), its transpose otherwise. The answer is therefore the dimension of the subspace spanned
    by the (centred) vectors of the shorter side, in [0, min(d, n) − 1].
    """
    import torch
    from sklearn.decomposition import PCA  # imported here: scikit-learn is slow to import

    if M.dim() != 2:
        raise ValueError(f"mle_dimension expects a 2-D matrix, got shape {tuple(M.shape)}")
    X = M if M.shape[0] >= M.shape[1] else M.T  # (samples, features), samples ≥ features
    data = X.detach().to(device="cpu", dtype=torch.float64).numpy()
    if min(data.shape) < 2 or not np.any(data - data.mean(axis=0)):
        return 0  # nothing varies: sklearn would divide by zero
    pca = PCA(n_components="mle", svd_solver="full").fit(data)
    return int(pca.n_components_)
