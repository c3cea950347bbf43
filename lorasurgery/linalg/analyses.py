"""The LoRA paper's analyses (Hu et al. 2021, §7) with docs/design.md §5's JSON names.

- Subspace similarity (§7.2): how much of the top-i directions of one update lie in the top-j
  directions of another, φ(i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) ∈ [0, 1].
- Amplification factor (§7.3): how strongly ΔW amplifies directions that W itself barely uses,
  ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the top-r singular vectors of ΔW.
"""

from __future__ import annotations

import math

import torch

from lorasurgery.linalg.svd import singular_values


def subspace_similarity_grid(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for all i ≤ r1, j ≤ r2 as an (r1, r2) float64 tensor (entry [i−1, j−1]).

    V1 (r1, n) and V2 (r2, n) hold orthonormal singular vectors as ROWS, most significant first
    (Vh of an SVD; for adapters, Vh of A₁ and A₂ as in the paper). With G = V1 V2ᵀ, the overlap of
    the top-i and top-j subspaces is ‖U_iᵀ U_j‖_F² = Σ_{a≤i, b≤j} G_ab², a 2-D prefix sum of G².
    So the whole grid costs one r1 × n × r2 product plus O(r1·r2), not r1·r2 separate products.
    """
    if V1.dim() != 2 or V2.dim() != 2 or V1.shape[1] != V2.shape[1]:
        raise ValueError(
            f"subspace similarity needs (r1, n) and (r2, n) row-vector bases, got {tuple(V1.shape)} "
            f"and {tuple(V2.shape)}"
        )
    overlap = V1.to(torch.float64) @ V2.to(device=V1.device, dtype=torch.float64).T  # (r1, r2)
    captured = overlap.square().cumsum(0).cumsum(1)  # (r1, r2): ‖U_iᵀ U_j‖_F²
    r1, r2 = captured.shape
    i = torch.arange(1, r1 + 1, dtype=torch.float64, device=captured.device)[:, None]  # (r1, 1)
    j = torch.arange(1, r2 + 1, dtype=torch.float64, device=captured.device)[None, :]  # (1, r2)
    # φ ≤ 1 exactly (a projection of i orthonormal vectors onto j-dim space); clamp rounding.
    return (captured / torch.minimum(i, j)).clamp(0.0, 1.0)


def subspace_similarity(V1: torch.Tensor, V2: torch.Tensor, name: str = "subspace_similarity") -> dict:
    """{name + "_1_1": φ(1, 1), name: rows i = 1..r1 of φ(i, 1..r2)}.

    `name` says which vectors V1, V2 are (docs/rank-report.md): "subspace_similarity" for the
    paper's (right singular vectors of A₁, A₂; of ΔW for a dense ΔW), "subspace_similarity_delta"
    for those of ΔW₁ = s₁B₁A₁ and ΔW₂, which the B/A gauge (A → GA, B → BG⁻¹) leaves unchanged.
    """
    grid = subspace_similarity_grid(V1, V2)
    rows = grid.cpu().tolist()
    return {f"{name}_1_1": rows[0][0] if rows and rows[0] else 0.0, name: rows}


def right_singular_rows(A: torch.Tensor) -> torch.Tensor:
    """Vh (min(r, n), n) float64 of a factor A (r, n): the paper's basis for φ of adapters (§7.2)."""
    return torch.linalg.svd(A.to(torch.float64), full_matrices=False).Vh


def amplification(
    U_r: torch.Tensor,
    Vh_r: torch.Tensor,
    delta_fro: float,
    W: torch.Tensor,
    w_singular_values: torch.Tensor | None = None,
) -> dict:
    """Amplification factor of ΔW on W (paper §7.3, Table 7), docs/design.md §5 formulas and names.

    U_r (d, r) and Vh_r (r, k): the top-r left/right singular vectors of ΔW; delta_fro = ‖ΔW‖_F;
    W (d, k) the base weight. `w_singular_values` (W's spectrum, descending; at least r values) is
    reused when the caller has it, else computed.

    Returns:
    - "amplification" = ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F — the paper's amplification factor (21.5 for GPT-3
      layer 48 W_q at r = 4): how much larger ΔW is than W's own component in ΔW's directions.
      None when that component is exactly 0 (a JSON-safe stand-in for ∞); 0.0 when ΔW = 0.
    - "amplification_random_baseline" = r·‖W‖_F / sqrt(d·k) — the paper's "Random" column: the
      typical ‖U_rᵀ W V_r‖_F for random orthonormal U_r, V_r. For Haar-random r-frames,
      E‖U_rᵀ W V_r‖_F² = (r/d)(r/k)·‖W‖_F², so the root-mean-square is exactly this value.
    - "amplification_w_top_baseline" = ‖U_Wᵀ W V_W‖_F = sqrt(Σ_{i≤r} σᵢ(W)²) — the paper's "W"
      column: W's component along its own top-r directions, the largest any r-frame can get.
    The two baselines are in the units of ‖U_rᵀ W V_r‖_F (not ratios): ΔW's own value of that norm
    is delta_fro / amplification, and it sits near the random baseline when ΔW amplifies directions
    W does not emphasise, as the paper found (0.32 vs 0.02 random vs 21.67 for W's top, at r = 4).
    """
    d, k = W.shape
    r = U_r.shape[1]
    if U_r.shape[0] != d or Vh_r.shape != (r, k):
        raise ValueError(
            f"amplification needs U_r (d, r), Vh_r (r, k) for W {tuple(W.shape)}, got {tuple(U_r.shape)} "
            f"and {tuple(Vh_r.shape)}"
        )
    W64 = W.to(torch.float64)
    projected = (U_r.to(device=W.device, dtype=torch.float64).T @ W64) @ Vh_r.to(
        device=W.device, dtype=torch.float64
    ).T  # (r, d)·(d, k)·(k, r) → (r, r)
    projected_fro = float(torch.linalg.matrix_norm(projected))
    w_fro = float(torch.linalg.matrix_norm(W64))
    if w_singular_values is None:
        w_singular_values = singular_values(W)
    w_top = float(w_singular_values.to(torch.float64)[:r].square().sum().sqrt())
    if delta_fro == 0:
        factor: float | None = 0.0
    elif projected_fro == 0:
        factor = None
    else:
        factor = float(delta_fro) / projected_fro
    return {
        "amplification": factor,
        "amplification_random_baseline": r * w_fro / math.sqrt(d * k),
        "amplification_w_top_baseline": w_top,
    }
