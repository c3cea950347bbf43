"""The llama.cpp side of `export`: a GGUF LoRA file as llama.cpp's loader reads it.

What llama.cpp reads (src/llama-adapter.cpp, llama-graph.cpp; versions in docs/export.md):
- `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (one float for the file);
- per base tensor `<name>.lora_a` / `<name>.lora_b`, `<name>` being llama.cpp's tensor name
  (gguf's tensor name map for the architecture). lora_a is stored as A (r, in) and lora_b as
  B (out, r) (numpy order; GGUF's ne is the reverse), except token_embd, whose lora_a is Aᵀ (vocab, r)
  because the input path gathers rows of it (llm_graph_context::build_inp_embd);
- the update applied is (α / rank)·B@A with rank = lora_b's ne[0] = B's column count, per tensor.
And what convert_lora_to_gguf.py does to the factors on the way (through the base converter's
modify_tensors on a lazy B@A): Llama's q_proj / k_proj rows are permuted for llama.cpp's rotary
layout (`LlamaModel.permute`, k with the key/value head count), which reorders the rows of B only.
The tensors are float32, as the converter's default `--outtype f32` writes them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import torch

from lorasurgery.errors import OutputError
from lorasurgery.llamacpp import gguf_architecture, llama_permute, tensor_names


def gguf_tensors(modules, factors, base_config: dict) -> list[tuple[str, np.ndarray]]:
    """(name, float32 array) pairs in the converter's layout and order of modules."""
    names = tensor_names(modules, base_config)
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    out = []
    for lo in modules:
        f = factors[lo.name]
        A, B = f.A.to(torch.float32), f.B.to(torch.float32)
        leaf = lo.name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            B = llama_permute(B, n_head, n_head)
        elif leaf == "k_proj":
            B = llama_permute(B, n_head, n_kv)
        name = names[lo.name]
        if name.startswith("token_embd"):
            A = A.T  # (vocab, r): rows gathered per token
        out.append((f"{name}.lora_a", A.contiguous().numpy()))
        out.append((f"{name}.lora_b", B.contiguous().numpy()))
    return out


def check_gguf_output(output, inputs, force: bool) -> Path:
    """Refuse an OUT that is or lies inside an input, is a folder, or exists without --force."""
    output = Path(output)
    for given in inputs:
        source = Path(given).resolve()
        if output.resolve() == source or output.resolve().is_relative_to(source):
            raise OutputError(f"output {output} is inside the input {given}; choose a path elsewhere")
    if output.is_dir():
        raise OutputError(f"output {output} is a folder; export --for llama.cpp writes one .gguf file")
    if output.exists() and not force:
        raise OutputError(f"output {output} already exists; pass --force to replace it")
    return output


def write_gguf(
    adapter, modules, factors, alpha: float, base_config: dict, output, *, force: bool, inputs
) -> Path:
    """Write the GGUF LoRA atomically: a temporary file beside OUT, renamed when complete."""
    import gguf

    output = check_gguf_output(output, inputs, force)
    _, arch = gguf_architecture(base_config)
    tensors = gguf_tensors(modules, factors, base_config)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.lorasurgery-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        writer = gguf.GGUFWriter(temp, arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(Path(adapter.path).name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return output
