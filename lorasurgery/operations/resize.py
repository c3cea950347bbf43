"""`resize`: re-rank a PEFT LoRA adapter in factored form, never forming the d × k update.

Per module ΔW = s·B@A has its SVD exactly from QR factors (`linalg.lowrank.lowrank_svd`): O((d+k)·r²).
The optimal rank-k update (Eckart–Young) is then B' = U_k Σ_k^½, A' = Σ_k^½ V_kᵀ (balanced), written
with lora_alpha = r so that every scale is exactly 1. A DoRA module's true update depends on the base
(W' = m/‖W + sBA‖ ⊙ (W + sBA)): with `--base` it is computed densely from the base weight and the
result is a plain LoRA of W' − W (the DoRA → LoRA conversion); without a base it is refused.

The library API used by `resize`, `combine` and `export` (see docs/resize.md, "Semantics"):
- `module_svd(adapter, module, base=None)`: the exact SVD of one module's ΔW, in PEFT's factor layout
  (B@A: (out, in) for Linear and Conv1D alike, (dim, vocab) for an embedding, (out, in·∏kernel) for a conv);
- `truncated_factors(svd, k, dtype)`: balanced rank-k factors cast to `dtype` and the relative error of
  what is written, measured after the cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorasurgery.errors import MismatchError, UnsupportedError


@dataclass
class ModuleFactors:
    """One module's update in PEFT's factor layout, flattened to 2-D: ΔW = scale·B@A."""

    A: object  # (r, in) / (r, vocab) / (r, in·∏kernel), as stored (dtype kept)
    B: object  # (out, r) / (dim, r) / (out, r)
    scale: float


def as_adapter(adapter):
    """An Adapter, loaded from a path when given one."""
    from lorasurgery.adapter import Adapter, load_adapter

    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def as_checkpoint(base):
    """A Checkpoint, opened from a path when given one."""
    from lorasurgery.io import open_checkpoint
    from lorasurgery.io.checkpoint import Checkpoint

    if base is None or isinstance(base, Checkpoint):
        return base
    return open_checkpoint(base)


def module_factors(adapter, module: str, device: str = "cpu") -> ModuleFactors:
    """The stored factors of `module`, flattened to 2-D in PEFT's layout (a conv's 1×1 lora_B included)."""
    lora = adapter.modules[module]
    A, B = adapter.read_factors(module, device)
    if lora.kind == "conv":
        r = A.shape[0]
        if B.dim() < 2 or B.shape[1] != r or any(k != 1 for k in B.shape[2:]):
            raise UnsupportedError(
                f"{adapter.path}: module {module}: lora_B of shape {tuple(B.shape)} is not a 1×1 "
                f"convolution; it has no low-rank form lorasurgery can resize"
            )
        A, B = A.reshape(r, -1), B.reshape(B.shape[0], r)
    return ModuleFactors(A, B, lora.scale)


def base_weight_name(adapter, module: str, checkpoint) -> str:
    """The base tensor `module` adapts (the prefix rule resolved against the checkpoint's names)."""
    from lorasurgery.adapter import resolve_base_names

    direct = adapter.modules[module].base_weight_name
    if (
        direct in checkpoint.tensors
        and tuple(checkpoint.tensors[direct].shape) == adapter.modules[module].shape
    ):
        return direct
    return resolve_base_names(adapter, checkpoint)[module]


def dora_delta(adapter, module: str, base, device: str = "cpu"):
    """W' − W of a DoRA module (float64), in PEFT's factor layout: (out, in), (dim, vocab) or (out, in·∏k).

    W' is the merge kernel's (`linalg.delta.merge_weight`, PEFT's DoRA semantics) in float64. The
    stored layout of the base weight (Conv1D (in, out), embedding (vocab, dim)) is the adapter
    module's (`LoraModule.kind`, `fan_in_fan_out`, whose shape the base weight was checked against).
    """
    import torch

    from lorasurgery.linalg.delta import Update, merge_weight

    adapter = as_adapter(adapter)
    checkpoint = as_checkpoint(base)
    lora = adapter.modules[module]
    name = base_weight_name(adapter, module, checkpoint)
    shape = tuple(checkpoint.tensors[name].shape)
    if shape != tuple(lora.shape):
        raise MismatchError(
            f"{adapter.path}: module {module} expects a base weight of shape {list(lora.shape)} but "
            f"{checkpoint.path}'s {name} has shape {list(shape)}"
        )
    W = checkpoint.read(name).to(device=device, dtype=torch.float64)  # stored layout
    A, B = adapter.read_factors(module, device)
    update = Update(
        module=module,
        kind=lora.kind,
        A=A,
        B=B,
        scale=lora.scale,
        fan_in_fan_out=bool(lora.fan_in_fan_out),
        magnitude=adapter.read_magnitude(module, device),
        source=str(adapter.path),
    )
    merged = merge_weight(
        W.clone(), [update], out_dtype=torch.float64, precise=True, device=device, name=name
    )
    delta = merged - W
    if lora.kind == "embedding" or (lora.kind == "linear" and lora.fan_in_fan_out):
        return delta.T  # stored (vocab, dim) / (in, out) -> B@A's (dim, vocab) / (out, in)
    return delta.reshape(delta.shape[0], -1)


def module_svd(adapter, module: str, base=None, device: str = "cpu"):
    """The exact SVD (float64) of `module`'s true ΔW in PEFT's factor layout, as a LowRankSVD.

    Plain LoRA: of s·B@A from QR factors (r singular values, never forming d × k). DoRA: of the
    effective update W' − W computed densely from `base` (a Checkpoint or a path; min(d, k) values).
    """
    import torch

    from lorasurgery.linalg.lowrank import LowRankSVD, lowrank_svd

    adapter = as_adapter(adapter)
    lora = adapter.modules[module]
    if lora.dora:
        if base is None:
            raise UnsupportedError(
                f"{adapter.path}: module {module} is DoRA: its update depends on the base weight; "
                f"DoRA needs --base"
            )
        U, S, Vh = torch.linalg.svd(dora_delta(adapter, module, base, device), full_matrices=False)
        return LowRankSVD(U=U, S=S, Vh=Vh)
    f = module_factors(adapter, module, device)
    return lowrank_svd(f.A, f.B, f.scale)


def truncated_factors(svd, k: int, dtype) -> tuple[object, object, float]:
    """(A (k, in), B (out, k), relative error): balanced rank-k factors of `svd` cast to `dtype`.

    The error ‖ΔW − B̃Ã‖_F/‖ΔW‖_F is of the cast factors B̃, Ã against ΔW = U Σ Vᵀ, exactly (float64)
    and without forming d × k: with P = UᵀB̃, B⊥ = B̃ − UP, Q = ÃV, A⊥ = Ã − QVᵀ the residual is
    U(Σ − PQ)Vᵀ − UPA⊥ − B⊥QVᵀ − B⊥A⊥, four mutually orthogonal terms, so
    ‖E‖² = ‖Σ − PQ‖² + ‖PA⊥‖² + ‖B⊥Q‖² + ‖B⊥A⊥‖², each from k × k or r × r Gram products: a sum of
    nonnegative terms, with no cancellation. Σ − PQ holds the discarded σ_{i>k} (Eckart–Young's
    √Σ_{i>k}σᵢ²) plus the cast's error inside the kept subspace; the other terms are the cast's error
    outside it.
    """
    import torch

    from lorasurgery.linalg.lowrank import balanced_factors

    S = svd.S.to(torch.float64)
    total_sq = float(S.square().sum())
    k = max(0, min(int(k), len(S)))
    A, B = balanced_factors(svd, k)  # (k, in), (out, k) in the SVD's dtype
    A, B = A.to(dtype), B.to(dtype)
    if total_sq == 0:
        return A, B, 0.0
    U, Vh = svd.U.to(torch.float64), svd.Vh.to(torch.float64)  # (out, m), (m, in)
    Bc, Ac = B.to(torch.float64), A.to(torch.float64)
    P = U.T @ Bc  # (m, k)
    Q = Ac @ Vh.T  # (k, m)
    B_perp = Bc - U @ P  # (out, k)
    A_perp = Ac - Q @ Vh  # (k, in)
    core = torch.diag(S) - P @ Q  # (m, m)
    gram_bp = B_perp.T @ B_perp  # (k, k)
    gram_ap = A_perp @ A_perp.T  # (k, k)
    err_sq = (
        float(core.square().sum())
        + float(((P.T @ P) * gram_ap).sum())  # ‖P A⊥‖² = tr(PᵀP · A⊥A⊥ᵀ)
        + float((gram_bp * (Q @ Q.T)).sum())  # ‖B⊥ Q‖²
        + float((gram_bp * gram_ap).sum())  # ‖B⊥ A⊥‖²
    )
    return A, B, math.sqrt(max(err_sq, 0.0) / total_sq)
