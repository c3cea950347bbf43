"""MoE expert LoRA between its two layouts, exactly: per-expert 2-D modules ↔ PEFT target_parameters.

A LoRA on an MoE block's experts is saved in one of two layouts (docs/design.md §15):
- per expert and projection, 2-D modules (`…experts.{e}.gate_proj` / `up_proj` / `down_proj`, Mixtral's
  w1 / w3 / w2): expert e's part k has its own A_ek (r, in), B_ek (out_k, r) and scale s_ek;
- PEFT's target_parameters on the fused 3-D parameter (`…experts.gate_up_proj`, `…experts.down_proj`):
  lora_A (r·E, in) with expert e's rows e·r … e·r + r − 1, lora_B (out, r·E) with expert e's columns
  e, E + e, 2E + e, … (peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight), one scale.
A fused gate_up parameter's out axis holds gate then up (Qwen3-MoE, Mixtral: concatenated) or gate on
the even and up on the odd outputs (gpt-oss: interleaved); which one the model says (lorasurgery.model),
never a shape.

Joining the parts of one expert (gate and up into gate_up): when every expert's A_gate and A_up are
the same tensor bit for bit, the fused A is that A and B stacks the parts' rows (rank r, what PEFT's
fused LoRA trains); otherwise A = [A_gate; A_up] and B is block diagonal (rank r_gate + r_up: the
fused rank is said). Splitting is the inverse: each part takes its rows of B; where the parts use
disjoint columns of B (a block-diagonal join), each keeps only its own columns and A's rows, else each
keeps the shared A (rank r). Both directions are exact, and each undoes the other bit for bit.
Parts or experts of different scales have s/t folded into B (float64, rounded once; t the most
common scale) and experts of different ranks are zero-padded to the largest: both exact, both said.
Pure tensor code: no I/O, no model, vectorised over the experts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class PartFactors:
    """One projection (part) of every expert as 2-D LoRA factors: ΔW_e = scale_e · B[e] @ A[e]."""

    A: list[torch.Tensor]  # per expert (r_e, in)
    B: list[torch.Tensor]  # per expert (out_part, r_e)
    scales: list[float]  # per expert


@dataclass
class FusedFactors:
    """A LoRA on a fused expert parameter as PEFT saves it: ΔW_e = scale · B_e @ A_e."""

    A: torch.Tensor  # (r·E, in)
    B: torch.Tensor  # (out, r·E)
    rank: int  # r, per expert
    experts: int
    scale: float
    notes: list[str] = field(default_factory=list)  # what was folded, padded or stacked

    @property
    def method(self) -> str:
        return "+".join(self.notes) if self.notes else "copied"


def _common(values: list[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def _folded(B: torch.Tensor, ratio: float) -> torch.Tensor:
    return B if ratio == 1.0 else (B.double() * ratio).to(B.dtype)


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = A.shape[0]
    if k == rank:
        return A, B
    return (
        torch.cat([A, A.new_zeros((rank - k, A.shape[1]))], dim=0),
        torch.cat([B, B.new_zeros((B.shape[0], rank - k))], dim=1),
    )


def _stacked(part: PartFactors, scale: float, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) of one part, scales folded to `scale`, ranks padded to the largest."""
    if any(s != scale for s in part.scales) and "folded" not in notes:
        notes.append("folded")
    B = [_folded(b, s / scale) for b, s in zip(part.B, part.scales)]
    rank = max(a.shape[0] for a in part.A)
    if any(a.shape[0] != rank for a in part.A) and "padded" not in notes:
        notes.append("padded")
    pairs = [_padded(a, b, rank) for a, b in zip(part.A, B)]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def _rows(out: int, parts: int, interleaved: bool) -> list[torch.Tensor | slice]:
    """Which rows of the fused out axis each part owns."""
    size = out // parts
    if interleaved:
        return [slice(k, None, parts) for k in range(parts)]
    return [slice(k * size, (k + 1) * size) for k in range(parts)]


def fuse(parts: list[PartFactors], interleaved: bool = False) -> FusedFactors:
    """The fused parameter's LoRA of `parts` (gate and up, or one part), PEFT's target_parameters layout."""
    experts = len(parts[0].A)
    scale = _common([s for p in parts for s in p.scales])
    notes: list[str] = []
    stacks = [_stacked(p, scale, notes) for p in parts]
    out = sum(B.shape[1] for _, B in stacks)
    rows = _rows(out, len(parts), interleaved)
    shared = len(parts) > 1 and all(
        A.shape == stacks[0][0].shape and torch.equal(A, stacks[0][0]) for A, _ in stacks[1:]
    )
    first = stacks[0][1]
    if shared or len(parts) == 1:
        A = stacks[0][0]
        B = first.new_empty((experts, out, A.shape[1]))
        for (_, Bk), where in zip(stacks, rows):
            B[:, where] = Bk
    else:  # different A per part: A stacked, B block diagonal (the fused rank is the sum)
        A = torch.cat([Ak for Ak, _ in stacks], dim=1)
        B = first.new_zeros((experts, out, A.shape[1]))
        start = 0
        for (Ak, Bk), where in zip(stacks, rows):
            B[:, where, start : start + Ak.shape[1]] = Bk
            start += Ak.shape[1]
        notes.append("stacked")
    rank = A.shape[1]
    # PEFT: lora_A row e·r + j is A_e's row j; lora_B column j·E + e is B_e's column j
    return FusedFactors(
        A.reshape(experts * rank, A.shape[2]),
        B.permute(1, 2, 0).reshape(out, rank * experts),
        rank,
        experts,
        scale,
        notes,
    )


def split(fused: FusedFactors, parts: int = 1, interleaved: bool = False) -> list[PartFactors]:
    """Per-expert 2-D factors of each part of a fused parameter's LoRA (inverse of `fuse`)."""
    E, r = fused.experts, fused.rank
    A = fused.A.reshape(E, r, fused.A.shape[1])  # (E, r, in)
    B = fused.B.reshape(fused.B.shape[0], r, E).permute(2, 0, 1)  # (E, out, r)
    pieces = [B[:, where] for where in _rows(B.shape[1], parts, interleaved)]
    columns = _own_columns(pieces) if parts > 1 else None
    result = []
    for k, Bk in enumerate(pieces):
        Ak = A
        if columns is not None:  # a block-diagonal join: each part keeps its own columns
            Ak, Bk = A[:, columns[k]], Bk[:, :, columns[k]]
        result.append(
            PartFactors(
                [a.contiguous() for a in Ak.unbind(0)],
                [b.contiguous() for b in Bk.unbind(0)],
                [fused.scale] * E,
            )
        )
    return result


def _own_columns(pieces: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The columns of B each part uses, when no column is used by two parts and every expert uses the
    same ones (a block-diagonal join); None when A is shared."""
    used = [(Bk != 0).any(dim=1) for Bk in pieces]  # (E, r) each
    if any((used[i] & used[j]).any() for i in range(len(used)) for j in range(i + 1, len(used))):
        return None
    if any(not bool((u == u[0]).all()) or not bool(u[0].any()) for u in used):
        return None
    return [u[0].nonzero().flatten() for u in used]


def padded(fused: FusedFactors, rank: int) -> FusedFactors:
    """The same LoRA at a larger rank per expert: zero rows of A and columns of B (exact)."""
    if rank <= fused.rank:
        return fused
    E, r = fused.experts, fused.rank
    A = fused.A.reshape(E, r, -1)
    A = torch.cat([A, A.new_zeros((E, rank - r, A.shape[2]))], dim=1)
    B = fused.B.reshape(fused.B.shape[0], r, E)
    B = torch.cat([B, B.new_zeros((B.shape[0], rank - r, E))], dim=1)
    notes = fused.notes + ([] if "padded" in fused.notes else ["padded"])
    return FusedFactors(A.reshape(E * rank, -1), B.reshape(B.shape[0], rank * E), rank, E, fused.scale, notes)
