"""verify's arithmetic: how a landed update ΔŴ compares with the expected ΔW, and what went wrong.

For one tensor: D = ΔW (expected, float32) and H = ΔŴ = W_artifact − W_base (float32), every norm
and inner product by float32 BLAS dot products (see `inner`). The tolerance τ is the rounding the artifact's dtype
allows (docs/verify.md "Tolerance"): half an ulp of each element of W + ΔW in that dtype, in norm,
plus half an ulp of each element of ΔW (a tool that rounds ΔW to the dtype before adding it, as
PEFT does in bf16), plus 1e-5·‖ΔW‖ for float32 summation order. A quantized artifact's ulp is its
codes' (e4m3: 3 mantissa bits), doubled because a block scale need not be a power of two.

Verdicts, first that holds:
- `landed`: ‖H − D‖ ≤ τ and the update is visibly there: ρ ≥ ½, and the rounding's noise on ρ,
  about τ/(‖ΔW‖·√N) for N elements, at most ¼ (else the dtype cannot show ΔW: partly, or missing);
- `missing`: ‖H‖ ≈ 0 (≤ τ + 2 %·‖D‖ when outside the tolerance; exactly 0 inside it);
- `partly`: inside the tolerance but ρ < ½ (a tiny update mostly rounded away), or 0 < ρ < 1 and
  no simpler explanation (requantization);
- `transposed`: a square tensor with H ≈ Dᵀ;
- `scaled`: H ≈ c·D with c = ρ (c = 2 reads "applied twice"; α instead of α/r shows as c = r);
- `differs`: none of these.

A quantized artifact (block codes: FP8, GGUF's Q8_0 … Q2_K) is judged by `judge_quantized`
instead: its rounding can be many times ‖ΔW‖ (a 4-bit merge of a small LoRA), so the error test
alone would pass a base-only file; the retention ρ decides, within its uncertainty u = 3σ + δ (σ
the rounding's noise on ρ, δ the quantizer's gain off 1): `landed` needs |ρ − 1| ≤ u, `missing`
|ρ| ≤ u, and where u > ½ (1 and 0 cannot be told apart) the verdict is `cannot tell at this
quantization`, never `landed` (docs/verify.md "Quantized GGUF").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Mantissa bits of each safetensors float code (the ulp of x is 2^(exponent(x) − bits)).
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7, "F8_E4M3": 3, "F8_E5M2": 2}
VISIBLE = 0.5  # ρ below this, inside the tolerance: the update is not really there
MISSING = 0.02  # ‖ΔŴ‖ below this share of ‖ΔW‖ (beyond τ): nothing landed
RESOLVABLE = 0.25  # largest rounding noise of ρ (τ/(‖ΔW‖·√N)) under which "landed" can be told
SCALE_SLACK = 1e-3  # relative residual allowed when fitting ΔŴ ≈ c·ΔW or ΔWᵀ
CANNOT_TELL = "cannot tell at this quantization"
WINDOW = 3.0  # quantized: ρ within WINDOW·σ (+ the gain δ) of 1 is landed, of 0 missing
TELLABLE = 0.5  # quantized: widest uncertainty under which landed (1), missing (0) and twice (2) differ


def half_ulp_norm(values: torch.Tensor, code: str, factor: float = 1.0, *, in_place: bool = False) -> float:
    """‖½ ulp(x)‖ over the float32 `values` as the dtype `code` rounds them, times `factor`.

    The power of two below |x| is x's float32 bits with the mantissa and sign cleared (0 stays 0),
    so this costs one integer pass and no exponent arithmetic. `in_place`: `values` (float32,
    contiguous) is overwritten by those powers instead of a new buffer (the caller refills it)."""
    bits = MANTISSA_BITS.get(code)
    if bits is None:  # integer tensors are exact
        return 0.0
    if in_place:
        powers = values.view(torch.int32).bitwise_and_(0x7F800000).view(torch.float32)
    else:
        values = values.detach().to(torch.float32).contiguous()
        powers = (values.view(torch.int32) & 0x7F800000).view(torch.float32)
    return factor * math.ldexp(norm(powers), -(bits + 1))


def half_ulp_bound(value_norm: float, code: str, factor: float = 1.0) -> float:
    """An upper bound of ‖½ ulp(x)‖ from ‖x‖ alone (½ ulp(x) ≤ 2^-(bits+1)·|x|)."""
    bits = MANTISSA_BITS.get(code)
    return 0.0 if bits is None else factor * math.ldexp(value_norm, -(bits + 1))


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of float32 tensors by BLAS (its float32 accumulation errs by ~1e-5 relative at most
    here, far below every threshold; a float64 pass costs 100× more, docs/verify.md)."""
    if not a.numel():
        return 0.0
    return float(torch.dot(a.reshape(-1).float(), b.reshape(-1).float()))


def norm(x: torch.Tensor) -> float:
    return math.sqrt(max(inner(x, x), 0.0))


@dataclass(frozen=True)
class Comparison:
    """ΔŴ against ΔW for one tensor."""

    verdict: str  # landed | partly | missing | transposed | scaled | differs
    relative_error: float  # ‖ΔŴ − ΔW‖ / ‖ΔW‖
    retention: float  # ρ = ⟨ΔŴ, ΔW⟩ / ‖ΔW‖²
    expected_norm: float  # ‖ΔW‖
    tolerance: float  # τ, relative to ‖ΔW‖
    scale: float | None = None  # c when scaled
    uncertainty: float | None = None  # a quantized artifact: u, how far rounding can move ρ
    on_grid: float | None = None  # a GGUF tensor: ρ*, the retention W + ΔW rounded on its grid shows

    @property
    def label(self) -> str:
        if self.verdict == "scaled" and self.scale is not None:
            # quantized: within ρ's uncertainty, and twice what the grid itself moves ρ off 1 where
            # that grid keeps ΔW (a grid that rounds most of it away says nothing about 2ΔW)
            off = abs((self.on_grid or 1.0) - 1)
            slack = (self.uncertainty or 0.0) + (2 * off if off <= TELLABLE else 0.0)
            if abs(self.scale - 2) < max(0.01, slack):
                return "applied twice"
            return f"scaled by {self.scale:.4g}"
        return self.verdict


def compare(
    H: torch.Tensor,
    D: torch.Tensor,
    tolerance: float,
    n: float | None = None,
    *,
    rounding: Rounding | None = None,
) -> Comparison:
    """The verdict on landed `H` against expected `D` (same shape) under the absolute `tolerance`;
    `n` is ‖D‖ when the caller has it. ‖H‖ is computed only when the verdict needs it. H is the
    caller's scratch: it holds H − D afterwards when the verdict is `landed`. `rounding`: the
    artifact's values are block codes (`judge_quantized`)."""
    n = norm(D) if n is None else n
    if n == 0:
        rho = 1.0 if norm(H) <= tolerance else 0.0
    else:
        rho = inner(H, D) / (n * n)
    error = norm(H.sub_(D))  # ΔŴ − ΔW in ΔŴ's own buffer: H is given back only when needed
    restored = []

    def landed_value() -> torch.Tensor:
        if not restored:
            H.add_(D)
            restored.append(True)
        return H

    square = D.dim() >= 2 and D.shape[-1] == D.shape[-2]
    lazy = {
        "h": lambda: norm(landed_value()),
        "transposed_error": (lambda: norm(landed_value() - D.transpose(-1, -2))) if square else None,
        "is_zero": lambda: not landed_value().any(),
    }
    if rounding is not None:
        return judge_quantized(n, rho, error, tolerance, rounding=rounding, **lazy)
    return judge(n, rho, error, tolerance, D.numel(), **lazy)


def judge(n, rho, error, tolerance, numel, *, h, transposed_error, is_zero) -> Comparison:
    """The verdict from ‖ΔW‖ = `n`, ρ, ‖ΔŴ − ΔW‖ = `error` and the tolerance, for a tensor of
    `numel` elements; `h()` gives ‖ΔŴ‖, `transposed_error()` ‖ΔŴ − ΔWᵀ‖ (None: not square) and
    `is_zero()` whether ΔŴ = 0, each called only when the verdict needs it. Dense (`compare`) and
    factored (`compare_factored`) comparisons share it, so both name failures alike."""
    scale = n if n > 0 else 1.0

    def result(verdict: str, c: float | None = None) -> Comparison:
        return Comparison(verdict, error / scale, rho, n, tolerance / scale, c)

    if error <= tolerance:
        # ρ's noise from rounding is about τ / (‖ΔW‖·√N): above RESOLVABLE the dtype cannot show ΔW
        resolvable = tolerance <= RESOLVABLE * n * math.sqrt(max(numel, 1))
        if n == 0 or (rho >= VISIBLE and resolvable):
            return result("landed")
        return result("missing" if is_zero() else "partly")
    size = h()
    if size <= tolerance + MISSING * n:
        return result("missing")
    if transposed_error is not None and transposed_error() <= 2 * tolerance + SCALE_SLACK * n:
        return result("transposed")
    residual = math.sqrt(max(size * size - rho * rho * n * n, 0.0))  # ‖H − ρD‖, ρ the least-squares c
    if residual <= 2 * tolerance * max(1.0, abs(rho)) + SCALE_SLACK * abs(rho) * n:
        return result("scaled", rho)
    if 0 < rho < 1:
        return result("partly")
    return result("differs")


@dataclass(frozen=True)
class Rounding:
    """What a quantized artifact's rounding lets ρ be, for one tensor of `numel` elements: `gain` δ =
    |⟨ΔŴ, W⟩|/‖W‖², and `expected` (ρ*, ρ₀) where the artifact gives its grid (`judge_quantized`)."""

    numel: int
    gain: float = 0.0
    expected: tuple[float, float] | None = None


def judge_quantized(
    n, rho, error, tolerance, *, h, transposed_error, is_zero, rounding: Rounding
) -> Comparison:
    """`judge` for an artifact of block codes, whose rounding `tolerance` (‖½ step‖ over the tensor,
    or its codes' ulp) may dwarf ‖ΔW‖ = `n`: ρ decides, against what it should be. `rounding.expected`:
    (ρ*, ρ₀), the retention W + ΔW and W alone show rounded on the artifact's own grid (its block
    scales: a GGUF tensor); without it (1, 0). ρ's uncertainty u = 3σ (+ δ without a grid):
    σ = τ/(‖ΔW‖·√N) is the rounding's noise on ρ (its projection on ΔW's direction; rounding errs by
    0.58 τ on average, so σ overstates it); δ = `rounding.gain`, |⟨ΔŴ, W⟩|/‖W‖², how far the quantizer
    scales the whole tensor (a scale search that shrinks or stretches its grid moves ρ as much).

    First that holds: |ρ* − ρ₀| > 2u, |ρ − ρ*| ≤ u and ‖ΔŴ − ΔW‖ ≤ τ: `landed` (where the grid itself
    keeps under ½ of ΔW `partly`, over 1½ `scaled` by ρ); ΔŴ = 0: `missing`; |ρ* − ρ₀| ≤ 2u:
    `cannot tell at this quantization` (`differs` if ΔŴ − ΔW exceeds the rounding); ΔŴ ≈ ΔWᵀ
    (ρ against ΔWᵀ within u of 1, ‖ΔŴ − ΔWᵀ‖ ≤ τ): `transposed`; |ρ − ρ₀| ≤ u and ‖ΔŴ‖ ≤ τ:
    `missing`; ‖ΔŴ − ρΔW‖ ≤ τ: `scaled` by ρ; 0 < ρ < 1: `partly`; else `differs`."""
    scale = n if n > 0 else 1.0
    expected = rounding.expected
    target, none = expected if expected is not None else (1.0, 0.0)
    window = WINDOW * tolerance / (n * math.sqrt(max(rounding.numel, 1))) if n > 0 else math.inf
    if expected is None:
        window += rounding.gain

    def result(verdict: str, c: float | None = None) -> Comparison:
        u = window if n > 0 else None
        return Comparison(
            verdict, error / scale, rho, n, tolerance / scale, c, u, target if expected else None
        )

    if n == 0:  # nothing expected: only the rounding may show
        return result("landed" if error <= tolerance else "differs")
    tellable = 2 * window < abs(target - none)
    if tellable and error <= tolerance and abs(rho - target) <= window:
        if abs(target - 1) <= TELLABLE:
            return result("landed")
        return result("partly") if target < 1 else result("scaled", rho)  # as the grid rounds it
    if is_zero():
        return result("missing")
    if not tellable:
        return result(CANNOT_TELL if error <= tolerance else "differs")
    size = h()
    if transposed_error is not None:
        off = transposed_error()  # ‖ΔŴ − ΔWᵀ‖; ρ against ΔWᵀ from ‖ΔŴ‖² − 2⟨ΔŴ, ΔWᵀ⟩ + ‖ΔW‖²
        if off <= tolerance and abs((size * size + n * n - off * off) / (2 * n * n) - 1) <= window:
            return result("transposed")
    if abs(rho - none) <= window and size <= tolerance:
        return result("missing")
    if math.sqrt(max(size * size - rho * rho * n * n, 0.0)) <= tolerance:
        return result("scaled", rho)
    if 0 < rho < 1:
        return result("partly")
    return result("differs")


# ------------------------------------------------------------------------------ factored form
# Both sides low rank, ΔŴ = Bh·Ah and ΔW = Bd·Ad (scales folded into B, float64): nothing d × k is
# formed. A norm ‖B·A‖ is ‖R_B·R_Aᵀ‖ from the thin QR factors of B and Aᵀ (Q has orthonormal columns),
# a (r × r) product with no cancellation: ‖ΔŴ − ΔW‖ is the norm of the stacked pair [Bh, −Bd]·[Ah; Ad],
# exact where ‖ΔŴ‖² − 2⟨ΔŴ, ΔW⟩ + ‖ΔW‖² would lose every digit of a landed update.


def factored_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F for B (d, r), A (r, k), through r × r triangular factors."""
    if B.shape[1] == 0:
        return 0.0
    R_b = torch.linalg.qr(B, mode="r").R
    R_a = torch.linalg.qr(A.T, mode="r").R
    return float(torch.linalg.matrix_norm(R_b @ R_a.T))


def compare_factored(Hb, Ha, Db, Da, tolerance: float) -> Comparison:
    """`compare` for ΔŴ = Hb·Ah and ΔW = Db·Ad (float64, same (d, k)), through r × r matrices only:
    ⟨ΔŴ, ΔW⟩ = Σ (Hbᵀ Db) ∘ (Ha Adᵀ), norms by `factored_norm`."""
    d, k = Db.shape[0], Da.shape[1]
    n = factored_norm(Db, Da)
    sizes: list[float] = []

    def h() -> float:
        if not sizes:
            sizes.append(factored_norm(Hb, Ha))
        return sizes[0]

    if n == 0:
        rho = 1.0 if h() <= tolerance else 0.0
    else:
        rho = float(((Hb.T @ Db) * (Ha @ Da.T)).sum()) / (n * n)
    error = factored_norm(torch.cat([Hb, -Db], dim=1), torch.cat([Ha, Da], dim=0))
    transposed = None
    if d == k:

        def transposed() -> float:
            return factored_norm(torch.cat([Hb, -Da.T], dim=1), torch.cat([Ha, Db.T], dim=0))

    return judge(n, rho, error, tolerance, d * k, h=h, transposed_error=transposed, is_zero=lambda: h() == 0)
