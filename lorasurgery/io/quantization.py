"""Quantized checkpoints, recognised from their config or their tensors, so codes are never read as
weights (docs/design.md §13).

A quantized checkpoint stores codes and the scales that decode them, not weights: adding ΔW to FP8
codes, or taking the SVD of NF4 bytes, "works" and means nothing. `recognise` looks only at what
opening a checkpoint already has — tensor names, dtypes, shapes, config.json's `quantization_config`
(or an old GPTQ/AWQ repo's `quantize_config.json` / `quant_config.json`) — and says which format it
is and, per logical weight, which stored tensors hold its codes and which decode them. A format with
a dequantizing reader is listed in READABLE (its reader turns the index into logical tensors: io.fp8
for transformers' fine-grained FP8, io.mxfp4, io.compressed, io.bnb for the others); every other one is refused by `refusal`, naming the file, the
format and a tensor that shows it.

Signals read from the tensors alone (<x> a stored tensor, <m> a module; the names transformers,
compressed-tensors and bitsandbytes save):

  <x> float8 + <x>_scale_inv                        FP8, transformers' fine-grained (DeepSeek-style)
  <x> float8 + <x>_scale                            FP8 with multiplier scales (compressed-tensors
                                                    float-quantized, fbgemm)
  <m>.weight_packed (+ weight_scale, weight_shape,  compressed-tensors pack-quantized / nvfp4 /
    weight_zero_point, weight_global_scale)         mxfp4-pack-quantized
  <x>_blocks uint8 + <x>_scales                     MXFP4 as gpt-oss stores its experts
  <w>.absmax, .quant_map, .nested_absmax,           bitsandbytes 4-bit (NF4 / FP4 from the
    .quant_state.bitsandbytes__nf4|fp4              quant_state's name)
  <m>.SCB (+ <m>.weight_format) beside int8 weight  bitsandbytes int8
  <m>.qweight (+ qzeros, scales, g_idx)             GPTQ (with g_idx) / AWQ (without)
  <m>.W_q                                           HQQ
  integer <m>.weight + <m>.weight_scale(s) / .scales  integer codes (compressed-tensors int-quantized,
                                                    EETQ, MLX …)
  any other float8 / sub-byte / E8M0 tensor,        codes without a scale beside them: no
    any other integer <…>.weight, uint8 <x>_blocks  ordinary model stores weights so

A float payload never counts, whatever its name (LayerScale's `…scale`, a norm's weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.io.safetensors_format import TensorInfo, dtype_name_of

FLOAT8 = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_ONLY = frozenset({"F8_E8M0"})  # UE8M0 exponents: only ever scales
SUB_BYTE = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
INTEGER = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"})
CODES = FLOAT8 | SCALE_ONLY | SUB_BYTE

# Formats that have a dequantizing reader (io.readers: io.fp8, io.mxfp4, io.compressed, io.bnb); every
# other one is refused. bitsandbytes-4bit: NF4 or FP4 as each tensor's quant_state says.
READABLE: frozenset[str] = frozenset(
    {
        "fp8",
        "mxfp4",
        "compressed-tensors",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "bitsandbytes-4bit",
        "bitsandbytes-int8",
    }
)
READ_FORMATS = (  # as messages say it
    "transformers' fine-grained FP8 (float8 codes with weight_scale_inv), gpt-oss's MXFP4 experts "
    "(uint8 _blocks with _scales), compressed-tensors (float-, int-, pack- and nvfp4-pack-quantized, "
    "with their quantization_config) and bitsandbytes NF4, FP4 and int8 as transformers saves them"
)

# Format -> the name messages give it; a quant_method not listed here is shown as it is.
FORMAT_NAMES = {
    "fp8": "FP8",
    "fp8-scale": "FP8",  # float8 codes with a multiplier `_scale`: compressed-tensors', fbgemm's naming
    "fbgemm-fp8": "FBGEMM FP8",
    "compressed-tensors": "compressed-tensors",
    "mxfp4": "MXFP4",
    "bitsandbytes-nf4": "bitsandbytes NF4",
    "bitsandbytes-fp4": "bitsandbytes FP4",
    "bitsandbytes-4bit": "bitsandbytes 4-bit",
    "bitsandbytes-int8": "bitsandbytes int8",
    "bitsandbytes": "bitsandbytes",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "hqq": "HQQ",
    "gguf": "GGUF",
    "mlx": "MLX",
    "int": "integer",
    "float8": "float8",
    "codes": "sub-byte or E8M0",
}

# torch dtype names (config.json's torch_dtype/dtype, a bitsandbytes quant_state) -> safetensors codes
PLAIN_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# Side files old GPTQ / AutoAWQ repos ship instead of a quantization_config, and their format.
SIDE_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}

DESIGN = "docs/design.md §13"


@dataclass(frozen=True)
class QuantizedTensor:
    """One logical tensor stored quantized: the stored tensor of its codes and those that decode them."""

    logical: str  # the tensor the model sees, e.g. model.layers.0.self_attn.q_proj.weight
    format: str  # a FORMAT_NAMES key, as the tensors alone show it
    codes: str  # the stored tensor holding the codes (the logical name itself for FP8 or bnb)
    parts: tuple[tuple[str, str], ...] = ()  # (role, stored name): ("scale_inv", "<x>_scale_inv") …
    scheme: str | None = None  # what the tensors show of the layout: "block", "tensor", "channel",
    # "nf4", "pack-quantized", "nvfp4-pack-quantized", "unscaled" …

    def part(self, role: str) -> str | None:
        """The stored name of part `role` ("scale_inv", "absmax", "qzeros" …), or None."""
        return next((name for r, name in self.parts if r == role), None)

    @property
    def stored(self) -> tuple[str, ...]:
        """Every stored tensor this logical tensor is made of."""
        return (self.codes, *(name for _, name in self.parts))


@dataclass(frozen=True)
class Quantization:
    """What made a checkpoint quantized: the declared config, the tensors, or both."""

    format: str  # a FORMAT_NAMES key, or the declared quant_method when lorasurgery knows no better
    quant_method: str | None = None  # as declared; None when only the tensors say so
    source: str | None = None  # what declared it: "quantization_config", "quantize_config.json" …
    config: dict | None = field(default=None, compare=False)  # the declaration as found
    tensors: tuple[QuantizedTensor, ...] = ()  # every logical tensor stored quantized, in file order

    @property
    def name(self) -> str:
        """The format as messages say it ("FP8", "bitsandbytes NF4", "GPTQ" …)."""
        return FORMAT_NAMES.get(self.format, self.format)

    @property
    def readable(self) -> bool:
        return self.format in READABLE

    @property
    def block_size(self) -> tuple[int, ...] | None:
        """The declared weight_block_size (fine-grained FP8), else None."""
        size = (self.config or {}).get("weight_block_size")
        if isinstance(size, list) and size and all(isinstance(n, int) for n in size):
            return tuple(size)
        return None

    @property
    def stored_names(self) -> frozenset[str]:
        """Every stored tensor that holds codes or decodes them."""
        return frozenset(name for t in self.tensors for name in t.stored)

    def declaration(self) -> str | None:
        """How the config declares it: 'quantization_config quant_method "fp8"', or None."""
        if self.source is None:
            return None
        text = f'{self.source} quant_method "{self.quant_method}"'
        layout = (self.config or {}).get("format")
        if isinstance(layout, str):  # compressed-tensors: float-quantized, pack-quantized …
            text += f', format "{layout}"'
        return text


@dataclass(frozen=True)
class DequantizedInfo(TensorInfo):
    """A logical tensor of a quantized checkpoint as every command sees it (docs/design.md §13).

    `dtype` is F32, what Checkpoint.read returns: the exact product of codes and scales, so every
    consumer that derives a precision or a buffer from the dtype meets the tensor it reads.
    `start` and `end` are -1: it has no bytes of its own, so nothing can byte-copy the codes as if
    they were the tensor (every raw path already treats a negative start as "read it"). `file` is
    the file of its codes, `position` their offset, `plain_dtype` the dtype the model declares
    (config.json's torch_dtype/dtype, else bf16): what an unquantized checkpoint of it stores."""

    format: str = ""  # a READABLE key
    codes: TensorInfo | None = None
    parts: tuple[tuple[str, TensorInfo], ...] = ()  # (role, stored tensor): ("scale_inv", …) …
    block: tuple[int, int] | None = None  # rows × columns one scale covers; None: one per tensor
    scale_fmt: str | None = None  # "ue8m0": the scales are powers of two
    model_dtype: str = "BF16"
    scheme: object = None  # what else the format's reader needs to decode it (its own frozen value)

    @classmethod
    def of(cls, name: str, shape, codes: TensorInfo, **fields) -> DequantizedInfo:
        """The logical tensor `name` of `shape` decoded from `codes`: F32, no bytes of its own (start
        and end -1), in the file of its codes; `fields` the format's own (format, parts, scheme …)."""
        return cls(name, "F32", tuple(shape), codes.file, -1, -1, codes=codes, **fields)

    @property
    def dequantized(self) -> bool:
        return True

    @property
    def position(self) -> int:
        return self.codes.start if self.codes is not None else -1

    @property
    def plain_dtype(self) -> str:
        return self.model_dtype

    def part(self, role: str) -> TensorInfo | None:
        """The stored tensor of part `role`, or None."""
        return next((info for r, info in self.parts if r == role), None)


@dataclass(frozen=True)
class Rows:
    """A 2-D logical tensor decoded a band of rows at a time, so that its float32 copy is never whole
    (the merge kernel decodes each band into the buffer it merges in: docs/design.md §13, "Decoding
    in bands"). `fill(start, stop, out)` writes rows start:stop, float32 exactly as the format's
    `dequantize` gives them, into `out` (float32, (stop − start, columns), on any device) and
    returns it; `whole()` decodes the tensor at once, for callers that need all of it."""

    shape: tuple[int, int]
    fill: Callable
    whole: Callable


@dataclass
class BandQuantizer:
    """A 2-D logical tensor being requantized band by band (`merge --requantize`, docs/design.md
    §13): `band(start, stop, merged, after)` encodes rows start:stop of the merged float32 tensor
    into `stored` (start and stop multiples of `multiple`, the rows a scale covers, or the tensor's
    end) and writes deq(W′) of those rows into `after` (float32, the same shape); once every band
    is done, `stored` holds what the format's `quantize` returns and `codes` names its codes.

    `measured(start, stop, base, merged, old codes, row scratch)`, where a format has it, does
    `band`'s encoding and linalg.requantize's sums of the same rows in one native pass: (kept,
    update, codes changed), or None when it cannot take them (then `band` runs)."""

    multiple: int
    band: Callable
    stored: dict
    codes: str
    measured: Callable | None = None


def model_dtype(config: Mapping | None, default: str = "BF16") -> str:
    """The dtype the model declares (config.json's torch_dtype, or transformers 5's dtype), else
    `default`: what an unquantized checkpoint of it stores (DequantizedInfo.model_dtype)."""
    for key in ("torch_dtype", "dtype"):
        value = (config or {}).get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in PLAIN_DTYPES:
            return PLAIN_DTYPES[value.removeprefix("torch.")]
    return default


def declared(config: Mapping | None, side_configs: Mapping[str, Mapping] | None = None):
    """(quant_method, source, declaration) when config.json or a side file declares quantization."""
    if isinstance(config, Mapping):
        for key in ("quantization_config", "compression_config"):  # the latter: early compressed-tensors
            value = config.get(key)
            if isinstance(value, Mapping) and value:
                method = value.get("quant_method")
                if not isinstance(method, str) or not method:
                    method = "compressed-tensors" if "config_groups" in value else "unknown"
                return method, key, dict(value)
        value = config.get("quantization")  # MLX writes {"group_size": 64, "bits": 4}
        if isinstance(value, Mapping) and "bits" in value:
            return "mlx", "quantization", dict(value)
    for file, default in SIDE_CONFIGS.items():
        if side_configs and file in side_configs:
            value = side_configs[file]
            method = value.get("quant_method") if isinstance(value, Mapping) else None
            qconfig = dict(value) if isinstance(value, Mapping) else {}
            return (method if isinstance(method, str) and method else default), file, qconfig
    return None


def declares_unreadable_quantization(config: Mapping | None) -> bool:
    """Whether config.json alone declares a quantized format that has no reader (refused at open)."""
    declaration = declared(config)
    return declaration is not None and _declared_format(declaration[0], declaration[2]) not in READABLE


def _declared_format(method: str, config: Mapping) -> str:
    method = method.lower()
    if method == "bitsandbytes":
        if config.get("load_in_4bit") or config.get("_load_in_4bit"):
            kind = config.get("bnb_4bit_quant_type")
            return f"bitsandbytes-{kind}" if kind in ("nf4", "fp4") else "bitsandbytes-4bit"
        if config.get("load_in_8bit") or config.get("_load_in_8bit"):
            return "bitsandbytes-int8"
        return "bitsandbytes"
    return {"fbgemm_fp8": "fbgemm-fp8"}.get(method, method)


# ------------------------------------------------------------------------------------------------
# Recognition from tensors


def _siblings(tensors: Mapping[str, TensorInfo], stem: str, roles: dict[str, str]) -> tuple:
    """((role, stem + suffix), …) for each suffix present."""
    return tuple((role, stem + suffix) for role, suffix in roles.items() if stem + suffix in tensors)


def _scale_layout(codes: TensorInfo, scale: TensorInfo) -> str:
    # A 1×1 grid of one 128×128 block is still "block" (a small weight of a block-quantized model).
    if scale.numel == 1 and len(scale.shape) < len(codes.shape):
        return "tensor"
    if codes.shape and codes.shape[0] > 1 and scale.shape in ((codes.shape[0],), (codes.shape[0], 1)):
        return "channel"
    return "block"


def _module(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


def _activation_parts(tensors, name: str) -> tuple:
    # Static activation scales ride along with the weight's module; they decode nothing of W but go
    # wherever its codes go (a byte-identical copy, a requantized write).
    if not name.endswith(".weight"):
        return ()
    module = _module(name, ".weight")
    return _siblings(
        tensors, module, {"activation_scale": ".activation_scale", "input_scale": ".input_scale"}
    )


def _packed(tensors):
    for name in tensors:
        if name.endswith(".weight_packed"):
            module = _module(name, ".weight_packed")
            parts = _siblings(
                tensors,
                module,
                {
                    "scale": ".weight_scale",
                    "global_scale": ".weight_global_scale",
                    "zero_point": ".weight_zero_point",
                    "shape": ".weight_shape",
                    "g_idx": ".weight_g_idx",
                },
            )
            scale = tensors.get(module + ".weight_scale")
            if module + ".weight_global_scale" in tensors:
                scheme = "nvfp4-pack-quantized"
            elif scale is not None and scale.dtype in ("U8", "F8_E8M0"):
                scheme = "mxfp4-pack-quantized"
            else:
                scheme = "pack-quantized"
            parts += _activation_parts(tensors, module + ".weight")
            yield QuantizedTensor(module + ".weight", "compressed-tensors", name, parts, scheme)


def _gpt_oss_mxfp4(tensors):
    for name, info in tensors.items():
        if (
            name.endswith("_blocks")
            and info.dtype == "U8"
            and _module(name, "_blocks") + "_scales" in tensors
        ):
            logical = _module(name, "_blocks")
            yield QuantizedTensor(logical, "mxfp4", name, (("scales", logical + "_scales"),), "e2m1")


def _bnb_4bit(tensors):
    for name in tensors:
        if name.endswith(".absmax") and not name.endswith(".nested_absmax"):
            weight = _module(name, ".absmax")
            if weight not in tensors:
                continue
            parts = _siblings(
                tensors,
                weight,
                {
                    "absmax": ".absmax",
                    "quant_map": ".quant_map",
                    "nested_absmax": ".nested_absmax",
                    "nested_quant_map": ".nested_quant_map",
                },
            )
            kind = next(
                (k for k in ("nf4", "fp4") if f"{weight}.quant_state.bitsandbytes__{k}" in tensors), None
            )
            if kind is not None:
                parts += (("quant_state", f"{weight}.quant_state.bitsandbytes__{kind}"),)
            fmt = f"bitsandbytes-{kind}" if kind else "bitsandbytes-4bit"
            yield QuantizedTensor(weight, fmt, weight, parts, kind)


def _bnb_int8(tensors):
    for name in tensors:
        if name.endswith(".SCB"):
            module = _module(name, ".SCB")
            weight = tensors.get(module + ".weight")
            if weight is not None and weight.dtype in INTEGER:
                parts = (("SCB", name),) + _siblings(tensors, module, {"weight_format": ".weight_format"})
                yield QuantizedTensor(
                    module + ".weight", "bitsandbytes-int8", module + ".weight", parts, "int8"
                )


def _gptq_awq(tensors):
    for name, info in tensors.items():
        if name.endswith(".qweight") and info.dtype in INTEGER:
            module = _module(name, ".qweight")
            parts = _siblings(tensors, module, {"qzeros": ".qzeros", "scales": ".scales", "g_idx": ".g_idx"})
            fmt = "gptq" if module + ".g_idx" in tensors else "awq"
            yield QuantizedTensor(module + ".weight", fmt, name, parts)


def _hqq(tensors):
    for name in tensors:
        if name.endswith(".W_q"):
            module = _module(name, ".W_q")
            parts = _siblings(tensors, module, {"scale": ".scale", "zero": ".zero", "meta": ".meta"})
            yield QuantizedTensor(module + ".weight", "hqq", name, parts)


def _fp8(tensors):
    # `_scale_inv` is transformers' fine-grained FP8 (READABLE); `_scale` the naming of the formats
    # that store the same product under another convention, kept apart: read only where a
    # compressed-tensors quantization_config says how (io.compressed), refused without one.
    for name, info in tensors.items():
        if info.dtype not in FLOAT8:
            continue
        for suffix, role, fmt in (("_scale_inv", "scale_inv", "fp8"), ("_scale", "scale", "fp8-scale")):
            scale = tensors.get(name + suffix)
            if scale is not None:
                parts = ((role, name + suffix),) + _activation_parts(tensors, name)
                yield QuantizedTensor(name, fmt, name, parts, _scale_layout(info, scale))
                break


def _integer(tensors):
    for name, info in tensors.items():
        if info.dtype not in INTEGER or not name.endswith(".weight"):
            continue
        module = _module(name, ".weight")
        scales = _siblings(
            tensors,
            module,
            {"scale": ".weight_scale", "scales": ".weight_scales", "group_scales": ".scales"},
        )
        if scales:
            parts = scales + _siblings(
                tensors,
                module,
                {"zero_point": ".weight_zero_point", "biases": ".biases", "qbiases": ".qbiases"},
            )
            parts += _activation_parts(tensors, name)
            yield QuantizedTensor(name, "int", name, parts)


# The most specific layouts first: each claims its tensors, so that, e.g., an NVFP4 packed weight's
# float8 scales are not mistaken for FP8 weights.
_MATCHERS = (_packed, _gpt_oss_mxfp4, _bnb_4bit, _bnb_int8, _gptq_awq, _hqq, _fp8, _integer)


def _unscaled(tensors, claimed: set[str]):
    for name, info in tensors.items():
        if name in claimed:
            continue
        if info.dtype in CODES:
            yield QuantizedTensor(name, "float8" if info.dtype in FLOAT8 else "codes", name, (), "unscaled")
        elif info.dtype in INTEGER and name.endswith(".weight"):
            yield QuantizedTensor(name, "int", name, (), "unscaled")
        elif info.dtype == "U8" and name.endswith("_blocks"):  # MXFP4 blocks whose scales are missing
            yield QuantizedTensor(_module(name, "_blocks"), "mxfp4", name, (), "unscaled")


def quantized_tensors(tensors: Mapping[str, TensorInfo]) -> tuple[QuantizedTensor, ...]:
    """Every logical tensor the stored tensors show to be quantized, in the checkpoint's order."""
    found: list[QuantizedTensor] = []
    claimed: set[str] = set()
    for matcher in _MATCHERS:
        for tensor in matcher(tensors):
            if claimed.isdisjoint(tensor.stored):
                found.append(tensor)
                claimed.update(tensor.stored)
    found.extend(_unscaled(tensors, claimed))
    order = {name: i for i, name in enumerate(tensors)}
    return tuple(sorted(found, key=lambda t: order[t.codes]))


def recognise(
    config: Mapping | None,
    tensors: Mapping[str, TensorInfo],
    side_configs: Mapping[str, Mapping] | None = None,
) -> Quantization | None:
    """What makes this checkpoint quantized, or None for a plain one.

    `config` is config.json, `tensors` the header index, `side_configs` {file name: JSON} of the
    SIDE_CONFIGS files present. A declared quant_method decides the format; the tensors decide it
    when nothing is declared."""
    found = quantized_tensors(tensors)
    declaration = declared(config, side_configs)
    if declaration is not None:
        method, source, qconfig = declaration
        return Quantization(_declared_format(method, qconfig), method, source, qconfig, found)
    if not found:
        return None
    scaled = next((t for t in found if t.scheme != "unscaled"), found[0])
    return Quantization(scaled.format, tensors=found)


# ------------------------------------------------------------------------------------------------
# Refusal


# The readers' messages for a layout whose parts do not fit together (io/fp8.py, bnb.py, mxfp4.py):
# one wording, so that every format names the file, the tensor and what is missing the same way.


def foreign_tensor(t: QuantizedTensor, tensors: Mapping[str, TensorInfo], declared: str) -> CheckpointError:
    """A quantized tensor of another kind than the checkpoint's `declared` format."""
    info = tensors[t.codes]
    return CheckpointError(
        f"{info.file}: tensor {t.logical} ({_evidence(t, tensors)}) contradicts the checkpoint's {declared}"
    )


def unscaled_codes(
    t: QuantizedTensor, tensors: Mapping[str, TensorInfo], missing: str, lost: str
) -> CheckpointError:
    """Codes with nothing beside them: the part `missing` that decodes them is lost (`lost` says what)."""
    info = tensors[t.codes]
    return CheckpointError(
        f"{info.file}: tensor {t.logical} holds {dtype_name_of(info.dtype)} codes with no {missing} "
        f"beside them: {lost}"
    )


def orphan_part(
    tensors: Mapping[str, TensorInfo], name: str, codes_name: str, role: str, codes_are: str
) -> CheckpointError:
    """A stored part (`role` of `codes_name`) that decodes nothing: its codes are missing, or hold
    plain values although the part says they are `codes_are`."""
    codes = tensors.get(codes_name)
    if codes is None:
        return CheckpointError(
            f"{tensors[name].file}: tensor {name} is {role} of {codes_name}, which the checkpoint does not have"
        )
    return CheckpointError(
        f"{codes.file}: tensor {codes.name} holds {dtype_name_of(codes.dtype)} values, but {name} "
        f"beside it says they are {codes_are}"
    )


def _dtype_name(code: str) -> str:
    try:
        return dtype_name_of(code)
    except KeyError:
        return code


def _evidence(tensor: QuantizedTensor, tensors: Mapping[str, TensorInfo]) -> str:
    """'float8_e4m3fn codes with weight_scale_inv' — names relative to the logical tensor's module."""
    module = tensor.logical.rpartition(".")[0]

    def short(name: str) -> str:
        return name[len(module) + 1 :] if module and name.startswith(module + ".") else name

    text = f"{_dtype_name(tensors[tensor.codes].dtype)} codes"
    if tensor.codes != tensor.logical:
        text += f" in {short(tensor.codes)}"
    scales = [short(name) for role, name in tensor.parts if role not in ("activation_scale", "input_scale")]
    if scales:
        text += " with " + ", ".join(scales)
    elif tensor.scheme == "unscaled":
        text += " with no scale beside them"
    return text


def refusal(
    quantization: Quantization,
    tensors: Mapping[str, TensorInfo],
    where: str | Path,
) -> UnsupportedError:
    """The error for a checkpoint whose format has no reader: the file, the format, a tensor that
    shows it, and what lorasurgery reads. `where` names the checkpoint when no tensor shows it."""
    reasons = []
    evidence = quantization.tensors[0] if quantization.tensors else None
    if evidence is not None:
        reasons.append(_evidence(evidence, tensors))
    declaration = quantization.declaration()
    if declaration is not None:
        reasons.append(declaration)
    because = "; ".join(reasons)
    if evidence is not None:
        subject = f"{tensors[evidence.codes].file}: tensor {evidence.logical}"
        if evidence.scheme == "unscaled" and quantization.source is None:
            what = "holds quantization codes, not weights"
        else:
            what = f"is {quantization.name}-quantized"
    else:
        subject = f"{where}:"
        what = f"declares {quantization.name} quantization, but no tensor holds its codes"
    return UnsupportedError(
        f"{subject} {what} ({because}); lorasurgery reads {READ_FORMATS} but not this format yet, "
        f"and never reads codes as weights — dequantize the model first ({DESIGN})"
    )


def mean_square(x) -> float:
    """mean(x²) of a float32 tensor, x squared in place, its rows summed in float32 then in float64."""
    if x.numel() == 0:
        return 0.0
    x = x.square_().reshape(x.shape[0] if x.dim() else 1, -1)
    return float(x.sum(dim=1).double().sum()) / x.numel()


# ------------------------------------------------------------------------------------------------
# Scale checks, shared by the readers


def check_scales(info, stored: TensorInfo, values, good, what: str) -> None:
    """CheckpointError naming the scale tensor `stored` when `good` (a bool tensor shaped like
    `values`, the scales as read) is not all true: how many scales are `what`, the first's index and
    value, and the logical tensor `info` that cannot be decoded."""
    if bool(good.all()):
        return
    flat = good.reshape(-1)
    first = int((~flat).nonzero()[0, 0])
    index = list(unravel(first, tuple(good.shape)))
    value = values.reshape(-1)[first].item()
    raise CheckpointError(
        f"{stored.file}: tensor {stored.name}: {int((~flat).sum())} of {flat.numel()} scales are {what} "
        f"(the first at {index}: {value!r}); {info.name} cannot be decoded"
    )


def unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    """The multi-index of flat `index` in a row-major tensor of `shape`."""
    out = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        out.append(rest)
    return out[::-1]
