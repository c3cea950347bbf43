"""All singular values of a dense matrix on the CPU by the float64 Gram route, with numpy's BLAS.

σᵢ = sqrt(λᵢ(G)) for G = X Xᵀ of the smaller side, accumulated in float64 (see linalg.svd for the
error model: absolute error ≈ sqrt(min(d, n)·eps64)·σ₁, far below every numerical-rank threshold
of a float32/bf16/fp16 source). This is the CPU implementation behind `svd.singular_values`, and
rank-report of W runs on it without importing torch at all. Why numpy: its OpenBLAS computes
X Xᵀ as a symmetric rank-k update (half the flops): 576 × 1536 in 10.7 ms against 17.2 ms for
torch's float64 matmul on this project's machines, and `import torch` alone takes 1.5–2 s.
"""

from __future__ import annotations

import numpy as np

# Columns converted to float64 at once: bounds the extra memory to 32 MB whatever the matrix size.
GRAM_BLOCK_ELEMENTS = 1 << 22
# Machine epsilon of each safetensors dtype numpy can decode (bf16 via its top 16 bits).
DTYPE_EPS = {
    "F64": float(np.finfo(np.float64).eps),
    "F32": float(np.finfo(np.float32).eps),
    "F16": float(np.finfo(np.float16).eps),
    "BF16": 2.0**-7,
}


def dtype_eps(dtype) -> float:
    """eps of a safetensors dtype code ("F32", "BF16", …) or a torch dtype."""
    if isinstance(dtype, str):
        return DTYPE_EPS[dtype]
    import torch

    return float(torch.finfo(dtype).eps)


def numerical_rank_tolerance(shape: tuple[int, int], source_dtype) -> float:
    """numerical_rank's threshold in units of σ₁ (docs/design.md §5): max(d, n)·eps of the source dtype."""
    return max(shape) * dtype_eps(source_dtype)


def gram_singular_values(X: np.ndarray) -> np.ndarray:
    """All min(d, n) singular values of the 2-D array X (any float dtype), float64, descending."""
    if X.ndim != 2:
        raise ValueError(f"gram_singular_values expects a 2-D matrix, got shape {X.shape}")
    if min(X.shape) == 0:
        return np.zeros(0)
    wide = X if X.shape[0] <= X.shape[1] else X.T  # (small, long): G = wide · wideᵀ
    small, long = wide.shape
    block = max(1, GRAM_BLOCK_ELEMENTS // small)
    G = np.zeros((small, small))  # (small, small) float64
    for start in range(0, long, block):
        chunk = wide[:, start : start + block].astype(np.float64)  # (small, block), own memory
        G += chunk @ chunk.T  # numpy runs a · aᵀ as a symmetric rank-k update
    eigenvalues = np.linalg.eigvalsh(G)  # ascending; tiny negatives are rounding
    return np.sqrt(np.clip(eigenvalues, 0, None))[::-1].copy()


def read_matrix(checkpoint, name: str) -> np.ndarray | None:
    """Tensor `name` of a safetensors checkpoint as float32 (float64 for F64), without torch; None
    for what numpy cannot decode (fp8, integers, pickled .bin tensors)."""
    from lorasurgery.io.checkpoint import read_range

    info = checkpoint.tensors[name]
    if info.start < 0 or info.dtype not in DTYPE_EPS:
        return None
    raw = np.empty(info.nbytes, dtype=np.uint8)
    read_range(info.file, info.start, raw)
    if info.dtype == "BF16":  # bfloat16 is the top half of a float32
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[info.dtype])
        if info.dtype == "F16":
            values = values.astype(np.float32)
    return values.reshape(info.shape)
