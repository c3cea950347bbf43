"""Expert LoRA in `export`: which modules are an MoE block's experts, and their factors in the layout
the target loads (docs/export.md, "MoE experts").

An adapter's expert LoRA is either per-expert 2-D modules (`…experts.{e}.gate_proj`, Mixtral's `w1`)
or PEFT target_parameters on the fused 3-D parameter (`…experts.gate_up_proj`). The base's structure
(lorasurgery.model, from its config.json) says which fused parameter each per-expert module is a part
of, in which order and whether gate/up interleave (Structure.expert_slices, model/experts.py: the
same slices binding binds per-expert modules to); nothing is guessed from shapes.
`expert_groups` gathers them per fused parameter; `fused_factors` gives each group in PEFT's fused
layout through lorasurgery.adapter.experts (exact; folding, padding and the fused rank said), which
moe_factors.py turns into what the target loads; `fused_keys` the keys PEFT nests several targeted
parameters of one module under.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorasurgery.adapter.experts import FusedFactors, PartFactors, fuse
from lorasurgery.adapter.model import PEFT_PREFIX
from lorasurgery.errors import MismatchError, UnsupportedError
from lorasurgery.io import torch_dtype_of
from lorasurgery.targets import FIXED, IMPOSSIBLE, PASS, Rule

# How each target loads expert LoRA, read from its source (docs/export.md, "MoE experts"): FUSED is
# PEFT's target_parameters on the fused parameters, PER_EXPERT one 2-D module per expert and projection
# under the checkpoint's expert names.
FUSED, PER_EXPERT = "fused", "per-expert"
# vLLM's models with `is_3d_moe_weight = True` (their expert LoRA is loaded fused, FusedMoE3DWithLoRA):
# vllm/model_executor/models/{gpt_oss,qwen3_5,qwen3_vl_moe,glm4_moe_lite,interns1_pro}.py
VLLM_3D_MOE = {
    "GptOssForCausalLM",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Glm4MoeLiteForCausalLM",
    "InternS1ProForConditionalGeneration",
}
VLLM_SOURCE = "vllm/lora/model_manager.py at 01533aa (_create_lora_modules, _stack_moe_lora_weights)"
SGLANG_SOURCE = "python/sglang/srt/lora/lora.py (2026: _rename_expert_w_to_proj, normalize_gate_up_proj)"


def layout_for(target: str, architecture: str | None) -> str:
    """The expert layout `target` loads on a base of `architecture`."""
    if target == "peft":  # the base's current transformers model: transformers 5 fuses the experts
        return FUSED
    if target == "vllm":
        return FUSED if architecture in VLLM_3D_MOE else PER_EXPERT
    return PER_EXPERT


def refusal(target: str, groups: dict) -> str | None:
    """Why `target` cannot carry these expert groups, or None."""
    if target == "llama.cpp":
        return "llama.cpp's GGUF export covers dense Llama only"
    dora = sorted(name for name, group in groups.items() if any(lo.dora for lo in group.sources))
    if dora:
        return (
            f"the experts of {dora[0]} are DoRA, which no fused expert LoRA carries (PEFT's target_parameters "
            f"LoRA has no magnitude vector) and export does not convert expert DoRA to LoRA"
        )
    interleaved = sorted(name for name, group in groups.items() if group.interleaved)
    if target == "sglang" and interleaved:
        return (
            f"SGLang ({SGLANG_SOURCE}) stacks an expert's gate and up LoRA as concatenated halves; it has no "
            f"path for gate/up interleaved as in {interleaved[0]}"
        )
    return None


@dataclass
class ExpertGroup:
    """The LoRA of one fused expert parameter, in the adapter's layout."""

    parameter: str  # the fused parameter, e.g. model.layers.0.mlp.experts.gate_up_proj
    experts: int
    parts: int = 1  # per-expert modules it is made of per expert (gate and up: 2)
    interleaved: bool = False
    shapes: dict[int, tuple[int, int]] = field(
        default_factory=dict
    )  # part -> (out, in) of one expert's slice
    per_expert: dict[tuple[int, int], object] = field(default_factory=dict)  # (expert, part) -> LoraModule
    fused: object = None  # the adapter's target_parameters LoraModule on it

    @property
    def module(self) -> str:
        return self.parameter.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.parameter.rpartition(".")[2]

    @property
    def sources(self) -> list:
        return [self.fused] if self.fused is not None else list(self.per_expert.values())


def expert_groups(adapter, structure) -> dict[str, ExpertGroup]:
    """{fused parameter: ExpertGroup} of every expert LoRA in `adapter` on the base of `structure`."""
    groups: dict[str, ExpertGroup] = {}
    if structure is None or not structure.known:
        return groups
    slices = structure.expert_slices()  # the model layer's, built once per structure (binding's too)
    for lo in adapter.modules.values():
        found = structure.expert_slice(f"{lo.name}.weight") if lo.kind == "linear" else None
        if found is not None:
            group = groups.setdefault(found.parameter, ExpertGroup(found.parameter, found.experts))
            if group.per_expert and (group.parts, group.interleaved) != (found.parts, found.interleaved):
                raise UnsupportedError(
                    f"{adapter.path}: module {lo.name}: the adapter names {found.parameter}'s experts in two "
                    f"ways (one module per expert and per projection, and whole experts); export them apart"
                )
            group.parts, group.interleaved = found.parts, found.interleaved
            out, inp = (found.shape[1], found.shape[0]) if found.transposed else found.shape
            group.shapes[found.part] = (out, inp)
            group.per_expert[(found.expert, found.part)] = lo
        elif lo.kind == "parameter" and lo.experts > 1:
            parameter = f"{lo.name}.{_parameter_of(adapter, lo, structure)}"
            group = groups.setdefault(parameter, ExpertGroup(parameter, lo.experts))
            group.fused = lo
    for name, group in groups.items():
        if group.fused is not None and not group.per_expert:  # how it splits, should a target need that
            family = [f for f in slices.values() if f.parameter == name]
            split_in = max(family, key=lambda f: f.parts, default=None)
            if split_in is not None:
                group.parts, group.interleaved = split_in.parts, split_in.interleaved
    for group in groups.values():
        if group.fused is not None and group.per_expert:
            some = next(iter(group.per_expert.values())).name
            raise MismatchError(
                f"{adapter.path}: {group.parameter} is adapted twice: by target_parameters and by per-expert "
                f"modules ({some} …); PEFT would apply both; merge the adapter or export its parts apart"
            )
    return groups


def _parameter_of(adapter, lo, structure) -> str:
    """Which parameter a target_parameters wrapper adapts: PEFT nests the module's targeted parameters in
    registration order, the first innermost (the most `.base_layer` segments in its keys)."""
    if lo.parameter:
        return lo.parameter
    module = structure.module(lo.name)
    if module is None:
        raise MismatchError(
            f"{adapter.path}: module {lo.name}: the base has no such module ({structure.source})"
        )
    targeted = [p for p in module.parameters if p in lo.candidates]
    wrappers = sum(1 for m in adapter.modules.values() if m.kind == "parameter" and m.name == lo.name)
    if wrappers != len(targeted) or lo.depth >= wrappers:
        raise MismatchError(
            f"{adapter.path}: module {lo.name}: {wrappers} LoRA on its parameters, but the base's "
            f"{module.cls} has {', '.join(targeted) or 'none'} of the targeted {', '.join(lo.candidates)}"
        )
    return targeted[wrappers - 1 - lo.depth]


def _part_factors(adapter, group: ExpertGroup, part: int, rank: int, dtype) -> PartFactors:
    """Every expert's factors of one part; an expert the adapter does not adapt gets zero factors
    (ΔW = 0, exact) of the others' rank."""
    A, B, scales = [], [], []
    out, inp = group.shapes[part]
    for e in range(group.experts):
        lo = group.per_expert.get((e, part))
        if lo is None:
            A.append(torch.zeros((rank, inp), dtype=dtype))
            B.append(torch.zeros((out, rank), dtype=dtype))
            scales.append(None)
            continue
        a, b = adapter.read_factors(lo)
        A.append(a)
        B.append(b)
        scales.append(lo.scale)
    known = [s for s in scales if s is not None]
    return PartFactors(A, B, [s if s is not None else known[0] for s in scales])


def fused_factors(adapter, group: ExpertGroup, float64: bool = False) -> FusedFactors:
    """The group's LoRA in PEFT's fused layout (copied when it is fused already); `float64`: every
    factor cast first, the exact reference the written one's error is measured against."""
    cast = (lambda t: t.double()) if float64 else (lambda t: t)
    if group.fused is not None:
        A, B = adapter.read_factors(group.fused)
        r = A.shape[0] // group.experts
        return FusedFactors(cast(A), cast(B), r, group.experts, group.fused.scale)
    missing = sorted({k for k in range(group.parts)} - {k for _, k in group.per_expert})
    if missing:
        some = next(iter(group.per_expert.values())).name
        raise UnsupportedError(
            f"{adapter.path}: module {some}: the adapter adapts only some projections of {group.parameter} "
            f"(part {missing[0] + 1} of {group.parts} has no LoRA on any expert); a fused LoRA cannot leave it "
            f"out; merge the adapter (`lorasurgery merge`) instead"
        )
    sources = list(group.per_expert.values())
    rank = max(lo.r for lo in sources)
    dtype = torch_dtype_of(adapter.tensors[sources[0].b_key].dtype)
    parts = [_part_factors(adapter, group, k, rank, dtype) for k in range(group.parts)]
    if float64:
        parts = [PartFactors([a.double() for a in p.A], [b.double() for b in p.B], p.scales) for p in parts]
    fused = fuse(parts, group.interleaved)
    if len(group.per_expert) < group.experts * group.parts:
        fused.notes.append("zero-filled")
    return fused


def fused_keys(module: str, parameters: list[str], registered: list[str]) -> dict[str, tuple[str, str]]:
    """{parameter: (lora_A key, lora_B key)} of the targeted `parameters` of `module`: PEFT nests one
    wrapper per parameter in registration order (`registered`), the first innermost."""
    ordered = [p for p in registered if p in parameters]
    keys = {}
    for i, parameter in enumerate(ordered):
        prefix = PEFT_PREFIX + module + ".base_layer" * (len(ordered) - 1 - i)
        keys[parameter] = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
    return keys


def zero_fused(structure, parameter: str, rank: int, dtype) -> FusedFactors:
    """A LoRA of ΔW = 0 on `parameter` (vLLM's fused path needs both gate_up_proj and down_proj)."""
    module, _, leaf = parameter.rpartition(".")
    found = structure.module(module)
    experts, d1, d2 = found.parameters[leaf]
    inp, out = (d1, d2) if found.transposed else (d2, d1)
    zeros = torch.zeros((rank * experts, inp), dtype=dtype)
    return FusedFactors(zeros, torch.zeros((out, rank * experts), dtype=dtype), rank, experts, 1.0, ["zero"])


def per_expert_names(structure, group: ExpertGroup, tensors) -> dict[tuple[int, int], str]:
    """{(expert, part): module name} of the group's per-expert modules as the base's checkpoint names
    them (a name its weights hold; else the checkpoint's original spelling, the last one)."""
    candidates: dict[tuple[int, int], list[str]] = {}
    parts = 2 if group.leaf == "gate_up_proj" else 1
    for name, found in structure.expert_slices().items():
        if found.parameter == group.parameter and found.parts == parts:
            candidates.setdefault((found.expert, found.part), []).append(name)
    names = {}
    for key, spellings in candidates.items():
        chosen = next((n for n in spellings if n in tensors), spellings[-1])
        names[key] = chosen.removesuffix(".weight")
    return names


def experts_rule(adapter, target: str, groups: dict, structure, tensors=()) -> Rule | None:
    """`inspect --for` / export's rule for expert LoRA: loadable as is, rewritten by export into the
    layout the target loads (exact), or impossible (what to do instead)."""
    fused_alone = sorted(
        lo.name for lo in adapter.modules.values() if lo.kind == "parameter" and lo.experts > 1
    )
    requirement = {
        "peft": "PEFT loads expert LoRA in the base's current transformers layout (transformers 5: "
        "target_parameters on the fused gate_up_proj / down_proj)",
        "vllm": f"vLLM ({VLLM_SOURCE}) loads expert LoRA fused on its is_3d_moe_weight models (gpt-oss), "
        f"else one module per expert and projection",
        "sglang": f"SGLang ({SGLANG_SOURCE}) loads expert LoRA one module per expert and projection, "
        f"gate and up at one rank",
        "llama.cpp": "llama.cpp's GGUF export covers dense Llama only",
    }[target]
    if not groups:
        if not fused_alone or structure is not None:
            return None
        return Rule(
            "experts",
            requirement,
            FIXED,
            fused_alone,
            "pass --base BASE (its config.json): export rewrites the experts' LoRA by the base's structure",
        )
    names = sorted(groups)
    why = refusal(target, groups)
    if why is not None:
        return Rule(
            "experts", requirement, IMPOSSIBLE, names, f"{why}: merge the adapter (`lorasurgery merge`)"
        )
    layout = layout_for(target, structure.architecture)
    source = FUSED if all(g.fused is not None for g in groups.values()) else PER_EXPERT
    if source == layout and _as_loaded(target, layout, groups, structure, tensors):
        return Rule("experts", requirement, PASS, names)
    return Rule(
        "experts",
        requirement,
        FIXED,
        names,
        f"export writes the experts' LoRA {'fused (target_parameters)' if layout == FUSED else 'per expert'} "
        f"(exact; the fused rank is said)",
    )


def _as_loaded(target: str, layout: str, groups: dict, structure, tensors) -> bool:
    """Whether the adapter's expert LoRA already is what the target loads: PEFT's fused layout; or
    one module per expert under the checkpoint's names at one scale (and, SGLang, one rank)."""
    if target == "peft":
        return True
    if layout == FUSED:  # vLLM's fused path: both parameters of every experts module, one rank
        modules = {g.module for g in groups.values()}
        ranks = {g.fused.r for g in groups.values()}
        return len(groups) == 2 * len(modules) and len(ranks) == 1
    for group in groups.values():
        names = per_expert_names(structure, group, tensors)
        if any(names.get(key) != lo.name for key, lo in group.per_expert.items()):
            return False
        if len(group.per_expert) != group.experts * group.parts:
            return False
    los = [lo for g in groups.values() for lo in g.per_expert.values()]
    return len({lo.scale for lo in los}) == 1 and (target != "sglang" or len({lo.r for lo in los}) == 1)
