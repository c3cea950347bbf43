"""A merged GGUF model (convert_hf_to_gguf.py of a merged model, llama-export-lora's output) read as
the checkpoint verify's merged check compares with the base (docs/design.md §14, docs/verify.md
"Merged GGUF").

The `gguf` package reads the file; each tensor is mapped back to the base's name through the
architecture's name map (the inverse of what the converter writes, lorasurgery.llamacpp), Llama's
q_proj / k_proj rows un-permuted (the converter's LlamaModel.permute), and decoded to float32 by
`gguf.quants.dequantize` where it is block-quantized (Q8_0, Q4_K …). F32 / F16 / BF16 tensors keep
their dtype, so an untouched tensor is compared exactly as in a safetensors artifact; a quantized
one is `dequantized`, its rounding ‖½ step‖ read from its block scales (`rounding`, gguf_quants),
and judged by its retention against that rounding (verdict.judge_quantized). The file has
no config.json: a tie is kept when it stores no `output.weight` (llama.cpp then reuses token_embd).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lorasurgery.commands.verify.gguf_quants import half_step_norm, round_on_grid, stepped
from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.llamacpp import gguf_architecture, gguf_names, llama_permute, llama_unpermute, permuted_heads

PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
    codes: object = None  # none: a quantized tensor's rounding is read from its scales (`rounding`)

    @property
    def nbytes(self) -> int:
        return 4 * int(np.prod(self.shape))


class GgufModel:
    """A merged GGUF file as a read-only checkpoint under the base's tensor names."""

    def __init__(self, path: Path, base_config: dict, model_names):
        import gguf

        self.path = Path(path)
        self.config = None  # no config.json: check_config has nothing to check
        self.quantization = None
        reader = open_gguf(self.path)
        kind = gguf_field(reader, gguf.Keys.General.TYPE) or "model"
        if kind != "model":
            raise UnsupportedError(f"{path}: general.type is {kind!r}; a merged GGUF model has 'model'")
        _, arch = gguf_architecture(base_config)
        found_arch = gguf_field(reader, gguf.Keys.General.ARCHITECTURE)
        if found_arch != arch:
            raise UnsupportedError(
                f"{path}: general.architecture is {found_arch!r}, the base's is {arch!r}: not a conversion of this base"
            )
        self.base_config = base_config
        names = gguf_names(model_names, base_config)
        self._tensors = {}
        self.tensors: dict[str, GgufTensorInfo] = {}
        self.extra: list[str] = []
        for tensor in reader.tensors:
            name = names.get(tensor.name)
            if name is None:
                self.extra.append(tensor.name)
                continue
            kind = tensor.tensor_type.name
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            quantized = kind not in PLAIN
            _check_type(self.path, tensor.name, kind)
            self.tensors[name] = GgufTensorInfo(name, tensor.name, kind, shape, quantized)
            self._tensors[name] = tensor

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        """Tensor `name` in the base's layout: its own dtype (F32/F16/BF16), else decoded to float32."""
        import gguf

        tensor, info = self._tensors[name], self.tensors[name]
        if info.dtype == "F32" or info.dtype == "F16":
            value = torch.from_numpy(np.array(tensor.data))
        else:  # BF16 is stored as raw 16-bit words, quantized types as blocks: decode to float32
            value = torch.from_numpy(
                np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            )
            if info.dtype == "BF16":
                value = value.to(torch.bfloat16)  # exact: bf16 values are float32 values
        value = value.reshape(info.shape)
        heads = permuted_heads(name, self.base_config)
        if heads is not None and value.dim() == 2:  # the converter's LlamaModel.permute, undone
            value = llama_unpermute(value, *heads)
        return value.to(device)

    def rounding(self, name: str) -> float | None:
        """‖½ step‖ over tensor `name` (the base's name) from its block scales: the most a nearest-code
        quantizer moves it, in norm (docs/verify.md "Quantized GGUF"); None for F32 / F16 / BF16."""
        info = self.tensors[name]
        if not info.dequantized:
            return None
        return half_step_norm(self._tensors[name].data, info.dtype)

    def round_on_grid(self, name: str, values: torch.Tensor) -> torch.Tensor | None:
        """`values` (base layout) rounded to the nearest point of the grid tensor `name`'s own block
        scales define, in the base layout; None for F32 / F16 / BF16 (docs/verify.md "Quantized GGUF")."""
        info = self.tensors[name]
        if not info.dequantized:
            return None
        heads = permuted_heads(name, self.base_config)
        x = values.detach().to("cpu", torch.float32)
        if heads is not None and x.dim() == 2:
            x = llama_permute(x, *heads)
        rounded = torch.from_numpy(
            round_on_grid(self._tensors[name].data, info.dtype, x.contiguous().numpy())
        )
        if heads is not None and rounded.dim() == 2:
            rounded = llama_unpermute(rounded, *heads)
        return rounded.to(values.device)

    def tied_structure(self, structure):
        """The structure the merged check reads ties from: the base's ties when the file stores no
        output.weight (llama.cpp reuses token_embd), none when it stores both."""
        output = f"{structure.output_embedding}.weight" if structure.output_embedding else None
        tied = [] if output in self.tensors else list(structure.tied)
        return SimpleNamespace(tied=tied, input_embedding=structure.input_embedding)


def _check_type(path: Path, name: str, kind: str) -> None:
    """Refuse, naming the tensor, a GGML type whose rounding verify cannot bound (a non-uniform grid:
    IQ*, TQ*, MXFP4 …), or one the `gguf` package cannot decode."""
    if kind in PLAIN or stepped(kind):
        return
    raise UnsupportedError(
        f"{path}: tensor {name} is {kind}, whose rounding verify cannot bound (it reads F32, F16, BF16, "
        "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K … Q6_K)"
    )
