"""A merged GGUF model (convert_hf_to_gguf.py of a merged model, llama-export-lora's output) read as
the checkpoint verify's merged check compares with the base (docs/design.md §14, docs/verify.md
"Merged GGUF").

The `gguf` package reads the file; each tensor is mapped back to the base's name through the
architecture's name map (lorasurgery.llamacpp.merged_gguf_sources: the inverse of what the
converter writes, a --fuse-qkv tensor split back into q, k and v rows, an MoE expert weight taken out
of its stacked `…_exps` tensor or a fused gate_up_proj rebuilt from two), the converter's transforms
of that architecture undone (llamacpp.to_base_layout: Llama's q/k rows un-permuted, GPT-2's Conv1D
weights transposed back; another architecture is refused by name), and decoded to float32 by
`gguf.quants.dequantize` where it is block-quantized (Q8_0, Q4_K …). F32 / F16 / BF16 tensors keep
their dtype, so an untouched tensor is compared exactly as in a safetensors artifact; a quantized
one is `dequantized`, its rounding ‖½ step‖ read from its block scales (`rounding`, gguf_quants),
and judged by its retention against what W + ΔW shows rounded on its own grid (`round_on_grid`,
verdict.judge_quantized). The file has
no config.json: a tie is kept when it stores no `output.weight` (llama.cpp then reuses token_embd).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lorasurgery.commands.verify.gguf_quants import half_step_norm, round_on_grid, stepped
from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.llamacpp import merged_gguf_layout, merged_gguf_sources, to_base_layout, to_gguf_layout

PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# A block-quantized type's grid as (safetensors float code of as many mantissa bits, factor 2: the
# block scale need not be a power of two); Q8_0 keeps 7 bits of magnitude, 4- to 6-bit types ~3.
# Only --text's dtype reads it (weights_dtype): the merged check takes each tensor's rounding and
# grid from its block scales (`rounding`, `round_on_grid`).
QUANTIZED_GRID = {"Q8_0": "BF16", "Q8_1": "BF16", "Q8_K": "BF16"}
COARSE = "F8_E4M3"


def open_gguf(path: Path):
    """The `gguf` package's reader of `path`, or an error naming the file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the gguf package raises bare ValueError / struct errors
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({error}); pass the .gguf llama.cpp loads"
        ) from error


def gguf_field(reader, key: str):
    found = reader.get_field(key)
    return None if found is None else found.contents()


@dataclass(frozen=True)
class GgufTensorInfo:
    """One GGUF tensor under the base's name, shaped as the base stores it."""

    name: str  # the base's name
    gguf_name: str
    dtype: str  # F32 | F16 | BF16, or the GGML type's name (Q8_0 …) when dequantized
    shape: tuple[int, ...]
    dequantized: bool
    codes: object = None  # a quantized tensor's grid: .dtype, the float code whose mantissa it has
    rows: tuple[int, int] | None = None  # the rows of a fused GGUF tensor (--fuse-qkv) this one is
    expert: int | None = None  # the expert of a stacked `…_exps` tensor this one is
    pieces: tuple = ()  # the GGUF tensors concatenated after this one on dim 1 (a fused gate_up_proj)

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))


class GgufModel:
    """A merged GGUF file as a read-only checkpoint under the base's tensor names."""

    def __init__(self, path: Path, base_config: dict, model_tensors: dict):
        """`model_tensors`: every base tensor name with its info (recipes.tensors), `.shape` read."""
        import gguf

        self.path = Path(path)
        self.config = None  # no config.json: check_config has nothing to check
        self.quantization = None
        reader = open_gguf(self.path)
        kind = gguf_field(reader, gguf.Keys.General.TYPE) or "model"
        if kind != "model":
            raise UnsupportedError(f"{path}: general.type is {kind!r}; a merged GGUF model has 'model'")
        arch = merged_gguf_layout(base_config).arch
        found_arch = gguf_field(reader, gguf.Keys.General.ARCHITECTURE)
        if found_arch != arch:
            raise UnsupportedError(
                f"{path}: general.architecture is {found_arch!r}, the base's is {arch!r}: not a conversion of this base"
            )
        self.base_config = base_config
        self._tensors = {}
        self.tensors: dict[str, GgufTensorInfo] = {}
        by_name = {tensor.name: tensor for tensor in reader.tensors}
        shapes = {name: tuple(info.shape) for name, info in model_tensors.items()}
        sources = merged_gguf_sources(shapes, base_config, by_name)
        for name, source in sources.items():
            tensor = by_name[source.gguf_name]
            kind = tensor.tensor_type.name
            quantized = kind not in PLAIN
            _check_type(self.path, tensor.name, kind)
            codes = SimpleNamespace(dtype=QUANTIZED_GRID.get(kind, COARSE)) if quantized else None
            shape = _base_shape(tensor, source.rows, name, base_config)
            if source.expert is not None or source.pieces:
                shape, pieces = _stacked_shape(tensor, source, by_name, self.path)
                info = GgufTensorInfo(
                    name, tensor.name, kind, shape, quantized, codes, None, source.expert, pieces
                )
            else:
                info = GgufTensorInfo(name, tensor.name, kind, shape, quantized, codes, source.rows)
            self.tensors[name] = info
            self._tensors[name] = tensor
        used = {source.gguf_name for source in sources.values()}
        used.update(piece for source in sources.values() for piece in source.pieces)
        self.extra: list[str] = [tensor.name for tensor in reader.tensors if tensor.name not in used]

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        """Tensor `name` in the base's layout: its own dtype (F32/F16/BF16), else decoded to float32."""
        tensor, info = self._tensors[name], self.tensors[name]
        return self._base_layout(_decoded(tensor, info.dtype), info).to(device)

    def _base_layout(self, value: torch.Tensor, info: GgufTensorInfo) -> torch.Tensor:
        """The decoded GGUF tensor as the base stores it: its rows of a fused tensor, the
        converter's transforms undone (lorasurgery.llamacpp.to_base_layout)."""
        if info.expert is not None or info.pieces:
            return _stacked_part(value, info)
        if info.rows is not None:
            value = value[info.rows[0] : info.rows[1]]
        return to_base_layout(value, info.name, self.base_config)

    def weights_dtype(self) -> str:
        """The dtype whose logit tolerance `--text` applies: the one holding most elements of the
        matrices (llama.cpp keeps 1-D norms and biases F32 in every file type, so a count of tensors
        would pick F32 for a Q8_0 file); a quantized type as its codes' grid."""
        sizes = Counter()
        for info in self.tensors.values():
            if len(info.shape) >= 2:
                sizes[info.codes.dtype if info.dequantized else info.dtype] += int(np.prod(info.shape))
        return sizes.most_common(1)[0][0] if sizes else "F32"

    def _blocks(self, name: str, tensor=None):
        """The raw blocks of base tensor `name`, a row of blocks per row: its rows of a fused tensor
        (--fuse-qkv), its expert's of a stacked `…_exps` tensor; `tensor` one of its pieces instead."""
        info = self.tensors[name]
        tensor = self._tensors[name] if tensor is None else tensor
        shape = [int(n) for n in tensor.shape.tolist()]  # GGUF's order: columns first
        data = np.asarray(tensor.data).reshape(int(np.prod(shape[1:])), -1)
        if info.expert is not None:
            return data[info.expert * shape[1] : (info.expert + 1) * shape[1]]
        return data if info.rows is None else data[info.rows[0] : info.rows[1]]

    def rounding(self, name: str) -> float | None:
        """‖½ step‖ over tensor `name` (the base's name) from its block scales: the most a nearest-code
        quantizer moves it, in norm (docs/verify.md "Quantized GGUF"); None for F32 / F16 / BF16."""
        info = self.tensors[name]
        if not info.dequantized:
            return None
        tensors = (self._tensors[name], *info.pieces)  # a fused gate_up_proj: each stacked piece
        return math.sqrt(sum(half_step_norm(self._blocks(name, t), info.dtype) ** 2 for t in tensors))

    def round_on_grid(self, name: str, values: torch.Tensor) -> torch.Tensor | None:
        """`values` (base layout) rounded to the nearest point of the grid tensor `name`'s own block
        scales define, in the base layout; None for F32 / F16 / BF16 (docs/verify.md "Quantized GGUF")."""
        info = self.tensors[name]
        if not info.dequantized:
            return None
        x = values.detach().to("cpu", torch.float32)
        if info.pieces:  # a fused gate_up_proj (E, rows + …, cols): each stacked piece on its own grid
            parts, start = [], 0
            for tensor in (self._tensors[name], *info.pieces):
                rows = int(tensor.shape.tolist()[1])
                part = x[:, start : start + rows].contiguous().numpy()
                parts.append(torch.from_numpy(round_on_grid(self._blocks(name, tensor), info.dtype, part)))
                start += rows
            return torch.cat(parts, dim=1).reshape(x.shape).to(values.device)
        x = to_gguf_layout(x, name, self.base_config)
        rounded = torch.from_numpy(round_on_grid(self._blocks(name), info.dtype, x.contiguous().numpy()))
        return to_base_layout(rounded, name, self.base_config).to(values.device)

    def tied_structure(self, structure):
        """The structure the merged check reads ties from: the base's ties when the file stores no
        output.weight (llama.cpp reuses token_embd), none when it stores both."""
        output = f"{structure.output_embedding}.weight" if structure.output_embedding else None
        tied = [] if output in self.tensors else list(structure.tied)
        return SimpleNamespace(tied=tied, input_embedding=structure.input_embedding)


def _stacked_shape(tensor, source, by_name: dict, path: Path) -> tuple[tuple[int, ...], tuple]:
    """(the base's shape, the GGUF piece tensors) of an MoE expert weight read out of stacked
    `…_exps` tensors (lorasurgery.llamacpp.GgufSource: one expert, or gate and up concatenated)."""
    shape = _torch_shape(tensor)
    pieces = tuple(by_name[p] for p in source.pieces)
    for piece in pieces:
        piece_shape = _torch_shape(piece)
        if piece.tensor_type != tensor.tensor_type or len(piece_shape) != 3 or piece_shape[::2] != shape[::2]:
            raise UnsupportedError(
                f"{path}: {tensor.name} ({tensor.tensor_type.name}, {list(shape)}) and {piece.name} "
                f"({piece.tensor_type.name}, {list(piece_shape)}) do not concatenate into one fused expert "
                "parameter: verify reads them back only alike in type and shape but for their rows"
            )
        shape = (shape[0], shape[1] + piece_shape[1], shape[2])
    return (shape[1:] if source.expert is not None else shape), pieces


def _stacked_part(value: torch.Tensor, info: GgufTensorInfo) -> torch.Tensor:
    """Expert `info.expert` of a decoded stacked tensor, or it with `info.pieces` (decoded alike)
    concatenated on dim 1: the converter's torch.stack and gate/up split undone."""
    if info.expert is not None:
        return value[info.expert]
    parts = [value]
    # the pieces are of the first one's type (_stacked_shape checked it)
    parts += [_decoded(piece, info.dtype) for piece in info.pieces]
    return torch.cat(parts, dim=1)


def _decoded(tensor, kind: str) -> torch.Tensor:
    """A GGUF tensor's values in torch's order of dimensions: F32 / F16 in their own dtype; BF16
    (stored as raw 16-bit words) and block-quantized types decoded to float32, BF16 then back to
    bfloat16 (exact: bf16 values are float32 values)."""
    import gguf

    if kind == "F32" or kind == "F16":
        value = torch.from_numpy(np.array(tensor.data))
    else:
        value = torch.from_numpy(
            np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        )
        value = value.to(torch.bfloat16) if kind == "BF16" else value
    return value.reshape(_torch_shape(tensor))


def _torch_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch's order (GGUF stores the dimensions reversed)."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _base_shape(tensor, rows, name: str, base_config: dict) -> tuple[int, ...]:
    """The shape `GgufModel.read` returns for base tensor `name` (GGUF stores dimensions reversed)."""
    shape = _torch_shape(tensor)
    if rows is not None:
        shape = (rows[1] - rows[0], *shape[1:])
    return tuple(to_base_layout(torch.empty(shape, device="meta"), name, base_config).shape)


def _check_type(path: Path, name: str, kind: str) -> None:
    """Refuse, naming the tensor, a GGML type whose rounding verify cannot bound (a non-uniform grid:
    IQ*, TQ*, MXFP4 …), or one the `gguf` package cannot decode."""
    if kind in PLAIN or stepped(kind):
        return
    raise UnsupportedError(
        f"{path}: tensor {name} is {kind}, whose rounding verify cannot bound (it reads F32, F16, BF16, "
        "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K … Q6_K)"
    )
