"""The rounding a block-quantized GGUF tensor went through, read from its own block scales
(docs/verify.md "Quantized GGUF").

Every type here stores each element as q·step + offset with an integer code q and a step per block
or sub-block: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 one fp16 scale d per 32 elements, the K-quants a
super-block of 256 with fp16 d and a 4- to 8-bit scale per sub-block (step d·sc: Q2_K, Q3_K, Q6_K
per 16 elements, Q4_K, Q5_K per 32). A quantizer that rounds to the nearest code errs by at most
½ step per element, so ‖½ step‖ over the tensor bounds the rounding of W + ΔW that a correct
quantized merge carries (uniform rounding errs by step/√12 on average, 0.58 of the bound).

The steps are decoded from the scale bytes alone (the codes are not read), in the layouts of the
`gguf` package's dequantizers (gguf.quants), which verify uses to decode the values. Types with a
non-uniform grid (IQ*, TQ*, MXFP4 …) have no such step: verify refuses them by name.
"""

from __future__ import annotations

import math

import numpy as np


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of every block, as float64 (n_blocks, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float64)


def _q3_k_scales(blocks: np.ndarray) -> np.ndarray:
    """Q3_K's 16 sub-block scales per block, signed: hmask[32], qs[64], then scales[12] (six bits
    each, offset 32: four low bits in bytes 0–7, two high bits in bytes 8–11), then d."""
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    low = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (
        packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    ).reshape(n, 16)
    return ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int16) - 32


def _blocks(data: np.ndarray, type_name: str) -> np.ndarray:
    """The raw bytes of a tensor of GGML type `type_name`, one block a row."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return np.asarray(data, dtype=np.uint8).reshape(-1, type_size)


def stepped(type_name: str) -> bool:
    """Whether verify can bound the rounding of GGML type `type_name` (a uniform grid per block)."""
    return type_name in GRIDS


def half_step_norm(data: np.ndarray, type_name: str) -> float:
    """‖½ step‖ over every element of a tensor of GGML type `type_name` stored as `data` (the raw
    blocks, as gguf.GGUFReader gives them)."""
    blocks = _blocks(data, type_name)
    steps, _, per_step, _ = GRIDS[type_name](blocks)  # a step's sign does not change its square
    return 0.5 * math.sqrt(per_step * float(np.square(steps).sum()))


def _affine_32(blocks: np.ndarray, levels: int, centre: int | None):
    # Q8_0 / Q4_0 / Q5_0: d·(q − centre); Q4_1 / Q5_1: d·q + m (m the fp16 after d)
    d = _fp16(blocks, 0)
    offset = -centre * d if centre is not None else _fp16(blocks, 2)
    return d, offset, 32, levels


def _grid_q2_k(blocks):
    # scales[16] (low nibble the scale, high the min), qs[64], d, dmin
    step, group = _fp16(blocks, 16 + 64) * (blocks[:, :16] & 0x0F).astype(np.float64), 16
    mins = (blocks[:, :16] >> 4).astype(np.float64)
    return step, -_fp16(blocks, 16 + 64 + 2) * mins, group, 3


def _grid_q3_k(blocks):
    step = _fp16(blocks, 108) * _q3_k_scales(blocks)  # signed
    return step, -4 * step, 16, 7


def _grid_q45_k(blocks, levels: int):
    from gguf.quants import Q4_K

    scales, mins = Q4_K.get_scale_min(blocks[:, 4:16])
    return _fp16(blocks, 0) * scales, -_fp16(blocks, 2) * mins, 32, levels


def _grid_q6_k(blocks):
    step = _fp16(blocks, 208) * blocks[:, 192:208].copy().view(np.int8).astype(np.float64)  # signed
    return step, -32 * step, 16, 63


GRIDS = {
    "Q8_0": lambda b: _affine_32(b, 255, 128),
    "Q4_0": lambda b: _affine_32(b, 15, 8),
    "Q5_0": lambda b: _affine_32(b, 31, 16),
    "Q4_1": lambda b: _affine_32(b, 15, None),
    "Q5_1": lambda b: _affine_32(b, 31, None),
    "Q2_K": _grid_q2_k,
    "Q3_K": _grid_q3_k,
    "Q4_K": lambda b: _grid_q45_k(b, 15),
    "Q5_K": lambda b: _grid_q45_k(b, 31),
    "Q6_K": _grid_q6_k,
}


def round_on_grid(data: np.ndarray, type_name: str, values: np.ndarray) -> np.ndarray:
    """`values` (float32, the tensor's shape in the file's layout) rounded to the nearest point of the
    grid the stored tensor `data` defines (its own block scales and offsets, codes clamped to the
    type's range): what a nearest-code quantizer keeping those scales writes for them."""
    blocks = _blocks(data, type_name)
    step, offset, group, levels = GRIDS[type_name](blocks)
    step, offset = step.reshape(-1, 1), offset.reshape(-1, 1)
    x = np.asarray(values, dtype=np.float64).reshape(step.shape[0], group)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, np.rint((x - offset) / step), 0.0)
    return (np.clip(q, 0, levels) * step + offset).astype(np.float32).reshape(np.shape(values))
