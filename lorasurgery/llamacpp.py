"""llama.cpp's names and layout of a model's tensors: what a GGUF file calls each base tensor.

Shared by `export --for llama.cpp` (writing a GGUF LoRA) and `verify` (reading one, or a merged
GGUF): the tensor names come from the `gguf` package's name map for the architecture, and
convert_hf_to_gguf.py's LlamaModel.permute reorders q_proj / k_proj rows for llama.cpp's rotary
layout (docs/export.md "Rules"; docs/design.md §14 for verify's use). A merged GGUF of another
architecture is read back through `GgufLayout`: the converter's other transforms of that
architecture (GPT-2's Conv1D weights transposed, q/k/v fused by --fuse-qkv, MoE experts stacked into
`…_exps` tensors), each undone by name (docs/verify.md "Merged GGUF", "MoE experts").
"""

from __future__ import annotations

import re
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
    # MoE experts stacked (docs/verify.md "MoE experts"): each projection's per-expert (out, in)
    # weights as one (E, out, in) `…_exps` tensor, a fused gate_up_proj (E, 2·I, H) split at row I
    stacked_experts: bool = False


# HF class -> what its converter class does; an architecture not here is refused by name.
MERGED_GGUF_LAYOUTS = {
    "LlamaForCausalLM": GgufLayout("llama", permute_qk=True),
    "MistralForCausalLM": GgufLayout("llama", permute_qk=True),  # converted by LlamaModel too
    "MixtralForCausalLM": GgufLayout("llama", permute_qk=True, stacked_experts=True),  # LlamaModel too
    "Qwen2ForCausalLM": GgufLayout("qwen2"),
    "Qwen3ForCausalLM": GgufLayout("qwen3"),
    "Qwen2MoeForCausalLM": GgufLayout("qwen2moe", stacked_experts=True),  # Qwen2MoeModel.modify_tensors
    "Qwen3MoeForCausalLM": GgufLayout("qwen3moe", stacked_experts=True),  # Qwen2MoeModel's too
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
    expert: int | None = None  # expert e of a stacked `…_exps` tensor (a split-stored base's expert)
    pieces: tuple[str, ...] = ()  # GGUF tensors concatenated after gguf_name on dim 1 (a fused gate_up)


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
        expert = _expert_source(name, name_map, present) if layout.stacked_experts else None
        if expert is not None:
            sources[name] = expert
            continue
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


_PER_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _expert_source(name: str, name_map, present: set) -> GgufSource | None:
    """Where base tensor `name`, an MoE expert weight, is in a GGUF whose converter stacks experts:
    a split-stored expert's weight (`…experts.{e}.gate_proj.weight`) is expert e of the stacked
    tensor of its projection; a fused `…experts.gate_up_proj` (E, 2·I, H) is the gate and up
    tensors concatenated on dim 1 (the converter split it at row I, gate first); a fused
    `…experts.down_proj` is its stacked tensor whole. None where `name` is none of these, or the
    file lacks the tensor."""
    found = _PER_EXPERT.match(name)
    if found is not None:
        stacked = name_map.get_name(f"{found['block']}.{found['proj']}.weight", try_suffixes=(".weight",))
        if stacked is None or "_exps" not in stacked or stacked not in present:
            return None
        return GgufSource(stacked, expert=int(found["expert"]))
    block, _, parameter = name.rpartition(".")
    if not block.endswith(".experts") or parameter not in _FUSED_EXPERTS:
        return None
    mapped = [
        name_map.get_name(f"{block}.{p}.weight", try_suffixes=(".weight",)) for p in _FUSED_EXPERTS[parameter]
    ]
    if any(m is None or "_exps" not in m or m not in present for m in mapped):
        return None
    return GgufSource(mapped[0], pieces=tuple(mapped[1:]))


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
    if _transposed(layout, name, value):
        value = value.T.contiguous()
    if layout.permute_qk:
        heads = permuted_heads(name, base_config)
        if heads is not None:
            value = llama_unpermute(value, *heads)
    return value


def to_gguf_layout(value: torch.Tensor, name: str, base_config: dict) -> torch.Tensor:
    """The inverse of `to_base_layout`: base tensor `name` as the converter lays it out (Llama's q/k
    rows permuted, GPT-2's Conv1D weights transposed), rows as the file stores them."""
    layout = merged_gguf_layout(base_config)
    if layout.permute_qk:
        heads = permuted_heads(name, base_config)
        if heads is not None:
            value = llama_permute(value, *heads)
    if _transposed(layout, name, value):
        value = value.T.contiguous()
    return value


def _transposed(layout: GgufLayout, name: str, value: torch.Tensor) -> bool:
    """Whether the converter writes base tensor `name` transposed (a Conv1D weight, GgufLayout.transposed)."""
    leaf = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
    return name.endswith(".weight") and leaf in layout.transposed and value.dim() == 2
