"""bitsandbytes 4-bit (NF4, FP4; double quantisation included) and int8, as transformers saves them,
read dequantized (docs/design.md §13).

The layouts `save_pretrained` writes for a model loaded with `BitsAndBytesConfig` (config.json
`quantization_config: {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type":
"nf4", …}`; <w> a quantized weight `<m>.weight`, the logical name it keeps):

4-bit (Params4bit, the "bnb-4bit" bases QLoRA trains on)
  <w>                       the codes: two 4-bit codes a byte, the high nibble first, over the weight
                            flattened row-major; shape (⌈n/2⌉, 1), uint8, or the same bytes in the
                            dtype `bnb_4bit_quant_storage` names (bfloat16 for FSDP).
  <w>.absmax                one scale per block of `blocksize` consecutive codes, the last partial:
                            float32, or uint8 codes of it under double quantisation.
  <w>.quant_map             the 16 values a code indexes: bitsandbytes' NF4 or FP4 table.
  <w>.nested_absmax         double quantisation: float32, one per `nested_blocksize` (256) absmax codes;
  <w>.nested_quant_map      and the 256 values those codes index (bitsandbytes' dynamic map).
  <w>.quant_state.bitsandbytes__nf4 (or __fp4)   uint8 bytes of a JSON object: quant_type, blocksize,
                            dtype (what bitsandbytes decodes into), shape (the logical weight's); under
                            double quantisation nested_blocksize, nested_dtype, nested_offset.

  W[i] = table[code i] · absmax[⌊i / blocksize⌋], one float32 rounding per element, and under double
  quantisation absmax[b] = nested_quant_map[absmax code b] · nested_absmax[⌊b / nested_blocksize⌋]
  + nested_offset, each step rounded in float32: what `bitsandbytes.functional.dequantize_4bit`
  computes in float32, bit for bit. bitsandbytes decodes with its own tables, whatever quant_map
  holds, so `table` is bitsandbytes' NF4 or FP4 table, which the stored quant_map must equal (a
  checkpoint whose quant_map says otherwise is refused when read). FP4's code 0b1000 (sign bit, no
  magnitude) decodes to −0.0, as bitsandbytes' CPU and CUDA kernels decode it; its pure-torch
  fallback (odd widths) and the quant_map it stores have +0.0 there, equal in value. In a quant_state
  of dtype bfloat16 or float16 bitsandbytes rounds this float32 product once to that dtype.

int8 (Int8Params, LLM.int8(), `load_in_8bit`)
  <m>.weight                int8 codes, (out, in).
  <m>.SCB                   float32, each row's absmax.
  <m>.weight_format         uint8 0 ("row"); the tiled layouts of bitsandbytes < 0.45 are refused,
                            as bitsandbytes itself refuses them.

  W = float32(codes) · SCB[row] · float32(1/127), in this order, each product rounded in float32:
  `bitsandbytes.functional.int8_vectorwise_dequant` (what transformers' dequantization calls).

`logical_index` runs when the checkpoint is opened: it checks the layout on the headers and reads
each quant_state (a few dozen bytes of JSON) and weight_format (one byte), since the logical shape
is only known from the quant_state. `dequantize` checks the scales of the tensor it reads (NaN or
infinite absmax, nested_absmax or SCB; a quant_map that is not bitsandbytes' table) and decodes it
vectorised — codes through a 256-entry table of byte → two values, the scales over whole blocks
through a view — on the device `read` put the codes on. No bitsandbytes at run time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.io.quantization import (
    INTEGER,
    PLAIN_DTYPES,
    DequantizedInfo,
    Quantization,
    check_scales,
    foreign_tensor,
    mean_square,
    model_dtype,
    orphan_part,
    unscaled_codes,
)
from lorasurgery.io.safetensors_format import TensorInfo, dtype_name_of

FOUR_BIT = frozenset({"bitsandbytes-nf4", "bitsandbytes-fp4", "bitsandbytes-4bit"})
INT8 = "bitsandbytes-int8"
FORMATS = FOUR_BIT | {INT8}  # the Quantization.format keys this reader serves (io.readers)

# bitsandbytes' tables (functional.get_4bit_type), divided by their largest magnitude as it does.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 e2m1 with bias 2, in code order: sign bit 0b1000, then exponent and mantissa; over 12.
FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
TABLES = {"nf4": NF4, "fp4": FP4}
INV_127 = 7.874015718698502e-3  # bitsandbytes' 1/127, a float32 once it meets a float32 tensor

STATE_PREFIX = ".quant_state.bitsandbytes__"
# Stored suffixes that belong to a quantized weight, for finding the ones that belong to none.
PART_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    f"{STATE_PREFIX}nf4",
    f"{STATE_PREFIX}fp4",
)
STORAGE_DTYPES = {  # bnb_4bit_quant_storage -> the codes' safetensors dtype
    "uint8": "U8",
    "int8": "I8",
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
}
_STATE_BYTES = 1 << 16  # a quant_state is ~170 bytes of JSON; anything this large is not one


@dataclass(frozen=True)
class FourBit:
    """A 4-bit weight's quant_state, as DequantizedInfo.scheme."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    dtype: str  # the quant_state's dtype: what bitsandbytes decodes into ("bfloat16" …)
    nested_blocksize: int | None = None  # double quantisation
    nested_offset: float | None = None


# ------------------------------------------------------------------------------------------------
# Opening: the layout checked on the headers


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them, in file order; CheckpointError (or
    UnsupportedError) naming the file and tensor when the bitsandbytes layout is broken."""
    declared = quantization.source is not None
    settings = quantization.config or {}
    where = f"{folder / 'config.json'}: quantization_config"
    allowed = FORMATS
    if declared:
        allowed = {INT8} if quantization.format == INT8 else FOUR_BIT
    kind = settings.get("bnb_4bit_quant_type") if declared and allowed is FOUR_BIT else None
    storage = settings.get("bnb_4bit_quant_storage") if declared and allowed is FOUR_BIT else None
    if storage is not None and str(storage).removeprefix("torch.") not in STORAGE_DTYPES:
        raise CheckpointError(
            f"{where}: bnb_4bit_quant_storage {storage!r} is none of {', '.join(STORAGE_DTYPES)}"
        )
    declaration = quantization.declaration() or "bitsandbytes tensors"

    small = _SmallReads()
    logical = {}
    for t in quantization.tensors:
        if t.format not in allowed:
            raise _foreign(t, tensors, declaration)
        if t.format == INT8:
            info = _int8_info(t, tensors, config, small)
        else:
            info = _four_bit_info(t, tensors, config, small, kind, storage)
        logical[t.codes] = info
    _check_orphans(tensors, quantization.stored_names)
    if not logical:
        return tensors  # declared, but nothing stored quantized: the tensors are what they are
    hidden = quantization.stored_names - set(logical)
    return {name: logical.get(name, info) for name, info in tensors.items() if name not in hidden}


def _four_bit_info(t, tensors, config, small, kind, storage) -> DequantizedInfo:
    """A 4-bit weight: its quant_state read and checked, then its codes and every block part against it."""
    codes = tensors[t.codes]
    state_name, state = _four_bit_state(t, tensors, small, kind)
    shape = tuple(state["shape"])
    _check_four_bit_codes(codes, t.logical, state_name, shape, storage)
    _check_four_bit_parts(t, tensors, state, state_name, math.prod(shape))
    scheme = FourBit(
        state["quant_type"],
        state["blocksize"],
        state["dtype"],
        state.get("nested_blocksize"),
        state.get("nested_offset"),
    )
    return DequantizedInfo.of(
        t.logical,
        shape,
        codes,
        format=t.format,
        parts=tuple((role, tensors[stored]) for role, stored in t.parts),
        model_dtype=model_dtype(config, PLAIN_DTYPES[state["dtype"]]),
        scheme=scheme,
    )


def _four_bit_state(t, tensors, small, kind) -> tuple[str, dict]:
    """(name, parsed JSON) of a 4-bit weight's quant_state, its quant_type agreeing with its own name
    and with config.json's bnb_4bit_quant_type (`kind`)."""
    codes, name = tensors[t.codes], t.logical
    state_name = t.part("quant_state")
    if state_name is None:
        raise CheckpointError(
            f"{codes.file}: tensor {name} has bitsandbytes' {name}.absmax beside it but no "
            f"{name}{STATE_PREFIX}nf4 (or __fp4): its quant_state, which gives the codes' type, block "
            f"size and shape, is missing"
        )
    state_info = tensors[state_name]
    state = _quant_state(state_info, small)
    quant_type = state["quant_type"]
    if not state_name.endswith(STATE_PREFIX + quant_type):
        raise CheckpointError(
            f"{state_info.file}: tensor {state_name} says quant_type {quant_type!r}, against its own name"
        )
    if kind in TABLES and quant_type != kind:
        raise CheckpointError(
            f"{state_info.file}: tensor {state_name} says quant_type {quant_type!r}, but config.json's "
            f'quantization_config bnb_4bit_quant_type is "{kind}"'
        )
    return state_name, state


def _check_four_bit_codes(codes: TensorInfo, name: str, state_name: str, shape: tuple, storage) -> None:
    """The codes' dtype is the declared storage, and they hold the state's shape two values a byte."""
    n = math.prod(shape)
    stored = STORAGE_DTYPES[str(storage).removeprefix("torch.")] if storage is not None else None
    if (stored is not None and codes.dtype != stored) or codes.dtype not in STORAGE_DTYPES.values():
        declared = f'bnb_4bit_quant_storage "{storage}"' if stored else "bitsandbytes"
        raise CheckpointError(
            f"{codes.file}: tensor {name} holds {dtype_name_of(codes.dtype)} codes, but {declared} "
            f"stores them as {dtype_name_of(stored) if stored else 'uint8 (or int8, bfloat16, float16, float32)'}"
        )
    if codes.nbytes != (n + 1) // 2:
        raise CheckpointError(
            f"{codes.file}: tensor {name}: {codes.nbytes} bytes of codes, but {state_name} gives shape "
            f"{list(shape)}: {n} values, two a byte, need {(n + 1) // 2}"
        )


def _check_four_bit_parts(t, tensors, state: dict, state_name: str, n: int) -> None:
    """absmax, quant_map and, under double quantisation, nested_absmax and nested_quant_map: each
    present, of its dtype and of the shape the state's block sizes give."""
    codes = tensors[t.codes]
    blocksize = state["blocksize"]
    blocks = -(-n // blocksize)
    nested = "nested_blocksize" in state
    absmax = tensors[t.part("absmax")]
    _check_part(
        absmax,
        "U8" if nested else "F32",
        (blocks,),
        f"{n} values in blocks of {blocksize} (quant_state blocksize)",
        "uint8 codes of absmax under double quantisation" if nested else "float32 scales",
    )
    quant_map = _required(t, tensors, "quant_map", codes)
    _check_part(quant_map, "F32", (16,), "one value per 4-bit code", "float32")
    present = [role for role in ("nested_absmax", "nested_quant_map") if t.part(role)]
    if nested:
        nested_absmax = _required(t, tensors, "nested_absmax", codes, state_name)
        nested_map = _required(t, tensors, "nested_quant_map", codes, state_name)
        nested_blocks = -(-blocks // state["nested_blocksize"])
        _check_part(
            nested_absmax,
            "F32",
            (nested_blocks,),
            f"{blocks} absmax codes in blocks of {state['nested_blocksize']} (quant_state nested_blocksize)",
            "float32 scales",
        )
        _check_part(nested_map, "F32", (256,), "one value per 8-bit absmax code", "float32")
    elif present:
        extra = tensors[t.part(present[0])]
        raise CheckpointError(
            f"{extra.file}: tensor {extra.name} says {t.logical} is double-quantised, but {state_name} has no "
            f"nested_blocksize, nested_dtype or nested_offset"
        )


def _int8_info(t, tensors, config, small) -> DequantizedInfo:
    codes = tensors[t.codes]
    scb = tensors[t.part("SCB")]
    if codes.dtype != "I8" or len(codes.shape) != 2:
        raise CheckpointError(
            f"{codes.file}: tensor {codes.name} holds {dtype_name_of(codes.dtype)} codes of shape "
            f"{list(codes.shape)}, but {scb.name} beside it says bitsandbytes int8: int8 codes (out, in)"
        )
    _check_part(scb, "F32", (codes.shape[0],), f"one per row of {codes.name} {list(codes.shape)}", "float32")
    fmt_name = t.part("weight_format")
    if fmt_name is not None:
        fmt = tensors[fmt_name]
        if fmt.dtype not in INTEGER or fmt.numel != 1:
            raise CheckpointError(
                f"{fmt.file}: tensor {fmt_name}: {dtype_name_of(fmt.dtype)} of shape {list(fmt.shape)}; "
                f"bitsandbytes' weight_format is one uint8"
            )
        value = int.from_bytes(small.read(fmt), "little", signed=fmt.dtype.startswith("I"))
        if value != 0:
            raise UnsupportedError(
                f"{fmt.file}: tensor {fmt_name} is {value}, a tiled layout of bitsandbytes before 0.45 "
                f"(1 col32, 2 col_turing, 3 col_ampere), not 0 (row-major); bitsandbytes no longer reads it "
                f"either — load and save the model again with bitsandbytes 0.44 and load_in_8bit, or "
                f"dequantize it first (docs/design.md §13)"
            )
    return DequantizedInfo.of(
        t.logical,
        tuple(codes.shape),
        codes,
        format=INT8,
        parts=tuple((role, tensors[stored]) for role, stored in t.parts),
        block=(1, codes.shape[1]),
        model_dtype=model_dtype(config),
    )


def _required(t, tensors, role: str, codes: TensorInfo, because: str | None = None) -> TensorInfo:
    stored = t.part(role)
    if stored is None:
        why = f", which {because} says is there (double quantisation)" if because else ""
        raise CheckpointError(
            f"{codes.file}: tensor {t.logical} is bitsandbytes 4-bit, but {t.logical}.{role}{why} is missing"
        )
    return tensors[stored]


def _check_part(info: TensorInfo, dtype: str, shape: tuple[int, ...], why: str, what: str) -> None:
    if info.dtype != dtype:
        raise CheckpointError(
            f"{info.file}: tensor {info.name} holds {dtype_name_of(info.dtype)}; bitsandbytes stores "
            f"{what} here ({dtype_name_of(dtype)})"
        )
    if tuple(info.shape) != shape:
        raise CheckpointError(
            f"{info.file}: tensor {info.name}: shape {list(info.shape)}, but {why} needs {list(shape)}"
        )


def _quant_state(info: TensorInfo, small) -> dict:
    """The quant_state JSON, checked: quant_type, blocksize, dtype, shape (and the nested three)."""
    where = f"{info.file}: tensor {info.name}"
    if info.dtype != "U8" or len(info.shape) != 1 or info.nbytes > _STATE_BYTES:
        raise CheckpointError(
            f"{where}: {dtype_name_of(info.dtype)} of shape {list(info.shape)}; a bitsandbytes quant_state "
            f"is the uint8 bytes of a JSON object"
        )
    try:
        state = json.loads(small.read(info).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{where}: not the JSON of a bitsandbytes quant_state ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: not the JSON object of a bitsandbytes quant_state")

    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: quant_state {key} is {state.get(key)!r}, expected {expected}")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if state.get("quant_type") not in TABLES:
        raise bad("quant_type", '"nf4" or "fp4"')
    if not count(state.get("blocksize")) or state["blocksize"] <= 0:
        raise bad("blocksize", "a positive integer")
    if state.get("dtype") not in PLAIN_DTYPES:
        raise bad("dtype", '"float32", "bfloat16" or "float16"')
    shape = state.get("shape")
    if not isinstance(shape, list) or not shape or not all(count(s) and s >= 0 for s in shape):
        raise bad("shape", "a list of sizes")
    nested = [key for key in ("nested_blocksize", "nested_dtype", "nested_offset") if key in state]
    if nested and len(nested) != 3:
        missing = sorted({"nested_blocksize", "nested_dtype", "nested_offset"} - set(nested))
        raise bad(missing[0], "a value beside the other nested_ settings (double quantisation)")
    if nested:
        if not count(state["nested_blocksize"]) or state["nested_blocksize"] <= 0:
            raise bad("nested_blocksize", "a positive integer")
        if state["nested_dtype"] != "float32":
            raise bad("nested_dtype", '"float32"')
        offset = state["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise bad("nested_offset", "a finite number")
    return state


class _SmallReads:
    """The bytes of a few small stored tensors (quant_state, weight_format) when the checkpoint is
    opened; a .bin file is loaded once (weights_only) for all of its tensors."""

    def __init__(self):
        self._pickle: tuple[Path, dict] | None = None

    def read(self, info: TensorInfo) -> bytes:
        if info.start >= 0:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                data = f.read(info.nbytes)
            if len(data) != info.nbytes:
                raise CheckpointError(f"{info.file}: file ended early (was it truncated?)")
            return data
        import torch

        if self._pickle is None or self._pickle[0] != info.file:
            try:
                state = torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                state = torch.load(info.file, map_location="cpu", weights_only=True)
            self._pickle = (info.file, state)
        return self._pickle[1][info.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_orphans(tensors: Mapping[str, TensorInfo], claimed: frozenset[str]) -> None:
    """A bitsandbytes part (absmax, quant_map, quant_state …, SCB, weight_format) of no quantized weight."""
    for name, info in tensors.items():
        if name in claimed:
            continue
        suffix = next((s for s in PART_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            weight = name[: -len(suffix)]
            if weight not in tensors:
                raise CheckpointError(
                    f"{info.file}: tensor {name} is part of the bitsandbytes state of {weight}, which the "
                    f"checkpoint does not have"
                )
            raise CheckpointError(
                f"{info.file}: tensor {weight} has bitsandbytes' {suffix[1:]} beside it but no "
                f"{weight}.absmax: its absmax is missing"
            )
        for suffix in (".SCB", ".weight_format"):
            if name.endswith(suffix):
                weight = name[: -len(suffix)] + ".weight"
                codes = tensors.get(weight)
                if codes is None or suffix == ".SCB":
                    raise orphan_part(
                        tensors,
                        name,
                        weight,
                        "part of the bitsandbytes int8 state",
                        "bitsandbytes int8 codes",
                    )
                raise CheckpointError(
                    f"{codes.file}: tensor {weight} has bitsandbytes' weight_format beside it but no "
                    f"{name[: -len(suffix)]}.SCB: its row scales are missing"
                )


def _foreign(t, tensors: Mapping[str, TensorInfo], declaration: str) -> CheckpointError:
    """A quantized tensor that is not bitsandbytes' (or not of the declared kind) in a bitsandbytes
    checkpoint; an integer weight with nothing beside it has lost its absmax or SCB."""
    info = tensors[t.codes]
    if t.scheme == "unscaled" and info.dtype in ("U8", "I8"):
        missing = f"{t.codes}.absmax" if info.dtype == "U8" else f"{t.codes.removesuffix('.weight')}.SCB"
        return unscaled_codes(t, tensors, missing, "its bitsandbytes scales are missing")
    return foreign_tensor(t, tensors, f"bitsandbytes quantization ({declaration})")


# ------------------------------------------------------------------------------------------------
# Reading: one tensor decoded


def dequantize(info: DequantizedInfo, read):
    """The float32 tensor `info` from its codes and scales (`read(stored info)` reads one, on the
    device the caller chose); CheckpointError naming the stored tensor when a scale is NaN or
    infinite or the quant_map is not bitsandbytes' table."""
    if info.format == INT8:
        scb = _finite(info, info.part("SCB"), read(info.part("SCB")))
        W = read(info.codes).to(scb.dtype)
        return W.mul_(scb.reshape(-1, 1)).mul_(INV_127)  # bitsandbytes' order: (codes · SCB) · 1/127
    scheme: FourBit = info.scheme
    codes = read(info.codes)
    table = _table(info, read(info.part("quant_map")))
    absmax = _absmax(info, read)
    return decode_4bit(codes, table, absmax, scheme.blocksize, info.shape)


def noise_variance(info: DequantizedInfo, read) -> float:
    """The mean, over the tensor, of the variance of the rounding its codes stand for: uniform
    rounding, step²/12 per element (docs/design.md §13, "Extracting from quantized pairs"). int8: the step is
    SCB/127 per row. NF4/FP4: bitsandbytes rounds x/absmax to the nearest of its 16 values, so a
    code stands for the cell between the midpoints to its neighbours (up to ±1 at the ends): the
    step is that cell's width — the local code spacing, per code — times its block's absmax."""
    import torch

    if info.format == INT8:
        scb = _finite(info, info.part("SCB"), read(info.part("SCB")))
        return mean_square(scb.float() * INV_127) / 12  # every row has as many elements: their mean
    scheme: FourBit = info.scheme
    table = _table(info, read(info.part("quant_map")))
    values = torch.unique(table)  # sorted; FP4's ±0 count once
    edges = torch.cat((values[:1], (values[1:] + values[:-1]) / 2, values[-1:]))
    widths = edges[1:] - edges[:-1]  # the cell of each distinct value
    cell = widths[torch.searchsorted(values, table)]  # the cell of each of the 16 codes
    absmax = _absmax(info, read)
    return mean_square(decode_4bit(read(info.codes), cell, absmax, scheme.blocksize, info.shape)) / 12


def table_of(quant_type: str, device=None):
    """bitsandbytes' 16 values of `quant_type` in float32, as its kernels decode them."""
    import torch

    values = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)
    return values.div_(values.abs().max())  # get_4bit_type's normalisation (FP4: by 12)


def decode_4bit(codes, table, absmax, blocksize: int, shape: tuple[int, ...]):
    """W from packed codes (any dtype: their bytes), the 16-value table and float32 absmax per block."""
    import torch

    n = math.prod(shape)
    data = codes.reshape(-1).view(torch.uint8)
    # byte b -> (table[b >> 4], table[b & 15]), the pair gathered as one 8-byte word: one gather per
    # byte, no unpacked index tensor (20% faster than gathering the pairs as rows of two floats)
    pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=1).view(torch.int64)
    W = pairs.reshape(-1).index_select(0, data.to(torch.int32)).view(torch.float32)
    if W.numel() != n:  # an odd count: the last byte's low nibble is padding
        W = W[:n].clone()
    full, rest = divmod(n, blocksize)
    W[: full * blocksize].view(full, blocksize).mul_(absmax[:full, None])
    if rest:
        W[full * blocksize :].mul_(absmax[full])
    return W.reshape(shape)


def _table(info: DequantizedInfo, quant_map):
    """bitsandbytes' table for the codes, once the stored quant_map is shown to hold it."""
    import torch

    table = table_of(info.scheme.quant_type, quant_map.device)
    if not torch.equal(quant_map.reshape(-1), table):  # == : FP4's stored +0.0 is its −0.0
        stored = info.part("quant_map")
        wrong = int((quant_map.reshape(-1) != table).nonzero()[0, 0])
        raise CheckpointError(
            f"{stored.file}: tensor {stored.name} is not bitsandbytes' {info.scheme.quant_type.upper()} "
            f"table (entry {wrong} is {float(quant_map.reshape(-1)[wrong])!r}, the table's "
            f"{float(table[wrong])!r}); bitsandbytes decodes the codes with its own table whatever this "
            f"tensor says, so {info.name} cannot be decoded as this checkpoint describes it"
        )
    return table


def _absmax(info: DequantizedInfo, read):
    """float32 absmax per block; under double quantisation decoded as bitsandbytes' dequantize_blockwise."""
    import torch

    stored = read(info.part("absmax"))
    scheme: FourBit = info.scheme
    if scheme.nested_blocksize is None:
        return _finite(info, info.part("absmax"), stored)
    nested_absmax = _finite(info, info.part("nested_absmax"), read(info.part("nested_absmax")))
    nested_map = read(info.part("nested_quant_map"))
    absmax = nested_map.index_select(0, stored.reshape(-1).to(torch.int32))
    size = scheme.nested_blocksize
    full, rest = divmod(absmax.numel(), size)
    absmax[: full * size].view(full, size).mul_(nested_absmax[:full, None])
    if rest:
        absmax[full * size :].mul_(nested_absmax[full])
    # the offset of the quant_state `read` gives, not the one read at open: a requantized weight
    # (linalg.requantize) is decoded with its new quant_state before it is written
    state = read(info.part("quant_state"))
    offset = json.loads(bytes(state.cpu().tolist()).decode("utf-8"))["nested_offset"]
    absmax.add_(torch.tensor(offset, dtype=torch.float32, device=absmax.device))
    return _finite(info, info.part("absmax"), absmax, " once decoded through nested_quant_map")


def _finite(info: DequantizedInfo, stored: TensorInfo, values, how: str = ""):
    import torch

    check_scales(info, stored, values, torch.isfinite(values), f"NaN or infinite{how}")
    return values


# ------------------------------------------------------------------------------------------------
# Requantizing: new codes and scales for a weight, as bitsandbytes' quantizer computes them


def quantize(info: DequantizedInfo, W, read) -> dict:
    """{stored name: tensor}: every stored tensor of `info` for the float32 weight W (its logical
    shape, on any device), computed as bitsandbytes quantizes a weight on the CPU, so that the
    checkpoint stays what bitsandbytes itself would have saved (`read(stored info)` gives the parts
    that do not change: quant_map, nested_quant_map, the quant_state's settings).

    4-bit: `quantize_4bit`'s pure-torch kernel (bitsandbytes' CPU path): absmax = max |W| per block;
    W · (1/absmax) (W / absmax for the partial last block), clamped to [-1, 1], to the nearest table
    value by the float32 midpoints (a tie goes to the lower value), FP4's codes through the table's
    sort order; packed high nibble first, in the stored codes' dtype. Double quantisation: offset =
    mean(absmax), absmax − offset quantized in blocks of nested_blocksize the same way against
    nested_quant_map (bitsandbytes' pure-torch `quantize_blockwise`; its CPU library's binary search
    picks the farther of two codes for values within ~1% of their midpoint, docs/design.md §13).
    The quant_state keeps its dtype and gets the new nested_offset.
    int8: Int8Params' quantizer: W to float16, SCB = max |row|, codes = round(W · (127 / SCB))."""
    import torch

    if info.format == INT8:
        B = W.to(torch.float16).float()  # Int8Params quantizes the float16 weight
        scb = B.abs().amax(dim=1)
        codes = torch.round(B * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
        out = {info.codes.name: codes, info.part("SCB").name: scb}
        if info.part("weight_format") is not None:
            out[info.part("weight_format").name] = read(info.part("weight_format"))
        return out

    scheme: FourBit = info.scheme
    quant_map = read(info.part("quant_map"))
    table = _table(info, quant_map) + 0.0  # bitsandbytes' quantizer sorts its table with +0.0 in it
    scaled, absmax = _scaled_blocks(W.reshape(-1).float(), scheme.blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the half byte after an odd count: code of 0
    q = _nearest(scaled, table)
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    stored_codes = info.codes
    if stored_codes.dtype != "U8":
        packed = packed.reshape(-1).view(_storage_dtype(stored_codes)).unsqueeze(1)
    out = {stored_codes.name: packed.reshape(stored_codes.shape), info.part("quant_map").name: quant_map}
    state_info = info.part("quant_state")
    state = json.loads(bytes(read(state_info).cpu().tolist()).decode("utf-8"))
    if scheme.nested_blocksize is None:
        out[info.part("absmax").name] = absmax
    else:
        nested_map = read(info.part("nested_quant_map"))
        offset = absmax.mean()
        scaled, nested_absmax = _scaled_blocks(absmax - offset, scheme.nested_blocksize)
        nested_q = _nearest(scaled, nested_map)
        out[info.part("absmax").name] = nested_q.to(torch.uint8)
        out[info.part("nested_absmax").name] = nested_absmax
        out[info.part("nested_quant_map").name] = nested_map
        state["nested_offset"] = offset.item()
    text = _state_json(state, state_info)
    out[state_info.name] = torch.tensor(list(text.encode()), dtype=torch.uint8, device=W.device)
    return out


def _state_json(state: dict, stored: TensorInfo) -> str:
    """The quant_state JSON in exactly the stored tensor's length (the output's layout is planned
    before the new offset is known): as bitsandbytes writes it when it fits, padded with spaces
    (JSON whitespace); when the new nested_offset's digits make it longer, written without the
    spaces after separators and with the offset as the shortest decimal of the same float32
    (bitsandbytes reads it into a float32 tensor: the same value)."""
    import torch

    size = int(stored.shape[0]) if stored.shape else 1
    text = json.dumps(state)
    if len(text) > size and "nested_offset" in state:
        offset = state["nested_offset"]
        as_float32 = torch.tensor(offset, dtype=torch.float32)
        short = next(
            value
            for value in (float(f"{offset:.{digits}g}") for digits in range(1, 18))
            if torch.equal(torch.tensor(value, dtype=torch.float32), as_float32)
        )
        text = json.dumps({**state, "nested_offset": short}, separators=(",", ":"))
    if len(text) > size:
        raise CheckpointError(
            f"{stored.file}: tensor {stored.name}: the requantized quant_state takes {len(text)} bytes "
            f"where the checkpoint stores {size}; merge without --requantize writes it unquantized"
        )
    return text.ljust(size)


def _storage_dtype(info: TensorInfo):
    import torch

    return getattr(torch, {v: k for k, v in STORAGE_DTYPES.items()}[info.dtype])


def _scaled_blocks(x, blocksize: int):
    """(x / absmax of its block clamped to [-1, 1], float32 absmax per block) as bitsandbytes' torch
    quantizers compute them: times the reciprocal in whole blocks, divided in the partial last one."""
    import torch

    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        last = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat((absmax, last.unsqueeze(0)))
        scaled = torch.cat((scaled, torch.clamp(x[full:] / last, -1, 1)))
    return scaled, absmax


def _nearest(scaled, table):
    """The index of the nearest `table` value to each of `scaled`, by the float32 midpoints of the
    sorted table (a tie goes to the lower value), as bitsandbytes' torch quantizers find it."""
    import torch

    order = torch.argsort(table)
    bounds = (table[order[:-1]] + table[order[1:]]) / 2
    return order[torch.bucketize(scaled, bounds, out_int32=True)]


def exclude(settings, modules, plain=()) -> dict:
    """quantization_config with `modules` in llm_int8_skip_modules, the list transformers'
    bitsandbytes loaders (4-bit and int8) read: they build plain nn.Linear layers for them and read
    their `weight` as stored. Once set, that list replaces transformers' default skips (lm_head,
    tied weights: `get_keys_to_not_convert`), so a base without it gets the `plain` modules listed
    first, every 2-D weight the checkpoint stores unquantized (docs/design.md §13)."""
    from lorasurgery.io.fp8 import extend

    return extend(settings, "llm_int8_skip_modules", modules, plain)
