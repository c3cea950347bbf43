"""llama.cpp's names and layout of a model's tensors: what a GGUF file calls each base tensor.

Shared by `export --for llama.cpp` (writing a GGUF LoRA) and `verify` (reading one, or a merged
GGUF): the tensor names come from the `gguf` package's name map for the architecture, and
convert_hf_to_gguf.py's LlamaModel.permute reorders q_proj / k_proj rows for llama.cpp's rotary
layout (docs/export.md "Rules"; docs/design.md §14 for verify's use). A merged GGUF of another
architecture is read back through `GgufLayout`: the converter's other transforms of that
architecture (GPT-2's Conv1D weights transposed, q/k/v fused by --fuse-qkv), each undone by name
(docs/verify.md "Merged GGUF").
"""

from __future__ import annotations

from dataclasses import dataclass

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
    leaf = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
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


# ------------------------------------------------------------------------------- merged GGUF models


@dataclass(frozen=True)
class GgufLayout:
    """How convert_hf_to_gguf.py writes the tensors of one base architecture (docs/verify.md
    "Merged GGUF" says which converter class each entry reads): the gguf architecture whose name
    map gives the tensor names, and the transforms to undo. Every other tensor is written as stored."""

    arch: str  # gguf's architecture name (general.architecture)
    permute_qk: bool = False  # LlamaModel.permute on q_proj / k_proj rows, weight and bias
    transposed: tuple[str, ...] = ()  # modules whose weight is written transposed (Conv1D → (out, in))


# HF class -> what its converter class does; an architecture not here is refused by name.
MERGED_GGUF_LAYOUTS = {
    "LlamaForCausalLM": GgufLayout("llama", permute_qk=True),
    "MistralForCausalLM": GgufLayout("llama", permute_qk=True),  # converted by LlamaModel too
    "Qwen2ForCausalLM": GgufLayout("qwen2"),
    "Qwen3ForCausalLM": GgufLayout("qwen3"),
    "Phi3ForCausalLM": GgufLayout("phi3"),  # qkv_proj / gate_up_proj stay fused: attn_qkv / ffn_up
    "GPT2LMHeadModel": GgufLayout("gpt2", transposed=("c_attn", "c_proj", "c_fc")),
}
BLOCK_COUNT_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")  # the converter's order


def merged_gguf_layout(base_config: dict) -> GgufLayout:
    """The layout a merged GGUF of this base has, or UnsupportedError naming the architecture."""
    for name in base_config.get("architectures") or []:
        if name in MERGED_GGUF_LAYOUTS:
            return MERGED_GGUF_LAYOUTS[name]
    raise UnsupportedError(
        f"base architecture {base_config.get('architectures')}: verify reads a merged GGUF of "
        f"{', '.join(MERGED_GGUF_LAYOUTS)} only (the transforms convert_hf_to_gguf.py applies to "
        "another architecture are not undone, so its tensors cannot be compared)"
    )


@dataclass(frozen=True)
class GgufSource:
    """Where a base tensor is in a merged GGUF: the GGUF tensor, and the rows of it (a fused q/k/v)."""

    gguf_name: str
    rows: tuple[int, int] | None = None  # [start, stop) of the GGUF tensor's rows, in the base's layout


def merged_gguf_sources(base_shapes: dict, base_config: dict, gguf_names_found) -> dict[str, GgufSource]:
    """{base tensor name: GgufSource} for every base tensor the GGUF file holds, through the `gguf`
    package's name map for the base's architecture; `blk.N.attn_qkv` (convert_hf_to_gguf.py
    --fuse-qkv) is split back into the base's q, k and v rows."""
    import gguf

    layout = merged_gguf_layout(base_config)
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == layout.arch), None)
    if arch_id is None:
        raise UnsupportedError(
            f"the installed gguf package ({getattr(gguf, '__version__', 'unknown version')}) has no name map "
            f"for architecture {layout.arch!r}: upgrade it (pip install -U gguf)"
        )
    blocks = next((int(base_config[k]) for k in BLOCK_COUNT_KEYS if k in base_config), 0)
    name_map = gguf.get_tensor_name_map(arch_id, blocks)
    present = set(gguf_names_found)
    sources: dict[str, GgufSource] = {}
    fused: dict[str, list[str]] = {}  # blk.N.attn_qkv.weight -> [q, k, v] base names
    for name in base_shapes:
        mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue
        if mapped in present:
            sources[name] = GgufSource(mapped)
            continue
        stem, part, suffix = _qkv_part(mapped)
        if part is not None:
            fused.setdefault(f"{stem}attn_qkv{suffix}", [None, None, None])["qkv".index(part)] = name
    for fused_name, parts in fused.items():
        if fused_name not in present or None in parts:
            continue
        start = 0
        for name in parts:  # the converter's torch.cat([q, k, v], dim=0), rows in the base's order
            stop = start + int(base_shapes[name][0])
            sources[name] = GgufSource(fused_name, (start, stop))
            start = stop
    return sources


def _qkv_part(mapped: str) -> tuple[str, str | None, str]:
    """('blk.N.', 'q' | 'k' | 'v', '.weight' | '.bias') of a gguf attn_q/k/v name, else (…, None, …)."""
    body, dot, suffix = mapped.rpartition(".")
    stem, _, leaf = body.rpartition(".")
    if leaf in ("attn_q", "attn_k", "attn_v") and stem:
        return stem + ".", leaf[-1], dot + suffix
    return "", None, ""


def to_base_layout(value: torch.Tensor, name: str, base_config: dict) -> torch.Tensor:
    """A merged GGUF tensor (torch order, the base's rows already sliced out) put back in the base's
    layout: the transforms `merged_gguf_layout` names, undone."""
    layout = merged_gguf_layout(base_config)
    leaf = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    if layout.transposed and name.endswith(".weight") and leaf in layout.transposed and value.dim() == 2:
        value = value.T.contiguous()
    if layout.permute_qk:
        heads = permuted_heads(name, base_config)
        if heads is not None:
            value = llama_unpermute(value, *heads)
    return value
