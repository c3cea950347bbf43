"""One merged tensor written back in its base's quantized format, and how much of its update survived.

`merge --requantize` and `inspect --base` (the would-be retention) both call `requantize`: W′ =
quantize(deq(W) + ΔW) by the format's reader (io.readers.quantize), then decoded again by the same
reader, and (docs/design.md §13)

    retention ρ = ⟨deq(W′) − deq(W), ΔW⟩ / ‖ΔW‖²_F

(summed as `_sums` says, within 1e-7 of float64 arithmetic): 1 when all of the update survived the rounding, 0 when none did (an update smaller than
one code step everywhere), in between when part did; with the share of the stored codes that
changed. ΔW is what the float32 merge adds: merged − deq(W), as merge computes it. The sums run over
chunks of rows, so the temporaries stay small; the tensors stay on the device they came on.

`requantize_blocks` is the same computation fused with the merge (docs/design.md §13, "Decoding in
bands"): the merge kernel's blocks of W and W′ (linalg.delta.merged_blocks) gathered into spans of
whole scale blocks, each span quantized, decoded again and summed while it is in cache, by the
format's band quantizer (io.readers.band_quantizer) — in one native pass where it offers
`measured` (FP8: native/fp8.c, docs/design.md §13 "Native kernels"). Neither W, W′ nor deq(W′) is
ever whole in float32, and the bytes are those of `requantize` (the same arithmetic per element).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lorasurgery.io import readers
from lorasurgery.io.quantization import BandQuantizer, DequantizedInfo
from lorasurgery.native import fp8 as native_fp8

_CHUNK = 1 << 18  # elements per step of the sums: 1 MB float32 temporaries stay in cache


@dataclass(frozen=True)
class Requantized:
    """The stored tensors of W′ and the sums that give its retention (summable over pieces)."""

    tensors: dict  # stored name -> tensor, as the format stores it (static activation scales excluded)
    kept: float  # ⟨deq(W′) − deq(W), ΔW⟩
    update: float  # ‖ΔW‖²_F
    codes_changed: int  # elements of the stored codes that differ from the base's
    codes: int  # elements of the stored codes

    @property
    def retention(self) -> float | None:
        return retention(self.kept, self.update)


def retention(kept: float, update: float) -> float | None:
    """ρ from its two sums; None when ΔW = 0 (nothing to keep or lose)."""
    return kept / update if update > 0 else None


def requantize(info: DequantizedInfo, base, merged, read: Callable) -> Requantized:
    """`merged` (float32, the logical tensor `info` after the merge) quantized in `info`'s format,
    with the sums of its retention against `base` (deq(W), float32, same device). `read(stored
    TensorInfo)` reads the base's stored tensors (codes, scales) on that device."""
    stored = readers.quantize(info, merged, read)
    after = readers.dequantize(info, lambda part: stored[part.name] if part.name in stored else read(part))
    kept, update = _sums(base, merged, after)
    del after
    new_codes, old_codes = stored[info.codes.name], read(info.codes)
    changed = _changed(new_codes, old_codes)
    return Requantized(stored, kept, update, changed, new_codes.numel())


def requantize_blocks(
    info: DequantizedInfo, blocks: Iterable, quantizer: BandQuantizer, old_codes, buffers: dict | None = None
) -> Requantized:
    """`requantize` of the tensor whose merge yields `blocks` ((start, stop, W block, W′ block) in
    row order, float32, buffers reused after each: linalg.delta.merged_blocks with keep_base),
    encoded by `quantizer` (readers.band_quantizer of `info`); `old_codes` the base's stored codes.

    The merge's blocks keep their own row counts (the BLAS result depends on them), so a block that
    does not end on a scale block's edge is staged: its rows wait, copied, until a span of whole
    scale blocks is complete.

    `buffers` (a dict the caller keeps, e.g. one per merging thread) holds the staging and scratch
    buffers from one span and one tensor to the next: a fresh allocation per span costs its page
    faults again, which the merge's threads pay in full (docs/merge.md)."""

    rows, multiple = info.shape[0], quantizer.multiple
    totals = [0.0, 0.0, 0]  # kept, update, codes changed
    buffers = {} if buffers is None else buffers  # "W", "M": staging; "after": deq(W′) of one span; scratch
    staged: dict = {}  # "W", "M": this tensor's staging views
    pending = [0, 0]  # first staged row, staged rows

    def span(start: int, stop: int, W, M) -> None:
        if quantizer.measured is not None:  # one native pass, the same bytes and sums
            row = _buffer(buffers, "row", M, 1, keep=False)
            done = quantizer.measured(start, stop, W, M, old_codes[start:stop], row)
            if done is not None:
                for i, value in enumerate(done):
                    totals[i] += value
                return
        after = _buffer(buffers, "after", M, stop - start, keep=False)
        quantizer.band(start, stop, M, after)
        kept, update = _sums(W, M, after, buffers)
        totals[0] += kept
        totals[1] += update
        new = quantizer.stored[quantizer.codes][start:stop]
        totals[2] += _changed(new, old_codes[start:stop].to(new.device), buffers)

    for start, stop, W, M in blocks:
        first, count = pending
        if not count and start % multiple == 0 and ((stop - start) % multiple == 0 or stop == rows):
            span(start, stop, W, M)  # a span of whole scale blocks already: no staging
            pending[0] = stop
            continue
        n = stop - start
        for key, block in (("W", W), ("M", M)):
            # fewer than `multiple` rows wait between spans: this size never grows
            staged[key] = _buffer(buffers, key, block, n + 2 * multiple)
            staged[key][count : count + n].copy_(block)
        count += n
        ready = count if first + count == rows else count // multiple * multiple
        if ready:
            span(first, first + ready, staged["W"][:ready], staged["M"][:ready])
            for key in ("W", "M"):  # the rest (fewer rows than `ready`: no overlap) to the front
                staged[key][: count - ready].copy_(staged[key][ready:count])
        pending[:] = [first + ready, count - ready]
    return Requantized(dict(quantizer.stored), totals[0], totals[1], totals[2], old_codes.numel())


def _buffer(buffers: dict, key: str, like, rows: int, keep: bool = True, dtype=None):
    """A (rows, *like.shape[1:]) view of a reusable buffer of `like`'s device and dtype (or `dtype`),
    grown when too small (what it held kept, if `keep`: the same columns, so the same rows). The
    buffer is flat, so that one tensor's buffer serves the next whatever its columns."""
    import torch

    shape = (rows, *like.shape[1:])
    size = math.prod(shape)
    dtype = like.dtype if dtype is None else dtype
    slot = (key, dtype, like.device)
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < size:
        grown = torch.empty(size, dtype=dtype, device=like.device)
        if buffer is not None and keep:
            grown[: buffer.numel()].copy_(buffer)
        buffer = buffers[slot] = grown
    return buffer[:size].view(shape)


def _sums(base, merged, after, buffers: dict | None = None) -> tuple[float, float]:
    """(⟨deq(W′) − deq(W), ΔW⟩, ‖ΔW‖²) over rows of the last dimension, in chunks of rows.

    Each difference of two float32 tensors is rounded once to float32, so it is within 2⁻²⁴ of its
    own value (however small ΔW is against W); the products are summed per row — in float64 in 16
    lanes by the native kernel where it is built (native/fp8.c, the order requantize_blocks' native
    pass sums in), else in float32 by torch's cascade sum — and the rows in float64. A row's sum
    does not depend on the chunk it is in, so the whole tensor (inspect) and the merge's spans
    (requantize_blocks) give the same ρ to float64 rounding; against a float64 recomputation it is
    within 1e-7 (docs/design.md §13). `buffers`: as for requantize_blocks."""
    import torch

    if base.numel() == 0:
        return 0.0, 0.0
    cols = base.shape[-1] if base.dim() else 1
    b, m, a = (t.reshape(-1, cols) for t in (base, merged, after))
    native = native_fp8.retention_sums(b, m, a)  # the order requantize_blocks' native pass sums in
    if native is not None:
        return native
    rows, step = b.shape[0], max(1, _CHUNK // cols)
    # two buffers for the whole loop: a fresh 1 MB temporary per step costs its page faults again
    buffers = {} if buffers is None else buffers
    delta_buffer, kept_buffer = (
        _buffer(buffers, key, b, min(step, rows), dtype=torch.float32) for key in ("delta", "kept")
    )
    # each row's two float32 sums, added up in float64 once at the end
    kept_rows, update_rows = (
        _buffer(buffers, key, b[:, 0], rows, dtype=torch.float32) for key in ("kept rows", "update rows")
    )
    for start in range(0, rows, step):
        w = b[start : start + step]
        n = w.shape[0]
        delta = torch.sub(m[start : start + step], w, out=delta_buffer[:n])
        products = torch.sub(a[start : start + step], w, out=kept_buffer[:n]).mul_(delta)
        torch.sum(products, dim=1, out=kept_rows[start : start + n])
        torch.sum(delta.mul_(delta), dim=1, out=update_rows[start : start + n])
    return float(kept_rows.double().sum()), float(update_rows.double().sum())


def _changed(new, old, buffers: dict | None = None) -> int:
    import torch

    if new.element_size() == 1:  # compare bit patterns: float8 has no == on every device
        new, old = new.view(torch.uint8), old.view(torch.uint8)
    if buffers is None:
        return int(torch.count_nonzero(torch.ne(new, old)))
    differ = _buffer(buffers, "differ", new, new.shape[0], dtype=torch.bool)
    return int(torch.count_nonzero(torch.ne(new, old, out=differ)))
