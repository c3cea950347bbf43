"""transformers' fine-grained FP8, read dequantized (docs/design.md §13).

The layout (DeepSeek-V3/R1, Qwen3-*-FP8, every model saved by transformers' FP8 quantizer;
config.json `quantization_config: {"quant_method": "fp8", "weight_block_size": [bn, bk], …}`):

  <x>              float8 codes (e4m3; e5m2 where `fmt` says so), shape (…, out, in)
  <x>_scale_inv    the multiplier of each block despite its name: shape (…, ⌈out/bn⌉, ⌈in/bk⌉), the
                   edge blocks partial; one element (0-d, or a 1×1 grid under `weight_block_size:
                   null`) is one scale for the tensor. float32, bfloat16 or float16; under
                   `scale_fmt: "ue8m0"` powers of two, possibly stored as float8_e8m0fnu (or its
                   bytes as uint8).
  <m>.activation_scale / .input_scale   static activation scales: nothing of W, hidden.

W = float32(codes) · float32(scale), one rounding per element: bit for bit what transformers'
`_dequantize_fp8_weight(…, torch.float32)` and compressed-tensors' block dequantizer compute.

`logical_index` runs when the checkpoint is opened, on headers only: it checks the layout (a scale
for every codes tensor, its shape against the blocks, the codes' dtype against the config, no
scale without codes) and returns the index commands see — each quantized tensor as a
DequantizedInfo (F32, no byte range of its own), its scales hidden, plain tensors as stored.
`dequantize` runs when a tensor is read: it checks that tensor's scales (small: one read each)
and decodes it vectorised — the scales expanded over rows only, the columns broadcast through a
view of the codes — on whatever device the codes were read to.

`quantize` is the inverse (`merge --requantize`): scale = amax/max_code per block (448 for e4m3),
partial edge blocks over what they hold, one for the tensor when there is one scale; a block of
zeros gets 1 (transformers' choice: any positive scale decodes zeros, and 1 is exact in every scale
dtype); under ue8m0 the power of two at or above it; rounded to the stored scale dtype; codes =
W / scale (the scale as stored) saturated to ±max_code and rounded to nearest-even by torch's float8
cast — compressed-tensors' and DeepSeek's arithmetic (transformers' Fp8Quantize multiplies by
448/amax instead, one float32 rounding apart). `exclude` lists modules in modules_to_not_convert.

Without a config the block size comes from the shapes: every grid must give the same [bn, bk]
(⌈out/bn⌉ scale rows, ⌈in/bk⌉ columns). Where more than one size fits a grid of two or more blocks
(576 rows in 5 blocks: any of 116–143), the rows each scale covers are not known and the
checkpoint is refused, asking for the config's weight_block_size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.io.quantization import (
    BandQuantizer,
    DequantizedInfo,
    Quantization,
    Rows,
    check_scales,
    foreign_tensor,
    mean_square,
    model_dtype,
    orphan_part,
    unscaled_codes,
)
from lorasurgery.io.safetensors_format import TensorInfo, dtype_name_of, torch_dtype_of
from lorasurgery.native import fp8 as native_fp8

DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config when weight_block_size is absent
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0")  # and U8 (E8M0 bytes) under scale_fmt "ue8m0"
CODE_DTYPES = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}  # quantization_config `fmt`
_NOT_DECLARED = object()
_CHUNK = 1 << 18  # codes converted per step on the CPU: 0.5 MB int16 buffers


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them, in file order; CheckpointError (or
    UnsupportedError) naming the file and tensor when the FP8 layout is broken."""
    declared = quantization.source is not None
    block, scale_fmt, fmt = (
        _declared_settings(quantization, folder) if declared else (_NOT_DECLARED, None, None)
    )
    pairs = _code_scale_pairs(tensors, quantization, fmt, scale_fmt)
    _check_orphans(tensors, quantization.stored_names)
    block = _checked_block(pairs, block, folder)
    if not pairs:
        return tensors  # declared, but nothing stored quantized: the tensors are what they are
    plain_dtype = model_dtype(config)
    logical = {}
    for t, codes, scale in pairs:
        logical[codes.name] = DequantizedInfo.of(
            t.logical,
            tuple(codes.shape),
            codes,
            format="fp8",
            parts=tuple((role, tensors[stored]) for role, stored in t.parts),
            block=None if _one_scale(codes, scale, block) else block,
            scale_fmt=scale_fmt,
            model_dtype=plain_dtype,
        )
    hidden = quantization.stored_names - set(logical)
    return {name: logical.get(name, info) for name, info in tensors.items() if name not in hidden}


def _declared_settings(quantization: Quantization, folder: Path):
    """(weight_block_size, scale_fmt, fmt) from config.json's quantization_config, each checked."""
    settings = quantization.config or {}
    where = f"{folder / 'config.json'}: quantization_config"
    block = _declared_block(settings, where)
    scale_fmt = settings.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise CheckpointError(f'{where}: scale_fmt {scale_fmt!r} is neither "float" nor "ue8m0"')
    fmt = settings.get("fmt")
    if fmt is not None and fmt not in CODE_DTYPES:
        raise CheckpointError(f'{where}: fmt {fmt!r} is neither "e4m3" nor "e5m2"')
    if settings.get("expert_dtype", "fp8") != "fp8":
        raise UnsupportedError(
            f"{where}: expert_dtype {settings.get('expert_dtype')!r} (experts packed as FP4): lorasurgery "
            f"reads FP8 codes only and does not read FP4-packed experts yet (docs/design.md §13)"
        )
    return block, scale_fmt, fmt


def _code_scale_pairs(tensors: Mapping[str, TensorInfo], quantization: Quantization, fmt, scale_fmt) -> list:
    """[(QuantizedTensor, codes, scale)] for every quantized tensor, each an FP8 one whose codes'
    dtype is the config's and whose scales' dtype FP8 allows."""
    declaration = quantization.declaration() or "float8 codes with weight_scale_inv beside them"
    pairs = []
    for t in quantization.tensors:
        codes = tensors[t.codes]
        if t.format != "fp8":
            raise _foreign(t, tensors, declaration)
        if fmt is not None and codes.dtype != CODE_DTYPES[fmt]:
            raise CheckpointError(
                f"{codes.file}: tensor {codes.name} holds {dtype_name_of(codes.dtype)} codes, but "
                f'quantization_config fmt "{fmt}" declares {dtype_name_of(CODE_DTYPES[fmt])}'
            )
        scale = tensors[t.part("scale_inv")]
        if scale.dtype not in SCALE_DTYPES and not (scale.dtype == "U8" and scale_fmt == "ue8m0"):
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name}: scales of dtype {dtype_name_of(scale.dtype)}; FP8 "
                f"scales are float32, bfloat16, float16 or float8_e8m0fnu (uint8 only under "
                f'scale_fmt "ue8m0")'
            )
        pairs.append((t, codes, scale))
    return pairs


def _checked_block(pairs: list, block, folder: Path):
    """The block size every grid of scales is in (declared, or deduced from the grids' shapes),
    each grid's shape checked against it."""
    grids = [(codes, scale) for _, codes, scale in pairs if not _one_scale(codes, scale, block)]
    for codes, scale in grids:
        _check_grid(codes, scale)
    if block is _NOT_DECLARED:
        block = _deduced_block(grids, folder) if grids else DEFAULT_BLOCK  # no grid: nothing uses it
    for codes, scale in grids:
        if block is None:
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name}: shape {list(scale.shape)}, a grid of scales, but "
                f"quantization_config weight_block_size is null (one scale per tensor)"
            )
        expected = _grid_shape(codes.shape, block)
        if tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name}: shape {list(scale.shape)} does not match the blocks "
                f"of {codes.name} {list(codes.shape)}: in blocks of {list(block)} (quantization_config "
                f"weight_block_size) it needs {list(expected)}"
            )
    return block


def dequantize(info: DequantizedInfo, read):
    """The float32 tensor `info` from its codes and scale_inv (`read(stored info)` reads one, on the
    device the caller chose); CheckpointError naming the scale tensor when a scale is not a positive
    finite number (or not a power of two under scale_fmt "ue8m0")."""
    import torch

    s = _scales(info, read(info.part("scale_inv")))
    codes = read(info.codes)
    if codes.dim() < 2:
        return _times_scales(_float32_codes(codes), s, info)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    grids = [s] * math.prod(codes.shape[:-2]) if info.block is None else s.reshape(-1, *s.shape[-2:])
    for matrix, target, grid in zip(_matrices(codes), _matrices(out), grids):
        fill = _band_decoder(info, matrix, grid)
        for a, b in _spans(*matrix.shape, 1):
            fill(a, b, target[a:b])
    return out


def rows(info: DequantizedInfo, read) -> Rows | None:
    """The 2-D tensor `info` decoded a band of rows at a time (io.quantization.Rows: the merge
    kernel's input, docs/design.md §13 "Decoding in bands"); its scales checked now, as dequantize
    checks them. None for other ranks (experts): the caller decodes them whole."""
    if len(info.shape) != 2:
        return None
    s = _scales(info, read(info.part("scale_inv")))
    codes = read(info.codes)
    return Rows(tuple(info.shape), _band_decoder(info, codes, s), lambda: dequantize(info, read))


def _band_decoder(info: DequantizedInfo, codes, s):
    """fill(start, stop, out): rows start:stop of the matrix `codes` times their scales (`s`: the
    matrix's grid, or its one scale), float32, into `out` on any device; bit for bit `dequantize`."""
    scratch = {}
    # the native decoder takes the grid whole (one scale: a 1×1 grid whose block is the matrix)
    grid, block = (s.reshape(1, 1), tuple(codes.shape)) if info.block is None else (s, info.block)
    grid = grid.contiguous()

    def scales(start: int, stop: int, device):
        if info.block is None:
            return s.reshape(()).to(device)
        block_rows = info.block[0]
        grid = s[start // block_rows : -(-stop // block_rows)]
        return grid.repeat_interleave(block_rows, dim=0)[start % block_rows :][: stop - start].to(device)

    def fill(start: int, stop: int, out):
        band = codes[start:stop]
        if native_fp8.decode(band, grid, start, block, out):
            return out
        factor = _codes_into(band, out, scratch)
        _scale_band(out, scales(start, stop, out.device), info.block, factor)
        return out

    return fill


def _codes_into(codes, out, scratch: dict) -> float:
    """out = float32(codes) / f, exactly, returning f (a power of two, folded into the scales: the
    product code·scale is the same real number, so it rounds to the same float32).

    On the CPU torch converts float8 one element at a time (3× slower than this): the bits of a
    float16 are built instead, in one int16 buffer. An e5m2 code is the top byte of a float16 (f = 1).
    An e4m3 code's 7 bits below its sign are a float16's exponent and mantissa shifted right by 7,
    with the exponent bias 8 smaller (7, not 15): as a float16 it is the code's value / 2⁸, exact for
    every code, subnormals included (f = 2⁸). The code read as int8 and sign-extended, times 2⁷,
    has those bits, the sign in bit 15 — and in bit 14, which is cleared. A band holding e4m3fn's
    NaN code (0x7F, which this would read as 480) is converted by torch instead."""
    import torch

    e4m3 = codes.dtype == torch.float8_e4m3fn
    if (
        codes.device.type != "cpu"
        or out.device.type != "cpu"
        or not (e4m3 or codes.dtype == torch.float8_e5m2)
    ):
        out.copy_(codes.to(out.device))
        return 1.0
    # the NaN codes: 0x7F, the only byte that is 127 as int8, and 0xFF, the only one 255 as uint8
    if codes.numel() == 0 or (
        e4m3 and (int(codes.view(torch.int8).amax()) == 127 or int(codes.view(torch.uint8).amax()) == 255)
    ):
        out.copy_(codes)
        return 1.0
    buffer = scratch.get("int16")
    if buffer is None or buffer.numel() < codes.numel():
        buffer = scratch["int16"] = torch.empty(codes.numel(), dtype=torch.int16)
    bits = buffer[: codes.numel()].view(codes.shape)
    bits.copy_(codes.view(torch.int8))
    if e4m3:
        bits.mul_(128).bitwise_and_(-0x4001)  # 0xBFFF: bit 14 cleared
    else:
        bits.mul_(256)
    out.copy_(bits.view(torch.float16))
    return 256.0 if e4m3 else 1.0


def _scale_band(out, s, block, factor: float = 1.0):
    """out (rows, cols) times its scales in place: `s` one scale (0-d) or the per-row scales of its
    column blocks (rows, ⌈cols/bk⌉), each times `factor`; the columns of a block broadcast."""
    if factor != 1.0:
        s = s * factor
    if block is None:
        return out.mul_(s)
    cols, block_cols = out.shape[-1], block[1]
    full, rest = divmod(cols, block_cols)
    out[:, : full * block_cols].unflatten(-1, (full, block_cols)).mul_(s[:, :full, None])
    if rest:
        out[:, full * block_cols :].mul_(s[:, full:])
    return out


# e4m3fn / e5m2: mantissa bits and the smallest normal exponent (below it the spacing is constant)
_SPACING = {"F8_E4M3": (3, -6), "F8_E5M2": (2, -14)}


def noise_variance(info: DequantizedInfo, read) -> float:
    """The mean, over the tensor, of the variance of the rounding its codes stand for: uniform
    rounding, step²/12 per element, the step derived per element — the float8 spacing at the code's
    own value (2^(e − mantissa bits), e its exponent, the subnormal spacing below the smallest
    normal) times its block's scale (docs/design.md §13, "Extracting from quantized pairs"). A value at a power of
    two has the finer spacing below it; the spacing above is taken, an overestimate by at most 4/3
    in variance for those codes."""
    import torch

    mantissa, min_exponent = _SPACING.get(info.codes.dtype, _SPACING["F8_E4M3"])
    s = _scales(info, read(info.part("scale_inv")))
    step = _float32_codes(read(info.codes))
    # 2^e of each |code| (its exponent bits alone, the mantissa cleared), in place, then × 2^-mantissa
    step.abs_().clamp_min_(2.0**min_exponent)
    step.view(torch.int32).bitwise_and_(0x7F800000)
    step.mul_(2.0**-mantissa)
    return mean_square(_times_scales(step, s, info)) / 12


def _times_scales(W, s, info: DequantizedInfo):
    """W (float32 codes, or anything of their shape) times each block's scale, in place."""
    if info.block is None:
        return W.mul_(s.reshape(()))
    rows, cols = W.shape[-2:]
    block_rows, block_cols = info.block
    # Scales expanded over the rows only ((…, rows, ⌈in/bk⌉): small); the columns of each block are
    # broadcast through a view of W, so no second tensor of W's size exists.
    s = s.repeat_interleave(block_rows, dim=-2)[..., :rows, :]
    full, rest = divmod(cols, block_cols)
    W[..., : full * block_cols].unflatten(-1, (full, block_cols)).mul_(s[..., :full, None])
    if rest:
        W[..., full * block_cols :].mul_(s[..., full:])
    return W


def quantize(info: DequantizedInfo, W, read) -> dict:
    """{codes name: float8 codes, scale_inv name: scales} of the float32 tensor `W` (on any device),
    as the stored ones: same names, dtypes and shapes (docs/design.md §13). Vectorised over rows in
    chunks of whole row blocks, so that no float32 temporary of W's size is made."""
    import torch

    stored = info.part("scale_inv")
    codes_dtype = torch_dtype_of(info.codes.dtype)
    top = torch.finfo(codes_dtype).max
    shape = tuple(W.shape)
    if info.block is None:
        flat = W.reshape(1, 1, -1)
        amax = torch.stack([_amax(flat[..., a:b]) for a, b in _spans(flat.shape[-1], 1, 1)]).amax()
    else:
        amax = torch.cat([_block_amax(m, info.block) for m in _matrices(W)]).reshape(
            _grid_shape(shape, info.block)
        )
    scale, scale_f32 = _stored_scale(amax.to(torch.float32) / top, amax > 0, stored, info.scale_fmt)
    codes = torch.empty(shape, dtype=codes_dtype, device=W.device)
    if info.block is None:
        out, src = codes.reshape(-1), W.reshape(-1)
        for a, b in _spans(src.numel(), 1, 1):
            out[a:b] = src[a:b].div(scale_f32.reshape(())).clamp_(-top, top).to(codes_dtype)
        return {info.codes.name: codes, stored.name: scale.reshape(stored.shape)}
    block_rows, block_cols = info.block
    grids = scale_f32.reshape(-1, *scale_f32.shape[-2:])
    for matrix, out, grid in zip(_matrices(W), _matrices(codes), grids):
        rows, cols = matrix.shape
        full, rest = divmod(cols, block_cols)
        for a, b in _spans(rows, cols, block_rows):
            s = grid[a // block_rows : -(-b // block_rows)].repeat_interleave(block_rows, dim=0)[: b - a]
            x = matrix[a:b].to(torch.float32, copy=True)
            x[:, : full * block_cols].unflatten(-1, (full, block_cols)).div_(s[:, :full, None])
            if rest:
                x[:, full * block_cols :].div_(s[:, full:])
            out[a:b] = x.clamp_(-top, top).to(codes_dtype)
    return {info.codes.name: codes, stored.name: scale}


def band_quantizer(info: DequantizedInfo, read) -> BandQuantizer | None:
    """`quantize` band by band (io.quantization.BandQuantizer, docs/design.md §13): each band of
    whole row blocks encoded from the merged float32 band, and decoded again into `after`, so that
    neither W′ nor deq(W′) is ever whole in float32. The same arithmetic per element as `quantize`
    and `dequantize`, so the same bytes. None for one scale per tensor (its amax needs every row
    before the first code) and for experts: the caller quantizes them whole."""
    import torch

    if len(info.shape) != 2 or info.block is None:
        return None
    part = info.part("scale_inv")
    codes_dtype = torch_dtype_of(info.codes.dtype)
    top = torch.finfo(codes_dtype).max
    block_rows, block_cols = info.block
    result = BandQuantizer(block_rows, None, {}, info.codes.name)
    scratch = {}

    def scales(start: int, stop: int, merged, amax):
        """The band's scales from its block amax, stored; (its codes' view, the float32 scales)."""
        scale, scale_f32 = _stored_scale(amax.to(torch.float32) / top, amax > 0, part, info.scale_fmt)
        if not result.stored:
            result.stored[info.codes.name] = torch.empty(info.shape, dtype=codes_dtype, device=merged.device)
            result.stored[part.name] = torch.empty(part.shape, dtype=scale.dtype, device=merged.device)
        result.stored[part.name][start // block_rows : start // block_rows + scale.shape[0]] = scale
        return result.stored[info.codes.name][start:stop], scale_f32

    def band(start: int, stop: int, merged, after):
        amax = _band_amax(torch.abs(merged, out=after), info.block)  # `after` as scratch
        codes, scale_f32 = scales(start, stop, merged, amax)
        s = scale_f32.repeat_interleave(block_rows, dim=0)[: stop - start]
        full, rest = divmod(merged.shape[-1], block_cols)
        # W′/scale into `after`, then deq(W′) over it
        torch.div(
            merged[:, : full * block_cols].unflatten(-1, (full, block_cols)),
            s[:, :full, None],
            out=after[:, : full * block_cols].unflatten(-1, (full, block_cols)),
        )
        if rest:
            torch.div(merged[:, full * block_cols :], s[:, full:], out=after[:, full * block_cols :])
        codes.copy_(after.clamp_(-top, top))
        _scale_band(after, s, info.block, _codes_into(codes, after, scratch))
        return after

    def measured(start: int, stop: int, base, merged, old, row):
        """`band` and the span's retention sums in two native passes (native/fp8.c): (kept,
        update, codes changed), or None where the kernels do not take the band (no compiler,
        another device, a NaN in W′): then `band` does it in torch, to the same bytes."""
        amax = native_fp8.block_amax(merged, info.block)
        if amax is None:
            return None
        codes, scale_f32 = scales(start, stop, merged, amax)
        return native_fp8.requantize(merged, base, old, scale_f32, info.block, top, codes, row)

    if codes_dtype == torch.float8_e4m3fn:  # the kernels' one code type
        result.measured = measured
    result.band = band
    return result


def _band_amax(x, block):
    """(⌈rows/bn⌉, ⌈cols/bk⌉) largest value per block of x (|W′|, its rows a band of whole row
    blocks but maybe the last): what _block_amax gives, without its temporaries of x's size."""
    import torch

    block_rows, block_cols = block
    rows, cols = x.shape
    full, rest = divmod(cols, block_cols)
    per_row = [x[:, : full * block_cols].unflatten(-1, (full, block_cols)).amax(-1)] if full else []
    if rest:
        per_row.append(x[:, full * block_cols :].amax(-1, keepdim=True))
    per_row = torch.cat(per_row, dim=-1).float()
    short = -rows % block_rows
    if short:  # a partial last row block: padded with zeros, which change no maximum of |x|
        per_row = torch.cat([per_row, per_row.new_zeros(short, per_row.shape[-1])])
    return per_row.unflatten(0, (-1, block_rows)).amax(1)


def exclude(settings, modules, plain=()) -> dict:
    """quantization_config with `modules` in modules_to_not_convert: transformers' FP8 loader then
    builds plain nn.Linear layers for them and reads their `weight` as stored. A base without the
    list had transformers' default skips (lm_head, tied weights), which a list, once set, replaces:
    then the `plain` modules are listed first (docs/design.md §13)."""
    return extend(settings, "modules_to_not_convert", modules, plain)


def extend(settings, key: str, modules, plain=()) -> dict:
    """`settings` with `modules` appended to its list `key`; when the base has no such list (None or
    absent), the list starts with `plain`, what the loader's default skip list covered."""
    settings = dict(settings)
    declared = settings.get(key)
    listed = list(declared) if declared is not None else list(dict.fromkeys(plain))
    settings[key] = listed + [m for m in modules if m not in listed]
    return settings


def _matrices(W):
    """W as its (rows, columns) matrices (one, or one per leading index: experts)."""
    return W.reshape(-1, *W.shape[-2:]).unbind(0)


def _spans(rows: int, cols: int, multiple: int):
    """(start, stop) row ranges of about _CHUNK elements, starts on multiples of `multiple`."""
    step = multiple * max(1, _CHUNK // max(1, multiple * cols))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]


def _amax(x):
    import torch

    return x.abs().amax() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)


def _block_amax(matrix, block):
    """(⌈rows/bn⌉, ⌈cols/bk⌉) largest |value| per block: columns reduced per chunk of row blocks,
    then the rows (a partial edge block over the rows it has)."""
    import torch

    block_rows, block_cols = block
    rows, cols = matrix.shape
    full, rest = divmod(cols, block_cols)
    grid = torch.zeros(
        -(-rows // block_rows), -(-cols // block_cols), dtype=torch.float32, device=matrix.device
    )
    for a, b in _spans(rows, cols, block_rows):
        x = matrix[a:b].abs()
        per_row = [x[:, : full * block_cols].unflatten(-1, (full, block_cols)).amax(-1)] if full else []
        if rest:
            per_row.append(x[:, full * block_cols :].amax(-1, keepdim=True))
        per_row = torch.cat(per_row, dim=-1).float()
        padded = torch.zeros(-(-(b - a) // block_rows) * block_rows, per_row.shape[-1], device=matrix.device)
        padded[: b - a] = per_row
        grid[a // block_rows : a // block_rows + padded.shape[0] // block_rows] = padded.unflatten(
            0, (-1, block_rows)
        ).amax(1)
    return grid.unsqueeze(0)


def _stored_scale(scale, nonzero, stored: TensorInfo, scale_fmt):
    """(the scales as stored, their float32 value): zero blocks 1, powers of two (rounded up) under
    ue8m0, rounded to the stored dtype (never to 0 or ∞: clamped into its positive range)."""
    import torch

    scale = torch.where(nonzero, scale, torch.ones_like(scale))
    if scale_fmt == "ue8m0" or stored.dtype in ("F8_E8M0", "U8"):
        mantissa, exponent = torch.frexp(scale)  # scale = m·2^e, m in [0.5, 1): 2^e, or 2^(e−1) when exact
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))
    if stored.dtype in ("F8_E8M0", "U8"):
        value = scale.to(torch.float8_e8m0fnu)
        return (value.view(torch.uint8) if stored.dtype == "U8" else value), value.to(torch.float32)
    dtype = torch_dtype_of(stored.dtype)
    info = torch.finfo(dtype)
    value = scale.clamp(info.tiny, info.max).to(dtype)
    return value, value.to(torch.float32)


def _float32_codes(codes):
    """float32(codes), exactly, without torch's scalar float8 conversion on the CPU (3× slower).

    The 7 bits of an e4m3 code below its sign are a float16's exponent and mantissa shifted right
    by 7, with the exponent bias 8 smaller (7, not 15): as a float16 it is the code's value / 2⁸,
    exact for every code, subnormals included, and so is float32(that) · 2⁸. e5m2 is the top byte
    of a float16. The int16 arithmetic runs in chunks, so its buffers stay small; a chunk holding
    e4m3fn's NaN code (0x7F, which this would read as 480) is converted by torch instead."""
    import torch

    if codes.device.type != "cpu" or codes.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return codes.to(torch.float32)
    flat = codes.reshape(-1).view(torch.uint8)
    out = torch.empty(flat.shape, dtype=torch.float32)
    shift, bias = (128, 256.0) if codes.dtype == torch.float8_e4m3fn else (256, 1.0)
    for start in range(0, flat.numel(), _CHUNK):
        chunk, target = flat[start : start + _CHUNK], out[start : start + _CHUNK]
        b = chunk.to(torch.int16)
        bits = b & 0x7F
        if shift == 128 and int(bits.amax()) == 0x7F:
            target.copy_(chunk.view(codes.dtype))
            continue
        bits.mul_(shift).add_(b.bitwise_and_(0x80).mul_(-256))  # the sign: −32768, bit 15
        target.copy_(bits.view(torch.float16))
        if bias != 1.0:
            target.mul_(bias)
    return out.reshape(codes.shape)


def _scales(info: DequantizedInfo, scale):
    import torch

    stored = info.part("scale_inv")
    if scale.dtype == torch.uint8:  # E8M0 exponents stored as bytes: the same bits
        scale = scale.view(torch.float8_e8m0fnu)
    s = scale.to(torch.float32)
    good = torch.isfinite(s) & (s > 0)
    if info.scale_fmt == "ue8m0" and stored.dtype not in ("F8_E8M0", "U8"):
        good &= torch.frexp(s).mantissa.abs() == 0.5
    what = "NaN, infinite, zero or negative"
    if info.scale_fmt == "ue8m0":
        what += ', or not a power of two as quantization_config scale_fmt "ue8m0" declares'
    check_scales(info, stored, s, good, what)
    return s


def _declared_block(settings: Mapping, where: str):
    if "weight_block_size" not in settings:
        return DEFAULT_BLOCK
    size = settings["weight_block_size"]
    if size is None:
        return None
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise CheckpointError(
            f"{where}: weight_block_size must be [rows, columns] of positive integers or null, got {size!r}"
        )
    return tuple(size)


def _one_scale(codes: TensorInfo, scale: TensorInfo, block) -> bool:
    """One scale for the whole tensor: a single element of lower rank (0-d, [1]), or any single
    element when weight_block_size is null (transformers' per-tensor quantizer writes a 1×1 grid)."""
    if scale.numel != 1:
        return False
    return len(scale.shape) < len(codes.shape) or (block is None and len(scale.shape) == len(codes.shape))


def _check_grid(codes: TensorInfo, scale: TensorInfo) -> None:
    if len(codes.shape) < 2 or len(scale.shape) != len(codes.shape) or scale.shape[:-2] != codes.shape[:-2]:
        raise CheckpointError(
            f"{scale.file}: tensor {scale.name}: shape {list(scale.shape)} is neither one scale nor a "
            f"grid of blocks over {codes.name} {list(codes.shape)} (…, ⌈rows/bn⌉, ⌈columns/bk⌉)"
        )


def _grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def _deduced_block(grids: list[tuple[TensorInfo, TensorInfo]], folder: Path) -> tuple[int, int]:
    """The one [bn, bk] every grid fits, when the rows and columns each scale covers are known."""
    block = []
    for axis, label in ((-2, "rows"), (-1, "columns")):
        low, high = 1, math.inf
        low_by = high_by = spans = None
        for codes, scale in grids:
            size, count = codes.shape[axis], scale.shape[axis]
            if size == 0 or count == 0:
                if size != count:
                    raise CheckpointError(
                        f"{scale.file}: tensor {scale.name}: shape {list(scale.shape)} does not match "
                        f"the {label} of {codes.name} {list(codes.shape)}"
                    )
                continue
            # ⌈size/b⌉ = count  ⇔  size/count ≤ b < size/(count − 1)
            least = -(-size // count)
            most = math.inf if count == 1 else -(-size // (count - 1)) - 1
            if least > low:
                low, low_by = least, (codes, scale)
            if most < high:
                high, high_by = most, (codes, scale)
            if count >= 2:
                spans = (codes, scale)  # its scales' rows (columns) move with the block size
        if low > high:
            (a, sa), (b, sb) = low_by, high_by
            raise CheckpointError(
                f"{sa.file}: the FP8 scales fit no single block size: {sa.name} {list(sa.shape)} over "
                f"{a.name} {list(a.shape)} needs {low} or more {label} per block, {sb.name} "
                f"{list(sb.shape)} over {b.name} {list(b.shape)} at most {high}"
            )
        if spans is not None and low < high:
            codes, scale = spans
            raise CheckpointError(
                f"{scale.file}: the FP8 block size cannot be told from the shapes alone: {scale.name} "
                f"{list(scale.shape)} over {codes.name} {list(codes.shape)} fits any of {low}–{high} "
                f"{label} per block, and {folder / 'config.json'} has no quantization_config with "
                f'weight_block_size to say which; add one, e.g. "quantization_config": '
                f'{{"quant_method": "fp8", "weight_block_size": [128, 128]}} if the model was quantized '
                f"in DeepSeek's 128×128 blocks"
            )
        block.append(low)
    return (block[0], block[1])


def _check_orphans(tensors: Mapping[str, TensorInfo], claimed: frozenset[str]) -> None:
    """A `<x>_scale_inv` that decodes nothing: its codes are missing, or are not float8."""
    for name in tensors:
        if name.endswith("_scale_inv") and name not in claimed:
            raise orphan_part(
                tensors, name, name[: -len("_scale_inv")], "the FP8 scale", "FP8 codes (float8_e4m3fn)"
            )


def _foreign(t, tensors: Mapping[str, TensorInfo], declaration: str) -> CheckpointError:
    """A quantized tensor that is not fine-grained FP8 in a fine-grained FP8 checkpoint."""
    info = tensors[t.codes]
    if t.scheme == "unscaled" and info.dtype in ("F8_E4M3", "F8_E5M2"):
        return unscaled_codes(t, tensors, f"{t.codes}_scale_inv", "its scale tensor is missing")
    return foreign_tensor(
        t,
        tensors,
        f"fine-grained FP8 ({declaration}): FP8 codes are float8 with a <name>_scale_inv beside them",
    )
