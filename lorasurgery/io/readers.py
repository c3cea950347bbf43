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
  rows(info, read) -> io.quantization.Rows | None            (optional: the merge kernel's input)
      the 2-D tensor decoded a band of rows at a time, each band bit for bit what dequantize gives,
      so that the merge never holds the whole float32 tensor (docs/design.md §13 "Decoding in bands").
  band_quantizer(info, read) -> io.quantization.BandQuantizer | None   (optional, beside quantize)
      quantize band by band, each band decoded again at once for its retention; the same bytes.
  noise_variance(info, read) -> float                      (optional: `extract --auto`'s floor)
      the mean over the tensor of the variance of the rounding its codes stand for, step²/12 per
      element with the format's step at each code (its local code spacing times its scale).
  quantize(info, W, read) -> {stored name: tensor}          (optional: `merge --requantize`)
      the float32 logical tensor W (on any device) encoded as the format's own quantizer encodes it:
      the codes and every part that decodes them, under their stored names, with the stored dtypes
      and shapes (scales recomputed from W); parts whose role is in STATIC_ROLES (activation
      scales: nothing of W) are not returned, they are copied as they are.
  exclude(settings, modules, plain) -> settings             (optional, beside quantize)
      the quantization_config with `modules` (units, see below) listed as stored unquantized, so
      that the format's loaders read their plain `weight` (`merge --min-retention`). `plain` names
      every module whose 2-D `weight` the checkpoint stores (or ties) unquantized: a loader whose
      list, once set, replaces its default skip list (transformers' FP8 and bitsandbytes loaders:
      lm_head, tied weights) needs them listed too when the base declared no list.
  unit(name) -> module                                      (optional)
      the module a loader converts or leaves plain as a whole, of logical tensor `name`: by default
      `name` without ".weight"; MXFP4's two expert parameters share their experts module, so both
      are written plain when either is (docs/design.md §13).

`READERS` maps a Quantization.format to its module; io.quantization.READABLE lists the same keys
(tests/test_quantized_refusal.py checks that they agree), and every format not here is refused by
name at open.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lorasurgery.io.bnb as bnb
import lorasurgery.io.compressed as compressed
import lorasurgery.io.fp8 as fp8
import lorasurgery.io.mxfp4 as mxfp4
from lorasurgery.errors import UnsupportedError
from lorasurgery.io.quantization import FORMAT_NAMES, BandQuantizer, DequantizedInfo, Quantization, Rows
from lorasurgery.io.safetensors_format import TensorInfo

READERS = {
    "fp8": fp8,
    "mxfp4": mxfp4,
    "compressed-tensors": compressed,
    **dict.fromkeys(sorted(bnb.FORMATS), bnb),
}
# Parts that ride along with a quantized weight but decode nothing of it (static activation scales):
# a requantized weight keeps them byte for byte.
STATIC_ROLES = frozenset({"activation_scale", "input_scale"})


def logical_index(
    tensors: Mapping[str, TensorInfo], quantization: Quantization, config: Mapping | None, folder: Path
) -> dict[str, TensorInfo]:
    """The checkpoint's tensors as the model sees them (its format's reader's logical_index)."""
    return READERS[quantization.format].logical_index(tensors, quantization, config, folder)


def dequantize(info: DequantizedInfo, read: Callable[[TensorInfo], object]):
    """The float32 tensor `info`, decoded by its format's reader from what `read` returns."""
    return READERS[info.format].dequantize(info, read)


def rows(info: DequantizedInfo, read: Callable[[TensorInfo], object]) -> Rows | None:
    """`info` decoded band by band (its reader's `rows`), or None where its reader decodes it whole."""
    function = getattr(READERS[info.format], "rows", None)
    return None if function is None else function(info, read)


def band_quantizer(info: DequantizedInfo, read: Callable[[TensorInfo], object]) -> BandQuantizer | None:
    """`info`'s format's quantizer band by band, or None where its reader quantizes it whole."""
    function = getattr(READERS[info.format], "band_quantizer", None)
    return None if function is None else function(info, read)


def noise_variance(info: DequantizedInfo, read: Callable[[TensorInfo], object]) -> float | None:
    """The mean per-element variance of the rounding behind `info`'s codes (uniform rounding,
    step²/12, docs/design.md §13, "Extracting from quantized pairs"), or None when its reader does not derive it."""
    function = getattr(READERS[info.format], "noise_variance", None)
    return None if function is None else function(info, read)


def can_quantize(format: str) -> bool:
    """Whether the reader of `format` can also write it (`merge --requantize`)."""
    module = READERS.get(format)
    return module is not None and hasattr(module, "quantize") and hasattr(module, "exclude")


def _writer_of(format: str):
    if not can_quantize(format):
        raise UnsupportedError(
            f"lorasurgery reads {FORMAT_NAMES.get(format, format)} checkpoints but cannot write them "
            f"requantized yet; merge without --requantize writes the merge unquantized (docs/design.md §13)"
        )
    return READERS[format]


def quantize(info: DequantizedInfo, W, read: Callable[[TensorInfo], object]) -> dict:
    """{stored name: tensor} of `W` (float32, the logical tensor `info`) encoded in its format as
    its own quantizer does: the codes and the parts that decode them, stored names, dtypes and
    shapes; `read` as for dequantize (what the stored tensors hold now). UnsupportedError naming the
    format when its reader cannot write."""
    return _writer_of(info.format).quantize(info, W, read)


def exclude(quantization: Quantization, settings: Mapping, modules, plain=()) -> dict:
    """The quantization_config `settings` with `modules` (units: see `unit`) declared as stored
    unquantized in `quantization`'s format; `plain` the modules the checkpoint stores plain (2-D
    weights, tied members included), listed too where the format's loader needs them."""
    return _writer_of(quantization.format).exclude(settings, list(modules), list(plain))


def unit(format: str, name: str) -> str:
    """The module that `format`'s loaders quantize or leave plain as a whole, of logical tensor `name`."""
    module = READERS.get(format)
    if module is not None and hasattr(module, "unit"):
        return module.unit(name)
    return name[: -len(".weight")] if name.endswith(".weight") else name
