"""The safetensors file format: dtype table and a strict, bounded header parser.

A file is `u64 little-endian N` + `N bytes of JSON` + data. The JSON maps tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section) plus an
optional "__metadata__" of str → str. Files come from strangers, so the header is validated in full
before any tensor is touched: bounded length, well-formed JSON without duplicate keys, known dtypes,
offsets inside the file, no overlaps, and every span equal to numel × itemsize.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from lorasurgery.errors import CheckpointError, OptionError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap
HEADER_ALIGNMENT = 8  # the writer pads the JSON with spaces to this many bytes

# safetensors dtype code -> bits per element.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# safetensors dtype code -> torch dtype attribute name (resolved lazily: no torch at import).
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}


# --dtype's choices (merge, extract, resize, combine) as safetensors codes.
OUTPUT_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def dtype_name_of(code: str) -> str:
    """torch's name of a safetensors dtype ("BF16" -> "bfloat16"), as config.json's torch_dtype."""
    return _TORCH_NAMES[code]


def output_dtype(dtype: str, stored):
    """The written factors' torch dtype: --dtype, or (auto) the input's floating dtype."""
    import torch

    if dtype == "auto":
        return (
            stored
            if stored in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            else torch.float32
        )
    if dtype not in OUTPUT_DTYPES:
        raise OptionError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    return torch_dtype_of(OUTPUT_DTYPES[dtype])


def torch_dtype_of(code: str):
    """The torch dtype for a safetensors dtype code; CheckpointError when torch has none."""
    import torch

    name = _TORCH_NAMES.get(code)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise CheckpointError(f"dtype {code} cannot be loaded into a torch tensor by this torch version")
    return dtype


def dtype_code_of(dtype) -> str:
    """The safetensors dtype code for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise CheckpointError(f"torch dtype {dtype} has no safetensors code")


def byte_size(code: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype and shape takes on disk."""
    bits = DTYPE_BITS[code] * math.prod(shape)
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file and absolute byte range [start, end)."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset in `file`; -1 for tensors of a pickle (.bin) checkpoint
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)

    @property
    def torch_dtype(self):
        return torch_dtype_of(self.dtype)

    # A logical tensor decoded from quantization codes (io.quantization.DequantizedInfo) overrides these.
    @property
    def dequantized(self) -> bool:
        """Whether `read` decodes it from codes: then it has no bytes of its own (start = end = -1)."""
        return False

    @property
    def position(self) -> int:
        """Where it lies in `file`, to read a checkpoint in file order."""
        return self.start

    @property
    def plain_dtype(self) -> str:
        """The dtype an unquantized checkpoint of the model stores it in (merge's --dtype auto)."""
        return self.dtype


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]
    data_start: int  # absolute offset of the data section


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file, reading no tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {file_size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {header_len} exceeds "
                    f"{MAX_HEADER_BYTES} bytes)"
                )
            if 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file (header of {header_len} bytes, "
                    f"file of {file_size} bytes)"
                )
            raw = f.read(header_len)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    return parse_safetensors_header(path, raw, file_size)


def parse_safetensors_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header bytes `raw` of a file of `file_size` bytes (split out for fuzzing)."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: malformed safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: malformed safetensors header (__metadata__ must map str to str)")

    data_size = file_size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 ≤ begin ≤ end")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the file's {data_size} data bytes"
            )
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8 or bits // 8 != end - begin:
            raise CheckpointError(
                f"{where}: {dtype} {tuple(shape)} needs {bits / 8:g} bytes but data_offsets span "
                f"{end - begin}"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end))

    tensors.sort(key=lambda t: (t.start, t.end))
    for previous, current in zip(tensors, tensors[1:]):
        if current.start < previous.end and current.start != current.end:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {current.name!r} overlap in the file"
            )
    return SafetensorsHeader(path, {t.name: t for t in tensors}, dict(metadata), data_start)


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length prefix + JSON padded with spaces to 8 bytes) for `entries`."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    header.update(entries)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text
