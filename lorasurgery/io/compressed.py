"""compressed-tensors checkpoints (llm-compressor's output, vLLM's native format), read dequantized
through the compressed-tensors package itself (docs/design.md §13).

config.json declares `quantization_config: {"quant_method": "compressed-tensors", "format": …,
"config_groups": {name: {"targets": […], "weights": {num_bits, type, strategy, group_size,
block_structure, symmetric …}, "format": …}}, "ignore": […]}`. Each module a group targets (and
`ignore` does not name) stores, under its own name (<m> the module):

  float-quantized   <m>.weight float8_e4m3fn, <m>.weight_scale (tensor: [1]; channel: [out, 1];
                    group: [out, in/g]; block: [⌈out/bh⌉, ⌈in/bw⌉])
  int-quantized     <m>.weight int8, <m>.weight_scale as above, <m>.weight_zero_point when asymmetric
  (naive-quantized  either of the two, the older name)
  pack-quantized    <m>.weight_packed int32 (32/num_bits codes a word), <m>.weight_shape [out, in],
                    <m>.weight_scale, <m>.weight_zero_point packed along the rows when asymmetric
  nvfp4-pack-       <m>.weight_packed uint8 (two e2m1 codes a byte, low nibble first), <m>.weight_scale
  quantized         float8_e4m3fn per 16 columns, <m>.weight_global_scale float32 [1]

Which scheme a module has is decided by the package's own name matching
(`match_quantizable_tensors`: "Linear" or an exact/"re:" target, minus `ignore`), the first group
that claims it winning, its format the group's own `format`, else the config's, else what the
package infers (`infer_module_format`). The decode is the package's: its compressor's
`decompress` (naive and pack formats) or its `unpack_fp4_from_uint8` + `dequantize` (NVFP4),
called with the scales converted to float32, so the result is the float32 product the package
computes — one rounding per element — where the package, called on the stored scales, computes in
the scales' dtype (bf16 as llm-compressor saves them). Rounding ours to that dtype gives theirs bit
for bit (the product of a code and a bf16 scale is exact in float32).

`logical_index` checks on headers, at open: the config parses as the package's QuantizationConfig,
every format is one read here, every quantized tensor's module has a scheme, every compression
parameter its compressor names is stored, the codes' dtype is what the scheme makes, each scale's
shape is the scheme's. `dequantize` checks the scales it reads (NaN, infinite or zero: the tensor
cannot be decoded). The package is imported only here and only when a compressed-tensors
checkpoint is opened: `lorasurgery --help` and every plain checkpoint stay free of it (and of
torch).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.io.quantization import DequantizedInfo, Quantization, _evidence, check_scales
from lorasurgery.io.quantization import model_dtype as _model_dtype
from lorasurgery.io.safetensors_format import TensorInfo, dtype_code_of, dtype_name_of, torch_dtype_of

# The formats read here; every other compressed-tensors format is refused by name.
NAIVE = ("float-quantized", "int-quantized", "naive-quantized")
FORMATS = (*NAIVE, "pack-quantized", "nvfp4-pack-quantized")
INSTALL = "pip install compressed-tensors"  # or lorasurgery's `quantized` extra
_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E4M3")


@dataclass(frozen=True)
class Scheme:
    """What `dequantize` needs of one module's scheme: its format and its QuantizationScheme (as JSON,
    so the DequantizedInfo stays hashable; parsed once per distinct scheme)."""

    format: str
    scheme_json: str


def _package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as error:
        raise UnsupportedError(
            f"reading a compressed-tensors checkpoint needs the compressed-tensors package, the "
            f"format's own implementation: {INSTALL} (or lorasurgery[quantized]) ({error})"
        ) from None


@functools.lru_cache(maxsize=64)
def _scheme(scheme_json: str):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme.model_validate_json(scheme_json)


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them, in file order; CheckpointError (or
    UnsupportedError) naming the file and tensor when the compressed-tensors layout is broken."""
    where = f"{folder / 'config.json'}: quantization_config"
    if quantization.source is None:
        _refuse_without_config(quantization, tensors, folder)
    _package()
    from compressed_tensors.utils.match import match_quantizable_tensors

    qconfig = _parse_config(quantization.config, where)
    model_dtype = _model_dtype(config)
    logical: dict[str, TensorInfo] = {}
    hidden: set[str] = set(quantization.stored_names)
    for t in quantization.tensors:
        info, extra = _logical_tensor(t, tensors, qconfig, quantization.config.get("format"), model_dtype)
        hidden.update(extra)
        logical[t.codes] = info
    _check_orphans(tensors, hidden, qconfig, match_quantizable_tensors)
    # Each logical tensor at its codes' place, under its own name (<m>.weight, not <m>.weight_packed).
    index: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in logical:
            index[logical[name].name] = logical[name]
        elif name not in hidden:
            index[name] = info
    return index


def _refuse_without_config(quantization: Quantization, tensors: Mapping[str, TensorInfo], folder: Path):
    t = quantization.tensors[0]
    info = tensors[t.codes]
    raise UnsupportedError(
        f"{info.file}: tensor {t.logical} is compressed-tensors-quantized ({_evidence(t, tensors)}), "
        f"but {folder / 'config.json'} has no quantization_config to say its scheme (strategy, "
        f"group size, symmetry); lorasurgery reads compressed-tensors checkpoints with the config "
        f"llm-compressor saves beside them — restore it (docs/design.md §13)"
    )


def _logical_tensor(
    t, tensors: Mapping[str, TensorInfo], qconfig, top, model_dtype
) -> tuple[DequantizedInfo, list]:
    """One quantized weight: the group that claims it, its format, its stored compression parameters
    and its other stored qparams, checked against the scheme; and the names of those other qparams
    (hidden from the index too)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationMetadata

    codes = tensors[t.codes]
    module, _, codes_param = t.codes.rpartition(".")
    group, scheme = _claiming_group(t, tensors, qconfig)
    fmt = _module_format(t, codes, group, scheme, top)
    scheme = scheme.model_copy(update={"format": fmt})
    names = BaseCompressor.get_value_from_registry(fmt).compression_param_names(scheme)
    if codes_param != names[0]:
        raise CheckpointError(
            f"{codes.file}: tensor {t.codes} holds {dtype_name_of(codes.dtype)} codes, but "
            f'config_groups.{group} stores {module} as "{fmt}", whose codes are {module}.{names[0]}'
        )
    parts = _compression_parts(t, tensors, names[1:], group, fmt, scheme)
    shape = _check(fmt, scheme, codes, parts, group)
    extra = tuple(
        (p, tensors[f"{module}.{p}"])
        for p in sorted(QuantizationMetadata.all_qparam_names())
        if f"{module}.{p}" in tensors and p not in parts and p != names[0]
    )
    info = DequantizedInfo.of(
        t.logical,
        shape,
        codes,
        format="compressed-tensors",
        parts=tuple(parts.items()) + extra,
        model_dtype=model_dtype,
        scheme=Scheme(fmt, scheme.model_dump_json()),
    )
    return info, [stored.name for _, stored in extra]


def _claiming_group(t, tensors: Mapping[str, TensorInfo], qconfig) -> tuple[str, object]:
    """(name, scheme) of the first config group whose weights target the module, as the package matches."""
    from compressed_tensors.utils.match import match_quantizable_tensors

    for group, scheme in qconfig.config_groups.items():
        if scheme.weights is None:
            continue
        if next(match_quantizable_tensors({t.codes: None}, qconfig.ignore, scheme.targets, ["re:.*"]), None):
            return group, scheme
    module = t.codes.rpartition(".")[0]
    raise CheckpointError(
        f"{tensors[t.codes].file}: tensor {t.logical} is stored quantized ({_evidence(t, tensors)}), but no "
        f"config_groups entry of quantization_config targets {module} (or `ignore` names it), so "
        f"its scheme is unknown"
    )


def _module_format(t, codes: TensorInfo, group: str, scheme, top) -> str:
    """The group's own format, else the config's, else what the package infers; one read here."""
    from compressed_tensors.compressors.format import infer_module_format

    fmt = scheme.format or (top if top not in (None, "mixed-precision") else None)
    fmt = getattr(fmt, "value", fmt) or infer_module_format(_linear(), scheme)
    fmt = getattr(fmt, "value", fmt)
    if fmt not in FORMATS:
        raise UnsupportedError(
            f"{codes.file}: tensor {t.logical}: compressed-tensors format {fmt!r} (config_groups."
            f"{group}); lorasurgery reads {', '.join(FORMATS)} but not this one yet, and never reads "
            f"codes as weights — dequantize the model first (docs/design.md §13)"
        )
    return fmt


def _compression_parts(t, tensors: Mapping[str, TensorInfo], params, group: str, fmt: str, scheme) -> dict:
    """{param: stored tensor} of each compression parameter the compressor names beside the codes."""
    codes = tensors[t.codes]
    module = t.codes.rpartition(".")[0]
    parts = {}
    for param in params:
        if param.startswith("input_"):
            continue  # activation parameters decode nothing of W
        stored = tensors.get(f"{module}.{param}")
        if stored is None:
            raise CheckpointError(
                f"{codes.file}: tensor {t.logical}: {module}.{param} is missing — "
                f'config_groups.{group} ("{fmt}", strategy {_strategy(scheme)}) needs it to decode '
                f"{t.codes}; the checkpoint is incomplete"
            )
        parts[param] = stored
    if f"{module}.weight_g_idx" in tensors:
        raise UnsupportedError(
            f"{codes.file}: tensor {module}.weight_g_idx: activation-ordered groups (actorder "
            f'"group"), which compressed-tensors no longer decodes; lorasurgery reads them only '
            f"through it — dequantize the model first (docs/design.md §13)"
        )
    return parts


def _parse_config(settings: Mapping, where: str):
    """The package's QuantizationConfig of `settings`, after its formats are checked: CheckpointError
    for a config it cannot parse or a format it does not know, UnsupportedError for one not read here."""
    import pydantic
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig

    try:
        qconfig = QuantizationConfig.model_validate(dict(settings))
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        raise CheckpointError(
            f"{where}: is not a compressed-tensors quantization config: {'.'.join(map(str, first['loc']))}: "
            f"{first['msg']}"
        ) from None
    top = settings.get("format")
    known = {f.value for f in CompressionFormat}
    for name, fmt in [(None, top), *((g, s.format) for g, s in qconfig.config_groups.items())]:
        label = "format" if name is None else f"config_groups.{name}.format"
        if fmt is None or (fmt == "mixed-precision" and name is None):  # a format per group
            continue
        fmt = getattr(fmt, "value", fmt)
        if fmt not in known:
            raise CheckpointError(
                f"{where}: {label} {fmt!r} is not a compressed-tensors format (the package knows "
                f"{', '.join(sorted(known))})"
            )
        if fmt not in FORMATS and fmt != "dense":
            raise UnsupportedError(
                f"{where}: {label} {fmt!r}: lorasurgery reads the compressed-tensors formats "
                f"{', '.join(FORMATS)} but not this one yet, and never reads codes as weights — "
                f"dequantize the model first (docs/design.md §13)"
            )
    return qconfig


def _check_orphans(tensors: Mapping[str, TensorInfo], claimed: set[str], qconfig, match) -> None:
    """A `<m>.weight_scale` that decodes nothing: its module has no codes, or stores its weight as
    plain floats although a config group quantizes it (the codes replaced by a float weight)."""
    for name, info in tensors.items():
        if not name.endswith(".weight_scale") or name in claimed:
            continue
        module = name[: -len(".weight_scale")]
        weight = tensors.get(f"{module}.weight")
        if weight is None:
            raise CheckpointError(
                f"{info.file}: tensor {name} is the scale of {module}.weight, which the checkpoint does "
                f"not have (neither {module}.weight nor {module}.weight_packed)"
            )
        targeted = any(
            s.weights is not None
            and next(match({weight.name: None}, qconfig.ignore, s.targets, ["re:.*"]), None)
            for s in qconfig.config_groups.values()
        )
        if targeted:
            raise CheckpointError(
                f"{weight.file}: tensor {weight.name} holds {dtype_name_of(weight.dtype)} values, but "
                f"quantization_config quantizes {module} and {name} beside it says they are codes"
            )


def _linear():
    import torch

    return torch.nn.Linear


def _strategy(scheme) -> str:
    strategy = scheme.weights.strategy
    return getattr(strategy, "value", strategy)


def _check(fmt: str, scheme, codes: TensorInfo, parts: dict, group: str) -> tuple[int, ...]:
    """The logical shape, after the codes' dtype and each scale's shape are checked against the scheme."""
    args = scheme.weights
    _check_codes(fmt, args, codes, group)
    rows, cols = _logical_shape(fmt, args, codes, parts)
    strategy = _strategy(scheme)
    grid = _scale_grid(strategy, args, rows, cols, codes, group)
    scale = parts["weight_scale"]
    fits = tuple(scale.shape) == grid or (strategy == "tensor" and scale.numel == 1)
    if not fits:
        raise CheckpointError(
            f"{scale.file}: tensor {scale.name}: shape {list(scale.shape)} does not match the "
            f"{strategy} scales of {codes.name} (logical [{rows}, {cols}]) under config_groups.{group}: "
            f"it needs {list(grid)}"
        )
    if scale.dtype not in _SCALE_DTYPES:
        raise CheckpointError(
            f"{scale.file}: tensor {scale.name}: scales of dtype {dtype_name_of(scale.dtype)}; "
            f"compressed-tensors scales are float32, bfloat16, float16 or float8_e4m3fn"
        )
    global_scale = parts.get("weight_global_scale")
    if global_scale is not None and global_scale.numel != 1:
        raise CheckpointError(
            f"{global_scale.file}: tensor {global_scale.name}: shape {list(global_scale.shape)}; the "
            f"global scale of {codes.name} is one number"
        )
    zero = parts.get("weight_zero_point")
    if zero is not None:
        want = grid
        if fmt == "pack-quantized" and strategy in ("group", "channel"):
            want = (-(-grid[0] * args.num_bits // 32), grid[1])  # packed along the rows
        if tuple(zero.shape) != want and not (strategy == "tensor" and zero.numel == 1):
            raise CheckpointError(
                f"{zero.file}: tensor {zero.name}: shape {list(zero.shape)} does not match the "
                f"{strategy} zero points of {codes.name}: it needs {list(want)}"
            )
    return (rows, cols)


def _check_codes(fmt: str, args, codes: TensorInfo, group: str) -> None:
    """The codes' dtype is what the format stores for the scheme, and the scheme fits the format."""
    expected = {"pack-quantized": "I32", "nvfp4-pack-quantized": "U8"}.get(fmt)
    if fmt in NAIVE:  # the codes the package's quantize writes: the scheme's own dtype
        expected = dtype_code_of(args.pytorch_dtype())
    if codes.dtype != expected or len(codes.shape) != 2:
        raise CheckpointError(
            f"{codes.file}: tensor {codes.name} holds {dtype_name_of(codes.dtype)} codes of shape "
            f'{list(codes.shape)}, but config_groups.{group} ("{fmt}", {args.num_bits}-bit {args.type}) '
            f"stores {dtype_name_of(expected)} codes in a matrix"
        )
    kind = {"float-quantized": "float", "int-quantized": "int", "pack-quantized": "int"}.get(fmt)
    if kind is not None and args.type != kind or fmt == "nvfp4-pack-quantized" and args.num_bits != 4:
        raise CheckpointError(
            f"{codes.file}: tensor {codes.name}: config_groups.{group} declares {args.num_bits}-bit "
            f'{args.type} weights but format "{fmt}", which stores other codes; the config contradicts itself'
        )


def _logical_shape(fmt: str, args, codes: TensorInfo, parts: dict) -> tuple[int, int]:
    """(out, in) of the decoded weight: pack-quantized's stored weight_shape (checked against the
    packed codes), NVFP4's two codes a byte, else the codes' own shape."""
    rows, cols = codes.shape
    if fmt == "pack-quantized":
        shape_info = parts["weight_shape"]
        stored = _small_ints(shape_info)
        per_word = 32 // args.num_bits
        if stored is None or len(stored) != 2 or stored[0] != rows or -(-stored[1] // per_word) != cols:
            raise CheckpointError(
                f"{shape_info.file}: tensor {shape_info.name} is {stored}, which does not match "
                f"{codes.name} {list(codes.shape)} ({per_word} {args.num_bits}-bit codes an int32 word)"
            )
        cols = stored[1]
    elif fmt == "nvfp4-pack-quantized":
        cols *= 2
    return rows, cols


def _scale_grid(strategy: str, args, rows: int, cols: int, codes: TensorInfo, group: str) -> tuple[int, ...]:
    """The shape the scheme's scales have for a (rows, cols) weight."""
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (rows, 1)
    if strategy in ("group", "tensor_group"):
        return (rows, -(-cols // args.group_size))
    if strategy == "block":
        bh, bw = args.block_structure
        return (-(-rows // bh), -(-cols // bw))
    raise UnsupportedError(
        f"{codes.file}: tensor {codes.name}: weight strategy {strategy!r} (config_groups.{group}) is "
        f"not one compressed-tensors stores weights in; lorasurgery reads tensor, channel, group, "
        f"tensor_group and block (docs/design.md §13)"
    )


def _small_ints(info: TensorInfo) -> list[int] | None:
    """The values of a small integer tensor (weight_shape), read from the file without torch."""
    if info.start < 0 or info.dtype not in ("I64", "I32") or info.numel > 8:
        return None
    size = 8 if info.dtype == "I64" else 4
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    return [int.from_bytes(raw[i : i + size], "little", signed=True) for i in range(0, len(raw), size)]


def dequantize(info: DequantizedInfo, read):
    """The float32 tensor `info`, decoded by the compressed-tensors package from what `read` returns;
    CheckpointError naming the scale tensor when a scale is NaN, infinite or zero."""
    import torch

    scheme = _scheme(info.scheme.scheme_json)
    fmt = info.scheme.format
    state = {}
    for role, stored in info.parts:
        if role.startswith("input_") or role in ("output_scale", "output_zero_point"):
            continue
        value = read(stored)
        if role in ("weight_scale", "weight_global_scale"):
            value = _checked(value, stored, info)
        state[role] = value
    packed = read(info.codes)
    if fmt == "nvfp4-pack-quantized":
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
        from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

        rows, cols = packed.shape
        unpacked = unpack_fp4_from_uint8(packed, rows, cols * 2, dtype=torch.float32)
        return ct_dequantize(
            unpacked,
            state["weight_scale"],
            args=scheme.weights,
            dtype=torch.float32,
            global_scale=state.get("weight_global_scale"),
        )
    from compressed_tensors.compressors import BaseCompressor

    if fmt == "pack-quantized":
        if [int(n) for n in state["weight_shape"].tolist()] != list(info.shape):
            shape = info.part("weight_shape")
            raise CheckpointError(
                f"{shape.file}: tensor {shape.name} changed since the checkpoint was opened: "
                f"{state['weight_shape'].tolist()}, not {list(info.shape)}"
            )
        state["weight_shape"] = torch.Size(info.shape)
        state["weight_packed"] = packed
    else:
        state["weight"] = packed
    compressor = BaseCompressor.get_value_from_registry(fmt)
    W = compressor.decompress(state, scheme)["weight"]
    # A block scheme with partial edge blocks decodes a padded tensor and returns a slice of it.
    return W.to(torch.float32).contiguous()


def noise_variance(info: DequantizedInfo, read) -> float | None:
    """The mean, over the tensor, of the variance of the rounding its integer codes stand for:
    uniform rounding, step²/12 per element, the step being the scale of the element's tensor,
    channel, group or block (a zero point shifts the grid, not its spacing) — each scale weighted by
    the elements it covers, partial edge blocks included (docs/design.md §13, "Extracting from quantized pairs").
    None for float and NVFP4 codes (no noise model yet)."""
    import torch

    scheme = _scheme(info.scheme.scheme_json)
    args = scheme.weights
    if getattr(args.type, "value", args.type) != "int" or info.scheme.format == "nvfp4-pack-quantized":
        return None
    stored = info.part("weight_scale")
    s = _checked(read(stored), stored, info).double().square()
    rows, cols = info.shape[-2], info.shape[-1]
    if _strategy(scheme) == "block":  # (⌈rows/br⌉, ⌈cols/bc⌉), the edge blocks partial
        br, bc = args.block_structure
        r = torch.full((s.shape[0],), float(br), dtype=torch.float64, device=s.device)
        c = torch.full((s.shape[1],), float(bc), dtype=torch.float64, device=s.device)
        r[-1], c[-1] = rows - br * (s.shape[0] - 1), cols - bc * (s.shape[1] - 1)
        return float((s * r[:, None] * c[None, :]).sum()) / (rows * cols) / 12
    return float(s.mean()) / 12  # tensor, channel, group: every scale covers as many elements


def _checked(value, stored: TensorInfo, info: DequantizedInfo):
    """`value` in float32 (the product's precision) after checking that every scale is finite and
    nonzero: a zero scale would decode its block to zeros, a NaN or infinity the whole tensor."""
    import torch

    s = value.to(torch.float32)
    check_scales(info, stored, s, torch.isfinite(s) & (s != 0), "NaN, infinite or zero")
    return s


def quantize(info: DequantizedInfo, W, read) -> dict:
    """{stored name: tensor}: `W` (float32, the logical tensor's shape) stored as `info` stores its
    weight — new codes, scales, zero points, global scale under their stored names, in their stored
    dtypes and shapes — for `merge --requantize` (docs/design.md §13).

    As llm-compressor would quantize the merged model saved in its dtype: W rounded once to the
    model's dtype (`plain_dtype`), the range each scale covers reduced to its min and max (a min-max
    observer's view of a weight: per tensor, row, group of columns or block), the qparams computed by
    the package's `calculate_qparams` (NVFP4's global scale by its `generate_gparam`) and held in the
    dtypes the package's `initialize_qparams` gives them, and the codes written by the format's own
    compressor (`compress`). `read` is not needed: every parameter is recomputed. Static activation
    scales are not returned: they do not depend on W."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = _scheme(info.scheme.scheme_json)
    fmt, args = info.scheme.format, scheme.weights
    compressor = BaseCompressor.get_value_from_registry(fmt)
    names = compressor.compression_param_names(scheme)
    W = W.to(torch_dtype_of(info.plain_dtype))
    state = {"weight": W}
    global_scale = None
    if "weight_global_scale" in names:
        global_scale = generate_gparam(W.amin(), W.amax())
        state["weight_global_scale"] = global_scale
    with torch.no_grad():
        scale, zero_point = calculate_qparams(*_ranges(W, args), args, global_scale=global_scale)
    # The codes are computed with the scale that will decode them: rounded to the dtype it is stored
    # in first (NVFP4's float8_e4m3fn, which a config without `scale_dtype` leaves calculate_qparams
    # unrounded; llm-compressor's fp8 weight_scale parameter rounds it as it is set), then held in
    # the weight's dtype as initialize_qparams holds it.
    stored_scale = torch_dtype_of(info.part("weight_scale").dtype)
    state["weight_scale"] = scale.to(stored_scale).to(W.dtype)
    if "weight_zero_point" in names:
        state["weight_zero_point"] = zero_point.to(args.zp_dtype)
    compressed = compressor.compress(state, scheme)
    module = info.codes.name.rpartition(".")[0]
    stored = {info.codes.name: info.codes} | {
        i.name: i for role, i in info.parts if role.startswith("weight_")
    }
    out = {}
    for param, tensor in compressed.items():
        name = f"{module}.{param}"
        if name not in stored:
            continue
        want = stored[name]
        tensor = tensor.reshape(want.shape) if tensor.numel() == want.numel else tensor
        if dtype_code_of(tensor.dtype) != want.dtype or tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{want.file}: tensor {name}: requantized as {dtype_name_of(dtype_code_of(tensor.dtype))} "
                f"{list(tensor.shape)}, but the checkpoint stores {dtype_name_of(want.dtype)} "
                f"{list(want.shape)}; lorasurgery cannot requantize {info.name} in the checkpoint's layout"
            )
        out[name] = tensor.contiguous()
    return out


def _ranges(W, args):
    """(min, max) of W over the reach of each scale, in the scale grid's shape (zero padding at the
    edge blocks changes nothing: calculate_qparams widens every range to hold 0)."""
    import torch

    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "tensor":
        return W.amin().reshape(1), W.amax().reshape(1)
    if strategy == "channel":
        return W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        groups = W.unflatten(-1, (-1, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    rows, cols = args.block_structure
    padded = torch.nn.functional.pad(W, (0, -W.shape[1] % cols, 0, -W.shape[0] % rows))
    blocks = padded.unflatten(0, (-1, rows)).unflatten(-1, (-1, cols))
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def exclude(settings, modules, plain=()) -> dict:
    """quantization_config with `modules` in its `ignore` list: compressed-tensors (and so vLLM and
    transformers) then leave those Linear layers unquantized and read their `weight` as stored.
    `plain` is not needed: the config groups' targets, not a default skip list, say what is
    quantized, and `ignore` only takes modules out of them."""
    settings = dict(settings)
    listed = list(settings.get("ignore") or [])
    settings["ignore"] = listed + [m for m in modules if m not in listed]
    return settings
