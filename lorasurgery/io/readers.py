"""The dequantizing readers, one module per quantized format, behind one interface (docs/design.md §13).

A reader module presents a quantized checkpoint as the model sees it and decodes one tensor at a time:

  logical_index(tensors, quantization, config, folder) -> {name: TensorInfo}
      on headers only, when the checkpoint is opened: the layout checked (CheckpointError naming the
      file and tensor when it is broken), each quantized tensor replaced by a DequantizedInfo (F32,
      no byte range of its own) under its logical name at its codes' place, the tensors that decode
      it hidden, plain tensors as stored.
  dequantize(info, read) -> float32 tensor
      `read(stored TensorInfo)` reads one stored tensor (codes, a scale …) on the caller's device;
      the reader decodes vectorised, on that device, bit for bit as the format's own library does.

`READERS` maps a Quantization.format to its module; io.quantization.READABLE lists the same keys
(tests/test_quantized_refusal.py checks that they agree), and every format not here is refused by
name at open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lorasurgery.io.bnb as bnb
import lorasurgery.io.fp8 as fp8
from lorasurgery.io.quantization import DequantizedInfo, Quantization
from lorasurgery.io.safetensors_format import TensorInfo

READERS = {"fp8": fp8, **dict.fromkeys(sorted(bnb.FORMATS), bnb)}


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them (its format's reader's logical_index)."""
    return READERS[quantization.format].logical_index(tensors, quantization, config, folder)


def dequantize(info: DequantizedInfo, read: Callable[[TensorInfo], object]):
    """The float32 tensor `info`, decoded by its format's reader from what `read` returns."""
    return READERS[info.format].dequantize(info, read)
