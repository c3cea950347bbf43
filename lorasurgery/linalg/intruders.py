"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", Alg. 1): high-ranking singular vectors of the tuned W + ΔW that no singular vector of
W resembles.

Among the top-k left singular vectors u'ᵢ of W' = W + ΔW, u'ᵢ is an intruder when
maxⱼ |u'ᵢ · uⱼ| < ε over ALL left singular vectors uⱼ of W (signs are arbitrary, hence |·|).

Cost (numpy, float64, on the smaller side n = min(d_out, d_in) of W (d_out, d_in)):
- W's full left basis from one n × n Gram eigendecomposition. When W is tall (d_out > d_in) its
  left vectors are U = W V Σ⁻¹, so the cosines U'ᵀU = (U'ᵀW) V Σ⁻¹ need V and Σ only (k × d × n);
- W''s top k from the same-side Gram of W', by a top-k-only eigensolver. For a low-rank update
  W' = W + s·B A (B (d_out, r), A (r, d_in)) that Gram is W's plus rank-2r and r-sized terms,
  O(n²·r) instead of O(n²·d): G' = G + s(WAᵀ)Bᵀ + s·B(AWᵀ) + s²·B(AAᵀ)Bᵀ (left side) or
  H' = H + s·Aᵀ(BᵀW) + s(WᵀB)A + s²·Aᵀ(BᵀB)A (right side).
Gram eigenvectors in float64 are accurate to ≈ eps64·σ₁²/gap, far below any ε of interest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_K = 10
DEFAULT_EPS = 0.5


@dataclass
class Intruders:
    count: int  # how many of the top-k are intruders
    max_cosine: list[float]  # (k,) maxⱼ |u'ᵢ · uⱼ| for i = 1..k, in the order of σᵢ(W')

    def to_metrics(self) -> dict:
        return {"intruder_dimensions": self.count, "intruder_max_cosine": self.max_cosine}


def _top_eigh(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of symmetric G, descending: (λ (k,), vectors (n, k))."""
    from scipy.linalg import eigh

    n = G.shape[0]
    values, vectors = eigh(G, subset_by_index=[n - k, n - 1], driver="evr")  # ascending
    return values[::-1], vectors[:, ::-1]


def intruder_dimensions(
    W,
    *,
    tuned=None,
    factors: tuple | None = None,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
) -> Intruders:
    """Intruders of W' among its top-k left singular vectors, W (d_out, d_in) the base.

    W' is either `tuned` (a dense (d_out, d_in) array: a fine-tune, a DoRA merge) or W + s·B@A from
    `factors` = (A (r, d_in), B (d_out, r), s). Arrays may be numpy or CPU torch tensors, any float dtype.
    """
    from scipy.linalg import eigh

    W = np.asarray(W, dtype=np.float64)
    d, n = W.shape
    k = max(0, min(k, d, n))
    if k == 0:
        return Intruders(0, [])
    left = d <= n  # the Gram on the smaller side: W Wᵀ (d × d) or WᵀW (n × n)
    G = W @ W.T if left else W.T @ W
    if factors is not None:
        A, B, s = factors
        A = np.asarray(A, dtype=np.float64).reshape(-1, n)  # (r, d_in)
        B = np.asarray(B, dtype=np.float64).reshape(d, -1)  # (d_out, r)
        if left:
            cross = s * ((W @ A.T) @ B.T)  # (d, d)
            G_tuned = G + cross + cross.T + (s * s) * (B @ (A @ A.T) @ B.T)
        else:
            cross = s * (A.T @ (B.T @ W))  # (n, n)
            G_tuned = G + cross + cross.T + (s * s) * (A.T @ (B.T @ B) @ A)

        def tuned_times(X: np.ndarray) -> np.ndarray:  # W' X for X (n, k), without forming W'
            return W @ X + s * (B @ (A @ X))
    else:
        T = np.asarray(tuned, dtype=np.float64)
        if T.shape != W.shape:
            raise ValueError(f"intruder_dimensions: tuned {T.shape} and base {W.shape} differ in shape")
        G_tuned = T @ T.T if left else T.T @ T

        def tuned_times(X: np.ndarray) -> np.ndarray:
            return T @ X

    lam_tuned, vec_tuned = _top_eigh((G_tuned + G_tuned.T) / 2, k)
    lam_w, vec_w = eigh(G, driver="evd")  # all of W's (ascending): the max runs over every uⱼ
    if left:
        U_tuned = vec_tuned  # (d, k): top-k left singular vectors of W'
        cosines = U_tuned.T @ vec_w  # (k, d)
    else:
        sigma_tuned = np.sqrt(np.clip(lam_tuned, 0, None))
        U_tuned = tuned_times(vec_tuned) / np.where(sigma_tuned > 0, sigma_tuned, 1.0)  # (d, k)
        sigma_w = np.sqrt(np.clip(lam_w, 0, None))
        # uⱼ = W vⱼ / σⱼ is defined for σⱼ > 0 only; below float64's Gram floor it is rounding.
        defined = sigma_w > sigma_w.max() * np.sqrt(n * np.finfo(np.float64).eps) if n else sigma_w > 0
        cosines = ((U_tuned.T @ W) @ vec_w[:, defined]) / sigma_w[defined]  # (k, #defined)
    max_cosine = np.abs(cosines).max(axis=1) if cosines.size else np.zeros(k)
    return Intruders(int((max_cosine < eps).sum()), [float(c) for c in max_cosine])
