"""Comparing two checkpoints' stored codes: how much of a quantized fine-tune is its base, bit for bit.

`extract` from a quantized pair (an FP8 fine-tune against its FP8 base) reports, per module, the
share of codes the fine-tune left identical and whether the scales changed (docs/design.md §13,
"Extracting from quantized pairs"). Both sides must be stored in the same format and layout
(`layout_difference`): then a code means the same thing on both sides once the scales are the
same, and a module whose codes and scales are all identical is unchanged bit for bit.

Codes are compared as stored bytes, read through `Checkpoint.raw`: one XOR in place in the base's
codes buffer (no copy beyond the two codes tensors), counted in chunks. A code is one stored
element when the codes hold one element per weight (FP8, int8, int4 kept in int8); packed codes
(two 4-bit codes a byte: bitsandbytes NF4/FP4, MXFP4, compressed-tensors' pack-quantized in int32
words) are compared field by field, each `bits` wide, and the padding fields (equal on both sides)
are not counted. The "scales" are every other stored part that decodes the codes (scales, absmax,
zero points, quant_map …) but static activation scales, which decode nothing of W, and the numbers
a reader keeps from the data (bitsandbytes' nested_offset).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lorasurgery.io.quantization import DequantizedInfo

_CHUNK = 1 << 20  # codes bytes compared per step: the comparison's temporaries stay 1 MB
# Parts that decode nothing of the weight (static activation scales): not "scales" here.
_STATIC_ROLES = frozenset({"activation_scale", "input_scale"})
# … and parts whose size follows their numbers (bitsandbytes' quant_state JSON, which the reader's
# scheme holds): no part of the layout, though compared with the scales.
_NOT_LAYOUT = _STATIC_ROLES | {"quant_state"}


@dataclass(frozen=True)
class CodeComparison:
    identical: int  # codes equal on both sides
    total: int  # codes compared (the logical tensor's element count)
    scales_identical: bool  # every part that decodes the codes is byte for byte the same

    @property
    def share(self) -> float:
        return self.identical / self.total if self.total else 1.0

    @property
    def bit_for_bit(self) -> bool:
        return self.identical == self.total and self.scales_identical


def layout_difference(a: DequantizedInfo, b: DequantizedInfo) -> str | None:
    """None when `a` and `b` store their codes in the same format and layout (so their codes can be
    compared one by one); else what differs, for a note."""
    if a.format != b.format:
        return f"{a.format} against {b.format}"
    if (a.codes.dtype, tuple(a.codes.shape)) != (b.codes.dtype, tuple(b.codes.shape)):
        return f"codes {a.codes.dtype} {list(a.codes.shape)} against {b.codes.dtype} {list(b.codes.shape)}"
    if (a.block, a.scale_fmt, _layout(a.scheme)) != (b.block, b.scale_fmt, _layout(b.scheme)):
        return "different blocks or scheme"
    parts = {role: (p.dtype, tuple(p.shape)) for role, p in a.parts if role not in _NOT_LAYOUT}
    other = {role: (p.dtype, tuple(p.shape)) for role, p in b.parts if role not in _NOT_LAYOUT}
    if parts != other:
        return "scales of different kinds or shapes"
    return None


def compare_codes(a: DequantizedInfo, b: DequantizedInfo, read_a, read_b) -> CodeComparison:
    """How many codes of `a` and `b` (same layout: `layout_difference` is None) are identical, and
    whether their scales are; `read_a(stored info)` / `read_b` read a stored tensor as it is."""
    scales_identical = a.scheme == b.scheme and all(
        _same_bytes(read_a(pa), read_b(pb))
        for (role, pa), (_, pb) in zip(a.parts, b.parts)
        if role not in _STATIC_ROLES
    )
    x = _bytes(read_a(a.codes))
    x.bitwise_xor_(_bytes(read_b(b.codes)))  # 0 where the bytes agree, in the base's own buffer
    total = math.prod(a.shape)
    elements = math.prod(a.codes.shape)
    if elements == total:  # one stored element per code, `width` bytes each
        width = x.numel() // max(elements, 1)
        identical = elements - _count_nonzero(_as_width(x, width))
        return CodeComparison(identical, total, scales_identical)
    bits = 8 * x.numel() // max(total, 1)  # packed: 4-bit codes, two a byte
    if bits not in (1, 2, 4):
        raise ValueError(f"{a.name}: {x.numel()} bytes of codes for {total} weights is no packing known")
    fields = 8 // bits
    mask = (1 << bits) - 1
    differing = sum(_count_nonzero(x, shift=f * bits, mask=mask) for f in range(fields))
    # the padding fields (fields·bytes − total) are equal on both sides: never counted as differing
    return CodeComparison(total - differing, total, scales_identical)


def _layout(scheme):
    """A reader's scheme without its numbers: a float in it is decoded from the data (bitsandbytes'
    nested_offset, the mean of the absmax), a scale rather than a layout — compared with the scales."""
    if not dataclasses.is_dataclass(scheme):
        return scheme
    numbers = {f.name: None for f in dataclasses.fields(scheme) if isinstance(getattr(scheme, f.name), float)}
    return dataclasses.replace(scheme, **numbers)


def _bytes(tensor):
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _same_bytes(x, y) -> bool:
    import torch

    return x.shape == y.shape and torch.equal(_bytes(x), _bytes(y))


def _as_width(x, width: int):
    import torch

    dtypes = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(dtypes[width])


def _count_nonzero(x, shift: int = 0, mask: int | None = None) -> int:
    """Nonzero elements of x (or of its bit field `(x >> shift) & mask`), a chunk at a time."""
    count = 0
    step = max(1, _CHUNK // x.element_size())
    for start in range(0, x.numel(), step):
        chunk = x[start : start + step]
        if mask is not None:
            chunk = (chunk >> shift) & mask
        count += int(chunk.count_nonzero())
    return count
