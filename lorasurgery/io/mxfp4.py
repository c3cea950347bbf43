"""MXFP4 as gpt-oss stores its experts, read dequantized (docs/design.md §13).

The layout (openai/gpt-oss-20b/120b and every model saved in their format; config.json
`quantization_config: {"quant_method": "mxfp4", "modules_to_not_convert": […]}`), for each fused
expert parameter <p> (`…mlp.experts.gate_up_proj`, `…mlp.experts.down_proj`):

  <p>_blocks   uint8, (experts, rows, columns/32, 16): 32 e2m1 codes a block, two a byte, the
               low nibble first (bit 3 the sign, bits 2–0 the value: 0, ½, 1, 1½, 2, 3, 4, 6)
  <p>_scales   uint8, (experts, rows, columns/32): the block's E8M0 exponent, 2^(byte − 127); 0xFF
               is E8M0's NaN
  <p>_bias     plain, as every other tensor the config's modules_to_not_convert names

The codes are stored (out, in) per expert — `rows` are the outputs — while the model's parameter
is (experts, in, out) (transformers' `is_transposed` experts): transformers' dequantizing load
(`Mxfp4Config(dequantize=True)`, integrations/mxfp4.py `convert_moe_packed_tensors`) decodes each
row and transposes the last two axes. gate_up_proj's gate/up interleave (gate the even outputs,
up the odd ones, split by the model's forward) is in the rows and so in the parameter's last axis:
nothing reorders it. The logical tensor is that parameter: name <p>, shape (experts, columns,
rows), float32 by the same 16-entry table and `ldexp` transformers uses, bit for bit.

`quantize` is the way back, for `merge --requantize`: a float32 parameter to new blocks and scales
under the stored names, as triton_kernels' `downcast_to_mxfp_torch` (the quantizer transformers'
`quantize_to_mxfp4` calls, default ROUND_UP) computes them: per block of 32 inputs of one output,
the scale 2^e the float32 amax/6 rounded *up* to a power of two (so every value fits ±6·2^e; an
all-zero block gets byte 0), each value/2^e rounded to the nearest e2m1, ties away from zero, the
sign kept (a negative value that rounds to 0 is −0, code 8). Straight from float32: transformers
casts to bf16 first, which would round deq(W) + ΔW twice.

`logical_index` checks the layout on headers when the checkpoint is opened (blocks and scales in
pairs, their dtypes and shapes) and returns the index commands see: each <p> a DequantizedInfo at
its blocks' place, the scales hidden. `dequantize` checks the scales (no 0xFF) and decodes one
expert at a time into the transposed result, so beside W only one expert's rows exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lorasurgery.errors import CheckpointError, NonFiniteError
from lorasurgery.io.fp8 import extend as _extend
from lorasurgery.io.quantization import (
    INTEGER,
    SCALE_ONLY,
    DequantizedInfo,
    Quantization,
    check_scales,
    foreign_tensor,
)
from lorasurgery.io.quantization import model_dtype as _model_dtype
from lorasurgery.io.safetensors_format import TensorInfo, dtype_name_of

BLOCK = 32  # values a scale covers
BYTES = BLOCK // 2  # two e2m1 codes a byte
BIAS = 127  # E8M0: 2^(byte − 127)
NAN = 0xFF  # E8M0's one special value
# e2m1 by its 4 bits (sign, 2 exponent, 1 mantissa), the order transformers' FP4_VALUES lists them
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between neighbouring magnitudes


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them, in file order; CheckpointError naming the
    file and tensor when the MXFP4 layout is broken."""
    declaration = quantization.declaration() or "uint8 <name>_blocks with <name>_scales beside them"
    pairs = []
    for t in quantization.tensors:
        if t.format != "mxfp4":
            raise foreign_tensor(
                t,
                tensors,
                f"MXFP4 ({declaration}): MXFP4 codes are uint8 <name>_blocks with <name>_scales beside them",
            )
        if t.part("scales") is None:
            raise _missing_scales(tensors[t.codes], t.logical)
        blocks, scales = tensors[t.codes], tensors[t.part("scales")]
        _check_pair(blocks, scales)
        pairs.append((t, blocks, scales))
    _check_orphans(tensors, quantization.stored_names)
    if not pairs:
        return tensors  # declared, but nothing stored quantized: the tensors are what they are

    model_dtype = _model_dtype(config)
    logical = {}
    for t, blocks, scales in pairs:
        experts, rows, groups, _ = blocks.shape
        logical[blocks.name] = DequantizedInfo.of(
            t.logical,
            (experts, groups * BLOCK, rows),
            blocks,
            format="mxfp4",
            parts=(("scales", scales),),
            block=(BLOCK, 1),  # in the logical (experts, in, out) layout: 32 inputs of one output
            scale_fmt="ue8m0",
            model_dtype=model_dtype,
        )
    index = {}
    for name, info in tensors.items():  # file order: each parameter at its blocks' place
        if name in logical:
            index[logical[name].name] = logical[name]
        elif name not in quantization.stored_names:
            index[name] = info
    return index


def dequantize(info: DequantizedInfo, read):
    """The float32 parameter (experts, in, out) from its blocks and scales (`read(stored info)` reads
    one, on the device the caller chose); CheckpointError naming the scales tensor when a scale is
    E8M0's NaN (0xFF)."""
    import torch

    stored = info.part("scales")
    scales = read(stored)
    check_scales(info, stored, scales, scales != NAN, "0xFF, E8M0's NaN")
    blocks = read(info.codes)
    device = blocks.device
    experts, rows, groups, _ = blocks.shape
    table = torch.tensor(E2M1, dtype=torch.float32, device=device)
    exponents = scales.to(torch.int32).sub_(BIAS).unsqueeze(-1)  # (experts, rows, groups, 1)
    W = torch.empty((experts, groups * BLOCK, rows), dtype=torch.float32, device=device)
    expert = torch.empty((rows, groups, BLOCK), dtype=torch.float32, device=device)
    for e in range(experts):  # one expert's rows at a time beside W; every block of it at once
        codes = blocks[e]
        expert[..., 0::2] = table[(codes & 0x0F).to(torch.int32)]
        expert[..., 1::2] = table[(codes >> 4).to(torch.int32)]
        torch.ldexp(expert, exponents[e], out=expert)  # what transformers computes, so bit for bit
        W[e].copy_(expert.reshape(rows, groups * BLOCK).T)
    return W


def quantize(info: DequantizedInfo, W, read=None) -> dict:
    """{blocks name: uint8 (experts, out, in/32, 16), scales name: uint8 (experts, out, in/32)} of
    the float32 parameter W (experts, in, out) of `info`'s layout, on W's device, one expert at a
    time; NonFiniteError naming the tensor when W holds NaN or ±inf, or a block too large for
    E8M0 (amax/6 above 2^127). `read` (unused) is the readers' common signature."""
    import torch

    experts, inputs, rows = W.shape
    if (experts, inputs, rows) != tuple(info.shape):
        raise ValueError(f"{info.name}: W of shape {list(W.shape)}, not {list(info.shape)}")
    groups = inputs // BLOCK
    blocks = torch.empty((experts, rows, groups, BYTES), dtype=torch.uint8, device=W.device)
    scales = torch.empty((experts, rows, groups), dtype=torch.uint8, device=W.device)
    for e in range(experts):
        # a copy of its own (W is the caller's), (out, in/32, 32)
        x = W[e].T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        x = x.reshape(rows, groups, BLOCK)
        amax = x.abs().amax(-1, keepdim=True)
        # amax/6 rounded up to a power of two on its float32 bits: add all-ones to the mantissa
        # and keep the exponent (exact; the ROUND_UP of triton_kernels).
        bits = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000
        if not bool(torch.isfinite(amax).all()) or bool((bits == 0x7F800000).any()):
            raise NonFiniteError(
                f"{info.name}: expert {e} holds NaN, ±inf or values beyond MXFP4's range "
                f"(6·2^127); it cannot be requantized"
            )
        scale = bits.view(torch.float32)
        x.mul_(torch.where(scale == 0, 0.0, 1.0 / scale))  # 1/2^e: exact
        codes = _e2m1(x)
        blocks[e] = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the first of a pair in the low nibble
        scales[e] = (bits >> 23).squeeze(-1).to(torch.uint8)
    return {info.codes.name: blocks, info.part("scales").name: scales}


def _e2m1(x):
    """The e2m1 code (uint8, 0–15) nearest each x in [−6, 6], ties away from zero, the sign in bit 3:
    the magnitude's code is the number of midpoints between e2m1 values that |x| reaches (exact:
    the midpoints are float32 numbers). triton_kernels computes the same on the float bits (a guard
    bit added, then shifted out); 7 comparisons are 3–4× faster on the CPU than that bit arithmetic."""
    import torch

    magnitude = x.abs()
    code = torch.signbit(x).to(torch.uint8) << 3
    for midpoint in MIDPOINTS:
        code += magnitude >= midpoint
    return code


def _check_pair(blocks: TensorInfo, scales: TensorInfo) -> None:
    if scales.dtype != "U8":
        raise CheckpointError(
            f"{scales.file}: tensor {scales.name}: scales of dtype {dtype_name_of(scales.dtype)}; MXFP4 "
            f"scales are E8M0 exponents stored as uint8 bytes"
        )
    shape = list(blocks.shape)
    if len(shape) != 4 or shape[-1] != BYTES:
        raise CheckpointError(
            f"{blocks.file}: tensor {blocks.name}: shape {shape}; MXFP4 expert blocks are (experts, "
            f"rows, columns/32, 16): 16 bytes of 32 e2m1 codes a block"
        )
    if list(scales.shape) != shape[:-1]:
        raise CheckpointError(
            f"{scales.file}: tensor {scales.name}: shape {list(scales.shape)} does not match the blocks "
            f"of {blocks.name} {shape}: one scale a block needs {shape[:-1]}"
        )


def _check_orphans(tensors: Mapping[str, TensorInfo], claimed: frozenset[str]) -> None:
    """A `<p>_blocks` or `<p>_scales` that decodes nothing: its partner is missing, or the blocks
    are not uint8."""
    for name, info in tensors.items():
        if name in claimed:
            continue
        if name.endswith("_blocks"):
            stem = name[: -len("_blocks")]
            if stem + "_scales" not in tensors:
                if info.dtype not in INTEGER:
                    continue  # a float parameter that happens to be called so
                raise _missing_scales(info, stem)
            raise CheckpointError(
                f"{info.file}: tensor {name}: blocks of dtype {dtype_name_of(info.dtype)}; MXFP4 blocks "
                f"are uint8 bytes of two e2m1 codes"
            )
        if name.endswith("_scales") and info.dtype in INTEGER | SCALE_ONLY:
            stem = name[: -len("_scales")]
            raise CheckpointError(
                f"{info.file}: tensor {name} is the MXFP4 scales of {stem}, but the checkpoint has no "
                f"{stem}_blocks"
            )


def _missing_scales(blocks: TensorInfo, stem: str) -> CheckpointError:
    return CheckpointError(
        f"{blocks.file}: tensor {blocks.name} holds MXFP4 blocks of {stem} with no {stem}_scales "
        f"beside them: its scales tensor is missing"
    )


def unit(name: str) -> str:
    """The experts module of expert parameter `name`: transformers' MXFP4 loader replaces a whole
    GptOssMLP's experts or none (`should_convert_module(f"{mlp}.experts", modules_to_not_convert)`),
    so gate_up_proj and down_proj are written quantized, or plain, together."""
    return name.rpartition(".")[0]


def exclude(settings, modules, plain=()) -> dict:
    """quantization_config with the experts `modules` in modules_to_not_convert, the list
    transformers' MXFP4 loader reads as its FP8 one does. `plain` is not needed: that loader converts
    only the experts, whatever its default skip list says."""
    return _extend(settings, "modules_to_not_convert", modules)
