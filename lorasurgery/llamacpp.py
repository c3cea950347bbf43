"""llama.cpp's names and layout of a Llama's tensors: what a GGUF file calls each base tensor.

Shared by `export --for llama.cpp` (writing a GGUF LoRA) and `verify` (reading one, or a merged
GGUF): the tensor names come from the `gguf` package's name map for the architecture, and
convert_hf_to_gguf.py's LlamaModel.permute reorders q_proj / k_proj rows for llama.cpp's rotary
layout (docs/export.md "Rules"; docs/design.md §14 for verify's use).
"""

from __future__ import annotations

import torch

from lorasurgery.errors import UnsupportedError
from lorasurgery.targets import LLAMACPP_ARCHITECTURES


def llama_permute(rows: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The converter's LlamaModel.permute on the rows of a (out, …) tensor: within each head the
    rotary pairs (i, i + d/2) are interleaved to (2i, 2i + 1)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_architecture(base_config: dict) -> tuple[str, str]:
    """(HF class, gguf arch name) of a base config.json export supports."""
    for name in base_config.get("architectures") or []:
        if name in LLAMACPP_ARCHITECTURES:
            return name, LLAMACPP_ARCHITECTURES[name]
    raise UnsupportedError(
        f"base architecture {base_config.get('architectures')} is not supported by export --for llama.cpp"
    )


def tensor_names(modules, base_config: dict) -> dict[str, str]:
    """{module: llama.cpp tensor name} through gguf's name map for the base's architecture."""
    import gguf

    _, arch = gguf_architecture(base_config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, int(base_config["num_hidden_layers"]))
    names = {}
    for lo in modules:
        mapped = name_map.get_name(f"{lo.name}.weight", try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedError(f"module {lo.name} has no llama.cpp tensor for architecture {arch}")
        names[lo.name] = mapped
    return names


def llama_unpermute(rows: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """The inverse of `llama_permute`: rows in llama.cpp's rotary layout back to the HF order
    (verify reads q/k factors and merged q/k weights out of GGUF files)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = rows.shape[0]
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permuted_heads(name: str, base_config: dict) -> tuple[int, int] | None:
    """(n_head, n_head_kv) `llama_permute` takes for the rows of base tensor or module `name`:
    Llama's q_proj with the attention heads, k_proj with the key/value heads; None for the rest."""
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return {"q_proj": (n_head, n_head), "k_proj": (n_head, n_kv)}.get(leaf)


def gguf_names(base_names, base_config: dict) -> dict[str, str]:
    """{llama.cpp tensor name: base tensor name} for every base tensor name the architecture's map
    knows (`blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight`): the inverse of the
    map export writes through."""
    import gguf

    _, arch = gguf_architecture(base_config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, int(base_config["num_hidden_layers"]))
    found = {}
    for name in base_names:
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            found[mapped] = name
    return found
