"""Exact spectra of a low-rank product ΔW = s·B@A without forming the d × k matrix.

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B@A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the singular values
of ΔW are those of the r × r core R_B R_Aᵀ, and its singular vectors are Q_B u and Q_A v.
Cost O((d + k)·r²) instead of O(d·k·min(d, k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LowRankSVD:
    U: torch.Tensor  # (out, r) left singular vectors of ΔW
    S: torch.Tensor  # (r,) singular values, descending
    Vh: torch.Tensor  # (r, in) right singular vectors of ΔW (rows)


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, dtype=torch.float64) -> LowRankSVD:
    """SVD of scale·B@A from A (r, in) and B (out, r), exact up to rounding in `dtype`."""
    A = A.to(dtype)  # (r, in)
    B = B.to(dtype)  # (out, r)
    q_b, r_b = torch.linalg.qr(B)  # (out, r), (r, r)
    q_a, r_a = torch.linalg.qr(A.T)  # (in, r), (r, r)
    core = scale * (r_b @ r_a.T)  # (r, r)
    # thin: a concatenation of Σr > min(d, k) columns has a non-square core
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # s ≥ 0 whatever the sign of scale
    return LowRankSVD(U=q_b @ u, S=s, Vh=vh @ q_a.T)


def balanced_factors(svd: LowRankSVD, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of the best rank-k approximation (Eckart–Young), split evenly: B' = U_k Σ_k^½ (out, k),
    A' = Σ_k^½ V_kᵀ (k, in), so that B'@A' = U_k Σ_k V_kᵀ at scale 1."""
    root = svd.S[:k].sqrt()  # (k,)
    return root[:, None] * svd.Vh[:k], svd.U[:, :k] * root


def factors_error(svd: LowRankSVD, A: torch.Tensor, B: torch.Tensor) -> float:
    """‖ΔW − B@A‖_F / ‖ΔW‖_F for ΔW = U Σ Vᵀ (`svd`) and any factors A (k, in), B (out, k), in float64
    without forming d × k.

    With P = UᵀB, B⊥ = B − UP, Q = AV, A⊥ = A − QVᵀ the residual is
    U(Σ − PQ)Vᵀ − UPA⊥ − B⊥QVᵀ − B⊥A⊥: four mutually orthogonal terms (U ⊥ B⊥, Vᵀ ⊥ A⊥), so
    ‖E‖² = ‖Σ − PQ‖² + ‖PA⊥‖² + ‖B⊥Q‖² + ‖B⊥A⊥‖². Each is the square of a product computed
    directly, so a residual that is zero comes out at rounding² (a Gram trace such as tr(PᵀP·A⊥A⊥ᵀ)
    would cancel and leave √eps ≈ 1e-8); the last is a k × k Gram trace unless that trace cancels
    (it is below 1e-8·‖B⊥‖²‖A⊥‖²), and then ‖R_B⊥ R_A⊥ᵀ‖² from QR factors. Cost O((out + in)·(m + k)²)
    for m = len(Σ). For truncated factors Σ − PQ holds the discarded σ (Eckart–Young) plus a cast's
    error inside the kept subspace; the other terms are the cast's error outside it.
    """
    S = svd.S.to(torch.float64)
    total_sq = float(S.square().sum())
    Bc, Ac = B.to(torch.float64), A.to(torch.float64)
    if total_sq == 0:
        return 0.0 if lowrank_fro_norm(Ac, Bc) == 0 else math.inf
    U, Vh = svd.U.to(torch.float64), svd.Vh.to(torch.float64)  # (out, m), (m, in)
    P = U.T @ Bc  # (m, k)
    Q = Ac @ Vh.T  # (k, m)
    B_perp = Bc - U @ P  # (out, k)
    A_perp = Ac - Q @ Vh  # (k, in)
    gram_b, gram_a = B_perp.T @ B_perp, A_perp @ A_perp.T  # (k, k) each
    perp_sq = float((gram_b * gram_a).sum())  # ‖B⊥A⊥‖² = tr(B⊥ᵀB⊥·A⊥A⊥ᵀ), rounding ≈ k·eps·‖B⊥‖²‖A⊥‖²
    if perp_sq < 1e-8 * float(gram_b.trace()) * float(gram_a.trace()):  # cancelling: square a product
        r_b = torch.linalg.qr(B_perp, mode="r").R  # (·, k)
        r_a = torch.linalg.qr(A_perp.T, mode="r").R  # (·, k)
        perp_sq = float((r_b @ r_a.T).square().sum())  # ‖B⊥A⊥‖ = ‖R_B⊥ R_A⊥ᵀ‖
    err_sq = (
        float((torch.diag(S) - P @ Q).square().sum())  # (m, m)
        + float((P @ A_perp).square().sum())  # (m, in)
        + float((B_perp @ Q).square().sum())  # (out, m)
        + perp_sq
    )
    return math.sqrt(max(err_sq, 0.0) / total_sq)


def concatenated_factors(terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B@A = Σ cᵢ·Bᵢ@Aᵢ exactly, from terms (Aᵢ (rᵢ, in), Bᵢ (out, rᵢ), cᵢ): the
    coefficients go into B, A = [A₁; …; Aₙ] (Σrᵢ, in), B = [c₁B₁ … cₙBₙ] (out, Σrᵢ)."""
    terms = list(terms)
    dtype = torch.promote_types(terms[0][0].dtype, torch.float32)
    A = torch.cat([a.to(dtype) for a, _, _ in terms], dim=0)
    B = torch.cat([c * b.to(dtype) for _, b, c in terms], dim=1)
    return A, B


def lowrank_fro_norm(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> float:
    """‖scale·B@A‖_F via ‖BA‖_F² = trace((BᵀB)(AAᵀ)), two r × r Gram matrices."""
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    gram_b = B.T @ B  # (r, r)
    gram_a = A @ A.T  # (r, r)
    squared = float((gram_b * gram_a).sum())  # trace(GB·GA) for symmetric GA
    return abs(scale) * max(squared, 0.0) ** 0.5
