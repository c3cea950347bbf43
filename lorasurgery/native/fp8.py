"""torch tensors in and out of fp8.c's kernels (float8 e4m3fn; what they compute: fp8.c's header).

Each call returns None (or False) where the kernels cannot take the tensors — no compiled library,
another dtype or device, a non-contiguous view — and the caller runs its torch code instead, which
computes the same bytes. Shapes: a band is (rows, cols) row-major; `scales` is the float32 grid of
(⌈rows/br⌉, ⌈cols/bc⌉) blocks of that band (for decode: of the whole matrix, `row0` the band's first
row); one scale for the tensor is a 1×1 grid with blocks as large as the matrix.
"""

from __future__ import annotations

import ctypes

from lorasurgery.native.build import library

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "ls_fp8_decode": (None, [_P, _P, _I64, _I64, _I64, _I64, _I64, _P]),
    "ls_block_amax": (ctypes.c_int, [_P, _I64, _I64, _I64, _I64, _P]),
    "ls_fp8_requantize": (_I64, [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _F32, _P, _P, _P]),
    "ls_retention_sums": (None, [_P, _P, _P, _I64, _I64, _P]),
}


def _lib():
    return library("fp8", _SIGNATURES, agrees_with_torch)


def _ptr(tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def _takes(*tensors) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _e4m3(codes) -> bool:
    import torch

    return codes.dtype == torch.float8_e4m3fn


def decode(codes, scales, row0: int, block: tuple[int, int], out) -> bool:
    """out = codes × their blocks' scales (float32), as io/fp8.py's decoder; False if not done."""
    import torch

    lib = _lib()
    if lib is None or not _e4m3(codes) or out.dtype != torch.float32 or scales.dtype != torch.float32:
        return False
    if codes.dim() != 2 or not _takes(codes, scales, out) or out.shape != codes.shape:
        return False
    rows, cols = codes.shape
    lib.ls_fp8_decode(_ptr(codes), _ptr(scales), rows, cols, row0, block[0], block[1], _ptr(out))
    return True


def block_amax(x, block: tuple[int, int]):
    """(⌈rows/br⌉, ⌈cols/bc⌉) float32 max |x| per block of the float32 band x; None if not done or
    x holds a NaN (torch's amax propagates it: the caller's torch code decides what that means)."""
    import torch

    lib = _lib()
    if lib is None or x.dtype != torch.float32 or x.dim() != 2 or not _takes(x):
        return None
    rows, cols = x.shape
    amax = torch.empty((-(-rows // block[0]), -(-cols // block[1])), dtype=torch.float32)
    if lib.ls_block_amax(_ptr(x), rows, cols, block[0], block[1], _ptr(amax)):
        return None
    return amax


def requantize(merged, base, old, scales, block: tuple[int, int], top: float, codes, scratch):
    """codes = e4m3(clamp(merged / scale, ±top)) in place, and (kept, update, changed): the
    retention sums of deq(codes) against `base` and the count of codes unlike `old`; None if not
    done. `scratch`: float32, at least one row."""
    import torch

    lib = _lib()
    tensors = (merged, base, old, scales, codes, scratch)
    if lib is None or not _e4m3(codes) or not _takes(*tensors) or merged.dim() != 2 or not 0 < top <= 448:
        return None
    if {merged.dtype, base.dtype, scales.dtype, scratch.dtype} != {torch.float32}:
        return None
    if not (merged.shape == base.shape == old.shape == codes.shape) or old.element_size() != 1:
        return None
    rows, cols = merged.shape
    if scratch.numel() < cols:
        return None
    sums = (ctypes.c_double * 2)(0.0, 0.0)
    changed = lib.ls_fp8_requantize(
        _ptr(merged), _ptr(base), _ptr(old), _ptr(scales), rows, cols, block[0], block[1],
        top, _ptr(codes), _ptr(scratch), ctypes.cast(sums, ctypes.c_void_p),
    )  # fmt: skip
    return sums[0], sums[1], int(changed)


def retention_sums(base, merged, after):
    """(⟨after − base, merged − base⟩, ‖merged − base‖²) of float32 (rows, cols) tensors, summed
    in the order ls_fp8_requantize sums them; None if not done."""
    import torch

    lib = _lib()
    if lib is None or not _takes(base, merged, after) or base.dim() != 2:
        return None
    if {base.dtype, merged.dtype, after.dtype} != {torch.float32}:
        return None
    if not base.shape == merged.shape == after.shape:
        return None
    sums = (ctypes.c_double * 2)(0.0, 0.0)
    lib.ls_retention_sums(
        _ptr(base), _ptr(merged), _ptr(after), *base.shape, ctypes.cast(sums, ctypes.c_void_p)
    )
    return sums[0], sums[1]


def agrees_with_torch(lib) -> bool:
    """fp8.c's decode of all 256 codes and encode of values at and around every rounding edge
    (each code, each midpoint between neighbours, one float32 step either side, the saturation
    edge, zeros, NaN) equal torch's float8 conversions, bit for bit."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(1, 256)
    decoded = torch.empty(1, 256)
    one = torch.ones(1, 1)
    lib.ls_fp8_decode(_ptr(codes), _ptr(one), 1, 256, 0, 1, 256, _ptr(decoded))
    expected = codes.to(torch.float32)
    if not torch.equal(decoded.isnan(), expected.isnan()) or not torch.equal(
        decoded.nan_to_num(0).view(torch.int32), expected.nan_to_num(0).view(torch.int32)
    ):
        return False
    values = expected[~expected.isnan()].unique()  # sorted, -448 … 448
    middles = (values[1:] + values[:-1]) / 2
    edges = torch.cat([values, middles, torch.tensor([460.0, 464.0, 470.0, 479.0, 480.0, 1e30, 0.0, -0.0])])
    edges = torch.cat(
        [edges, edges.nextafter(torch.tensor(float("inf"))), edges.nextafter(torch.tensor(-1e38))]
    )
    x = edges.reshape(1, -1).contiguous()
    top = 448.0
    got = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scratch = torch.empty(x.shape[1])
    sums = (ctypes.c_double * 2)(0.0, 0.0)
    lib.ls_fp8_requantize(
        _ptr(x), _ptr(x), _ptr(got.view(torch.uint8)), _ptr(one), 1, x.shape[1], 1, x.shape[1],
        top, _ptr(got), _ptr(scratch), ctypes.cast(sums, ctypes.c_void_p),
    )  # fmt: skip
    want = x.clamp(-top, top).to(torch.float8_e4m3fn)
    return torch.equal(got.view(torch.uint8), want.view(torch.uint8))
