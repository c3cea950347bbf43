"""Expert LoRA at the target's scale and rank (docs/export.md, "MoE experts" and "--max-rank with experts").

One fused expert parameter's LoRA (commands/export/moe.py groups it, in PEFT's fused layout) becomes
what the target loads, at the target's one scale g:
- FUSED layout (PEFT's target_parameters; vLLM's 3-D MoE): one FusedFactors; the unit a rank limit
  counts is one expert's slice of the parameter (gate and up together for gate_up_proj), so above
  --max-rank K each expert's ΔW_e/g is replaced by its optimal rank-K factors (Eckart–Young, from the
  exact SVD of B_e@A_e through QR factors: lorasurgery.factored, never forming out × in);
- PER_EXPERT layout (one 2-D module per expert and projection): the fused LoRA split exactly into its
  parts (adapter/experts.py), and each part of rank above K truncated per expert the same way.
Below K nothing is truncated: the factors are the stored ones, folded to g (rounded once) or copied,
so an export with K at or above every rank is the export without --max-rank, bit for bit.
Each expert's relative error ‖ΔW'_e − ΔW_e‖_F/‖ΔW_e‖_F is measured after the cast against the float64
factors, over all of the expert's parts: from r × r Grams where A is kept (only B was folded, the
difference formed elementwise), from the SVD where the factors were truncated (factored.truncated_factors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorasurgery.adapter.experts import FusedFactors, PartFactors, split
from lorasurgery.commands.export.moe import FUSED, ExpertGroup, fused_factors
from lorasurgery.factored import truncated_factors
from lorasurgery.linalg.lowrank import lowrank_svd


@dataclass
class Written:
    """One fused parameter's expert LoRA as the target loads it, at the target's scale."""

    fused: FusedFactors | None  # FUSED layout
    parts: list[PartFactors] | None  # PER_EXPERT layout: each part's per-expert factors
    errors: list[float]  # per expert, after the cast
    notes: list[str] = field(default_factory=list)  # stacked, folded, padded, zero-filled, truncated

    @property
    def rank(self) -> int:
        """The largest rank written per expert (per module in the per-expert layout)."""
        if self.fused is not None:
            return self.fused.rank
        return max(p.A[0].shape[0] for p in self.parts)

    @property
    def method(self) -> str:
        return "+".join(self.notes) if self.notes else "copied"


def refolded(fused: FusedFactors, scale: float) -> FusedFactors:
    """The same update with `scale` applied: B·(s/scale), in float64 and rounded once."""
    if fused.scale == scale:
        return fused
    B = (fused.B.double() * (fused.scale / scale)).to(fused.B.dtype)
    notes = fused.notes + ([] if "folded" in fused.notes else ["folded"])
    return FusedFactors(fused.A, B, fused.rank, fused.experts, scale, notes)


def for_target(
    adapter, group: ExpertGroup, stored: FusedFactors, scale: float, layout: str, max_rank: int | None
) -> Written:
    """`stored` (the group's LoRA in PEFT's fused layout, as stored) in `layout` at `scale`, every
    expert (or every part of it) of rank above `max_rank` truncated to it."""
    folded = refolded(stored, scale)
    if layout == FUSED:
        if max_rank is None or folded.rank <= max_rank:
            return Written(folded, None, _folding_errors(adapter, group, folded), folded.notes)
        exact = fused_factors(adapter, group, float64=True)
        A, B, err_sq, ref_sq = _truncated(_stacks(exact), exact.scale / scale, max_rank, stored.A.dtype)
        E = stored.experts
        fused = FusedFactors(
            A.reshape(E * max_rank, -1),
            B.permute(1, 2, 0).reshape(B.shape[1], max_rank * E),  # column j·E + e: expert e's j
            max_rank,
            E,
            scale,
        )
        return Written(fused, None, _ratios(err_sq, ref_sq), folded.notes + ["truncated"])
    parts = split(folded, group.parts, group.interleaved)
    over = [k for k, p in enumerate(parts) if max_rank is not None and p.A[0].shape[0] > max_rank]
    if not over:
        return Written(None, parts, _folding_errors(adapter, group, folded), folded.notes)
    written = _split_truncated(adapter, group, parts, over, scale, max_rank)
    written.notes = folded.notes + ["truncated"]
    return written


def _split_truncated(adapter, group: ExpertGroup, parts: list, over: list[int], scale: float, rank: int):
    """Written per expert: the parts listed in `over` truncated to `rank` per expert, the others kept
    as folded; each expert's error over all of its parts."""
    exact = fused_factors(adapter, group, float64=True)
    references = split(exact, group.parts, group.interleaved)
    ratio = exact.scale / scale
    dtype = parts[0].A[0].dtype
    err_sq, ref_sq = (
        torch.zeros(group.experts, dtype=torch.float64),
        torch.zeros(group.experts, dtype=torch.float64),
    )
    for k, part in enumerate(parts):
        reference = _part_stacks(references[k])
        if k in over:
            A, B, e2, r2 = _truncated(reference, ratio, rank, dtype)
            parts[k] = PartFactors(list(A.unbind(0)), list(B.unbind(0)), [scale] * group.experts)
        else:
            e2, r2 = _same_a_squares(_part_stacks(part), reference, ratio)
        err_sq, ref_sq = err_sq + e2, ref_sq + r2
    return Written(None, parts, _ratios(err_sq, ref_sq))


def _stacks(fused: FusedFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) of a fused LoRA (PEFT: lora_A row e·r + j, lora_B column j·E + e)."""
    E, r = fused.experts, fused.rank
    return fused.A.reshape(E, r, -1), fused.B.reshape(fused.B.shape[0], r, E).permute(2, 0, 1)


def _part_stacks(part: PartFactors) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(part.A), torch.stack(part.B)


def _truncated(exact, ratio: float, rank: int, dtype):
    """Per expert, the balanced optimal rank-`rank` factors of ratio·B_e@A_e (`exact` float64 stacks),
    cast to `dtype` and zero-padded to `rank` where the expert has fewer singular values; with each
    expert's squared error and squared norm (both in units of the update over the target's scale)."""
    A, B = exact
    As, Bs, err_sq, ref_sq = [], [], [], []
    for a, b in zip(A.unbind(0), B.unbind(0)):
        svd = lowrank_svd(a, b, ratio)
        a_k, b_k, error = truncated_factors(svd, rank, dtype)
        k = a_k.shape[0]
        As.append(torch.cat([a_k, a_k.new_zeros((rank - k, a_k.shape[1]))]))
        Bs.append(torch.cat([b_k, b_k.new_zeros((b_k.shape[0], rank - k))], dim=1))
        norm_sq = float(svd.S.square().sum())
        ref_sq.append(norm_sq)
        err_sq.append(error**2 * norm_sq if norm_sq > 0 else 0.0)
    return (
        torch.stack(As),
        torch.stack(Bs),
        torch.tensor(err_sq, dtype=torch.float64),
        torch.tensor(ref_sq, dtype=torch.float64),
    )


def _same_a_squares(written, exact, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖ΔW'_e − ΔW_e‖², Σ‖ΔW_e‖²) per expert for factors that share A (only B was folded): the
    difference D_e = B'_e − ratio·B_e formed elementwise in float64, so exactly 0 when nothing was
    rounded; ‖D_e A_e‖² = tr((D_eᵀD_e)(A_eA_eᵀ)), no out × in formed."""
    A = exact[0].double()
    B_exact = exact[1].double() * ratio
    D = written[1].double() - B_exact
    AA = A @ A.transpose(1, 2)

    def squares(B):
        return ((B.transpose(1, 2) @ B) * AA).sum(dim=(1, 2))

    return squares(D).clamp(min=0), squares(B_exact)


def _folding_errors(adapter, group: ExpertGroup, folded: FusedFactors) -> list[float]:
    """Each expert's error of factors only folded (A as stored): 0 where nothing was rounded. Splitting
    is exact, so the fused form's errors are the per-expert layout's too."""
    if "folded" not in folded.notes:
        return [0.0] * folded.experts
    exact = fused_factors(adapter, group, float64=True)
    return _ratios(*_same_a_squares(_stacks(folded), _stacks(exact), exact.scale / folded.scale))


def _ratios(err_sq: torch.Tensor, ref_sq: torch.Tensor) -> list[float]:
    return [(e / r) ** 0.5 if r > 0 else 0.0 for e, r in zip(err_sq.tolist(), ref_sq.tolist())]
