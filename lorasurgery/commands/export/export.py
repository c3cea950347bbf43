"""`export --for vllm|sglang|llama.cpp|peft`: rewrite an adapter so the target computes PEFT's ΔW.

Every module's true update is ΔW_m = s_m·B_m@A_m (s_m from α, r, rsLoRA and the patterns, as PEFT
computes it). The target applies its own multiplier t_m to what it loads (vLLM/SGLang one global g,
llama.cpp α/rank per tensor, see export_rules), so export writes factors with t_m·B'@A' = ΔW_m:
- plain module: B' = (s_m/t_m)·B, A' = A (B kept byte for byte when s_m = t_m);
- rank above --max-rank, or DoRA with --base: the optimal rank-k factors of ΔW_m/t_m from its exact
  SVD (lorasurgery.factored: module_svd, truncated_factors), the relative error reported after the cast;
- SGLang: every module zero-padded to one rank (exact), since it stacks q/k/v and gate/up.
The config is written so that every reading gives t_m: r = R, lora_alpha = g·R and, for modules of
another rank k, rank_pattern k and alpha_pattern g·k (PEFT and pattern-aware vLLM read g; vLLM
releases without patterns read lora_alpha/r = g). What a target cannot carry is refused before
anything is written, with the alternative (see docs/export.md, "Semantics").
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from lorasurgery.adapter import load_adapter
from lorasurgery.adapter.experts import padded, split
from lorasurgery.adapter.model import lora_keys
from lorasurgery.adapter.names import find_prefix_rule
from lorasurgery.adapter.writer import write_adapter_folder
from lorasurgery.binding import bind, saved_fan_in_fan_out
from lorasurgery.commands.export import moe
from lorasurgery.commands.export.gguf import check_gguf_output, write_gguf
from lorasurgery.errors import AdapterError, CheckpointError, UnsupportedError
from lorasurgery.factored import adapter_of, module_svd, truncated_factors
from lorasurgery.io import (
    atomic_output_dir,
    check_output_path,
    copy_side_files,
    open_checkpoint,
    read_json,
    torch_dtype_of,
)
from lorasurgery.linalg.lowrank import LowRankSVD, concatenated_factors, lowrank_fro_norm
from lorasurgery.model import structure_of
from lorasurgery.naming import natural_key
from lorasurgery.progress import Progress, ProgressCallback, no_progress
from lorasurgery.targets import (
    FIXED,
    IMPOSSIBLE,
    PASS,
    VLLM_KNOWN,
    check_rules,
    embedding_copies,
    parse_target,
    verdict,
)

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass
class ModuleExport:
    name: str
    kind: str
    rank_in: int
    rank_out: int
    scale_in: float  # PEFT's s_m
    multiplier: float  # what the target applies: t_m
    method: str  # copied | folded | truncated | dora→lora | padded (added to the others)
    relative_error: float  # ‖t_m·B'@A' − ΔW_m‖_F / ‖ΔW_m‖_F, after the cast


@dataclass
class ExportReport:
    adapter: str
    target: str
    output: str
    rules: list
    modules: list[ModuleExport] = field(default_factory=list)
    dropped: dict[str, float] = field(default_factory=dict)  # saved tensor -> its Frobenius norm
    config: dict = field(default_factory=dict)  # what the target reads: r/alpha (or GGUF alpha)
    notes: list[str] = field(default_factory=list)
    release: str | None = None  # vllm: the range of releases whose rules the report's rules are

    @property
    def max_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "target": self.target,
            "target_release": self.release,
            "output": self.output,
            "rules": [r.to_json() for r in self.rules],
            "modules": [vars(m) for m in self.modules],
            "dropped": self.dropped,
            "config": self.config,
            "max_relative_error": self.max_error,
            "notes": self.notes,
        }


def _base_parts(base) -> tuple[dict | None, object | None]:
    """(config.json, weights checkpoint or None) of a base folder; either may be missing."""
    if base is None:
        return None, None
    base = Path(base)
    if not base.exists():
        raise CheckpointError(f"{base}: no such base folder")
    config = None
    folder = base if base.is_dir() else base.parent
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json", "config.json")
    try:
        checkpoint = open_checkpoint(base)
    except CheckpointError:
        checkpoint = None
    return config, checkpoint


def base_structure(base, base_config, base_ckpt):
    """The base's model.Structure (kinds, ties), from its weights' names when it has weights."""
    if base_config is None:
        return None
    if base_ckpt is not None:
        return structure_of(base_ckpt)
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    return structure_of(SimpleNamespace(tensors={}), config_file=folder / "config.json")


def refusal(adapter_path, target: str, rules) -> str:
    """One sentence per impossible rule: what, which modules, and the alternative."""
    parts = []
    for rule in rules:
        if rule.status != IMPOSSIBLE:
            continue
        listed = ", ".join(rule.modules[:6]) + (
            f" and {len(rule.modules) - 6} more" if len(rule.modules) > 6 else ""
        )
        parts.append(f"{rule.requirement}" + (f" [{listed}]" if listed else "") + f"; {rule.action}")
    return f"{adapter_path}: cannot export for {target}: " + " | ".join(parts) + "; nothing was written"


def _most_common(values: list[float], default: float) -> float:
    return Counter(values).most_common(1)[0][0] if values else default


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


@dataclass
class _Factors:
    A: torch.Tensor  # (k, in) / (k, vocab)
    B: torch.Tensor  # (out, k) / (dim, k)
    method: str
    error: float


def _plain_factors(adapter, lora, multiplier: float) -> _Factors:
    """B' = (s/t)·B in float64, cast once to B's dtype; B kept as stored when s = t."""
    A, B = adapter.read_factors(lora.name)
    ratio = lora.scale / multiplier
    if ratio == 1.0:
        return _Factors(A, B, "copied", 0.0)
    B_out = (B.double() * ratio).to(B.dtype)
    # error of t·B'@A against s·B@A exactly: ‖[t·B', −s·B]·[A; A]‖_F from r × r Grams (a conv's
    # factors seen as (r, in·∏k) and (out, r))
    r = A.shape[0]
    A2, B2, B2_out = A.reshape(r, -1), B.reshape(B.shape[0], r), B_out.reshape(B.shape[0], r)
    A_cat, B_cat = concatenated_factors([(A2, B2_out, multiplier), (A2, B2, -lora.scale)])
    error = lowrank_fro_norm(A_cat.double(), B_cat.double()) / max(
        lowrank_fro_norm(A2, B2, lora.scale), 1e-300
    )
    return _Factors(A, B_out, "folded", error)


def _svd_factors(source, lora, multiplier: float, k: int, method: str) -> _Factors:
    """Optimal rank-k factors of ΔW/t (resize's exact SVD; DoRA's effective update with `source` an
    adapter bound to its base, lorasurgery.binding)."""
    svd = module_svd(source, lora.name)
    svd = LowRankSVD(U=svd.U, S=svd.S / multiplier, Vh=svd.Vh)  # t·B'@A' = ΔW
    dtype = adapter_of(source).tensors[lora.b_key].dtype

    A, B, error = truncated_factors(svd, k, torch_dtype_of(dtype))
    return _Factors(A, B, method, float(error))


def _pad(f: _Factors, rank: int) -> _Factors:
    k = f.A.shape[0]
    if k >= rank:
        return f
    A = torch.cat([f.A, torch.zeros((rank - k, f.A.shape[1]), dtype=f.A.dtype)], dim=0)
    B = torch.cat([f.B, torch.zeros((f.B.shape[0], rank - k), dtype=f.B.dtype)], dim=1)
    return _Factors(A, B, f.method + "+padded", f.error)


def export_adapter(
    adapter_path: str | os.PathLike,
    target: str,
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    max_rank: int | None = None,
    drop_saved: bool = False,
    force: bool = False,
    progress: ProgressCallback = no_progress,
) -> ExportReport:
    """Write ADAPTER for `target` at `output` (a folder; a .gguf file for llama.cpp), or refuse.

    The steps: the rules checked (a refusal names every impossible one), the ranks and the target's
    multipliers chosen, each module's factors for the target, the saved tensors left out or dropped,
    then the folder or GGUF file written atomically. `target` is a targets.Target or its text
    (`vllm==0.31`: that release's rules in the report; what is written is the same for every vLLM
    release, since every one reads it alike: docs/export.md "Semantics")."""
    spec = parse_target(target)
    target = spec.name
    adapter = load_adapter(adapter_path)
    inputs = [adapter_path] + ([base] if base else [])
    if target == "llama.cpp":  # refuse an unusable OUT before any work
        check_gguf_output(output, inputs, force)
    else:
        check_output_path(output, inputs, force)
    base_config, base_ckpt = _base_parts(base)
    structure = base_structure(base, base_config, base_ckpt)
    rules = check_rules(
        adapter,
        spec,
        base_config=base_config,
        have_base_weights=base_ckpt is not None,
        max_rank=max_rank,
        drop_saved=drop_saved,
        structure=structure,
    )
    hints: list[str] = []
    groups = _expert_groups(adapter, adapter_path, target, structure, max_rank, hints)
    experts_rule = moe.experts_rule(
        adapter, target, groups, structure, base_ckpt.tensors if base_ckpt else ()
    )
    rules += [experts_rule] if experts_rule is not None else []
    if any(r.status == IMPOSSIBLE for r in rules):
        raise UnsupportedError(refusal(adapter_path, target, rules))
    _check_dora_rank(adapter, adapter_path, target, max_rank)

    report = ExportReport(
        str(adapter_path), target, str(output), rules, notes=hints, release=spec.release_text
    )
    if spec.releases is not None:
        report.notes.append(
            f"rules of vLLM {spec.releases}; written so that every release known ({VLLM_KNOWN}) computes the "
            "same: use_rslora off, the patterns' α/r of every module equal to lora_alpha/r"
        )
    in_groups = {id(lo) for group in groups.values() for lo in group.sources}
    modules = sorted(
        (lo for lo in adapter.modules.values() if id(lo) not in in_groups),
        key=lambda lo: natural_key(lo.name),
    )
    experts = _expert_layout(adapter, groups, target, structure)
    shape = _shape_of(modules, target, max_rank, experts)
    if target == "llama.cpp":
        report.config = {"adapter.lora.alpha": shape.alpha}
    factors = _target_factors(adapter, base_ckpt, modules, shape, report, progress)
    copies = embedding_copies(adapter) if target != "peft" else set()
    _check_copies(adapter, copies, base_ckpt, report)
    if drop_saved and target != "peft":
        _report_dropped(adapter, copies, report)

    if target == "llama.cpp":
        write_gguf(adapter, modules, factors, shape.alpha, base_config, output, force=force, inputs=inputs)
        return report
    config = _folder_config(adapter, target, modules, shape.ranks, shape.R, shape.multiplier, shape.keep_dora)
    expert_tensors = _expert_tensors(
        adapter,
        groups,
        experts,
        modules,
        shape,
        structure,
        config,
        report,
        base_ckpt.tensors if base_ckpt else {},
    )
    report.config = {"r": config["r"], "lora_alpha": config["lora_alpha"]}
    tensors = _folder_tensors(
        adapter, target, modules, factors, shape.multiplier, shape.keep_dora, expert_tensors
    )
    with atomic_output_dir(output, inputs=inputs, force=force) as folder:
        write_adapter_folder(folder, tensors, config)
        if Path(adapter_path).is_dir():
            copy_side_files(Path(adapter_path), folder, SIDE_FILES)
    return report


_EXPERT_NAME = re.compile(r"\.experts\.\d+\.")


def _expert_groups(
    adapter, adapter_path, target: str, structure, max_rank: int | None, warnings: list
) -> dict:
    """The adapter's expert LoRA per fused parameter (commands/export/moe.py), or a refusal naming
    what the target cannot carry."""
    fused_alone = sorted(
        lo.name for lo in adapter.modules.values() if lo.kind == "parameter" and lo.experts > 1
    )
    if structure is None and fused_alone:
        raise UnsupportedError(
            f"{adapter_path}: module {fused_alone[0]}: a LoRA on fused expert parameters (target_parameters) "
            f"needs the base's structure to be exported: pass --base BASE (a folder with its config.json); "
            f"nothing was written"
        )
    groups = moe.expert_groups(adapter, structure)
    if structure is None and any(_EXPERT_NAME.search(name) for name in adapter.modules):
        # a hint, never a decision: without the base's structure nothing says these are experts
        warnings.append(
            "module names look like per-expert MoE modules (…experts.{e}.…); pass --base BASE so that "
            "export writes them in the layout the target loads (transformers 5 fuses experts)"
        )
    if not groups:
        return groups
    some = ", ".join(sorted(groups)[:3]) + (f" and {len(groups) - 3} more" if len(groups) > 3 else "")
    why = moe.refusal(target, groups)
    if why is not None:
        raise UnsupportedError(
            f"{adapter_path}: cannot export for {target}: the adapter has LoRA on MoE experts ({some}); "
            f"{why}: merge the adapter (`lorasurgery merge`) and serve the merged model; nothing was written"
        )
    if max_rank is not None:
        raise UnsupportedError(
            f"{adapter_path}: --max-rank with LoRA on MoE experts ({some}) is not supported by export yet; "
            f"export without it (exact) and `lorasurgery resize` the result; nothing was written"
        )
    return groups


def _expert_layout(adapter, groups: dict, target: str, structure) -> tuple:
    """(layout, {parameter: FusedFactors}, their common scale, the ranks of the modules written) of
    the expert groups for `target`."""
    layout = moe.layout_for(target, structure.architecture if structure is not None else None)
    fused = {name: moe.fused_factors(adapter, group) for name, group in sorted(groups.items())}
    scale = _most_common([f.scale for f in fused.values()], 1.0) if fused else None
    if layout == moe.FUSED:
        ranks = [f.rank for f in fused.values()]
    else:  # a stacked gate/up splits back into its own ranks
        ranks = [
            part.A[0].shape[0]
            for name, f in fused.items()
            for part in split(f, groups[name].parts, groups[name].interleaved)
        ]
    return layout, fused, scale, ranks


def _expert_tensors(
    adapter, groups: dict, experts, modules, shape, structure, config: dict, report, base_tensors
) -> dict:
    """Every expert group in the layout the target loads (moe.layout_for): PEFT's target_parameters on
    the fused parameter (PEFT's nested keys; vLLM's fused path also needs both of a module's parameters,
    the missing one given ΔW = 0), or one 2-D module per expert and projection under the checkpoint's
    names (split exactly, moe.py); scales folded to the target's one scale g, the config's patterns and
    targets extended; a report row per fused parameter."""
    layout, fused = experts[0], experts[1]
    if not fused:
        return {}
    g = next(iter(shape.multiplier.values())) if modules else experts[2]
    target = report.target
    if not modules:  # only experts: the config's r is their most common rank (vLLM, SGLang: shape.R)
        R = Counter(f.rank for f in fused.values()).most_common(1)[0][0]
        R = shape.R if target in ("vllm", "sglang") else R
        config.update(r=R, lora_alpha=_number(g * R))
    R = config["r"]
    written = {name: moe.refolded(f, g) for name, f in fused.items()}
    if target == "vllm" and layout == moe.FUSED:
        for name in list(written):
            for leaf in ("gate_up_proj", "down_proj"):
                sibling = f"{groups[name].module}.{leaf}"
                if sibling not in written:
                    zero = moe.zero_fused(structure, sibling, written[name].rank, written[name].A.dtype)
                    written[sibling] = moe.refolded(zero, g)
        # one rank per experts module: vLLM stacks its gate_up and down LoRA in buffers of one rank
        for name in written:
            module = groups[name].module if name in groups else name.rpartition(".")[0]
            rank = max(f.rank for n, f in written.items() if n.rpartition(".")[0] == module)
            written[name] = padded(written[name], rank)
    tensors: dict = {}

    def pattern(name: str, rank: int) -> None:
        if rank != R:
            config["rank_pattern"][re.escape(name)] = rank
            config["alpha_pattern"][re.escape(name)] = _number(g * rank)

    if layout == moe.FUSED:
        by_module: dict[str, list[str]] = {}
        for name in written:
            module, _, leaf = name.rpartition(".")
            by_module.setdefault(module, []).append(leaf)
        for module, leaves in by_module.items():
            keys = moe.fused_keys(module, leaves, list(structure.module(module).parameters))
            for leaf in leaves:
                name = f"{module}.{leaf}"
                tensors[keys[leaf][0]] = written[name].A.contiguous()
                tensors[keys[leaf][1]] = written[name].B.contiguous()
                pattern(name, written[name].rank)
        config["target_parameters"] = sorted(written)
    else:
        names_written, split_ranks = [], {}
        for name, f in written.items():
            group = groups[name]
            names = moe.per_expert_names(structure, group, base_tensors)
            for k, part in enumerate(split(f, group.parts, group.interleaved)):
                for e, (A, B) in enumerate(zip(part.A, part.B)):
                    module = names[(e, k)]
                    if target == "sglang":  # one rank for every module (SGLang stacks gate with up)
                        f_padded = _pad(_Factors(A, B, "", 0.0), shape.R)
                        A, B = f_padded.A, f_padded.B
                    keys = lora_keys(module)
                    tensors[keys.A], tensors[keys.B] = A.contiguous(), B.contiguous()
                    pattern(module, A.shape[0])
                    names_written.append(module)
                    split_ranks[name] = max(split_ranks.get(name, 0), A.shape[0])
        if target == "sglang":
            leaves = {n.rsplit(".", 1)[-1] for n in names_written}
            config["target_modules"] = sorted(set(config["target_modules"]) | leaves)
        else:
            config["target_modules"] = sorted(config["target_modules"] + names_written, key=natural_key)
    for name, group in sorted(groups.items()):
        # only folding rounds (copying, stacking, padding, zero-filling and splitting are exact)
        error = 0.0
        if "folded" in written[name].notes:
            exact = padded(moe.fused_factors(adapter, group, float64=True), written[name].rank)
            error = moe.relative_error(written[name], exact)
        method = written[name].method + ("+split" if layout == moe.PER_EXPERT else "")
        sources = group.sources
        report.modules.append(
            ModuleExport(
                name,
                "parameter",
                max(lo.r for lo in sources),
                written[name].rank if layout == moe.FUSED else split_ranks[name],
                _most_common([lo.scale for lo in sources], g),
                g,
                method,
                error,
            )
        )
    zeros = sorted(set(written) - set(groups))
    if zeros:
        report.notes.append(
            f"vLLM's fused expert LoRA needs both gate_up_proj and down_proj: {', '.join(zeros[:3])}"
            f"{' …' if len(zeros) > 3 else ''} written with ΔW = 0 (exact)"
        )
    stacked = [name for name in fused if "stacked" in fused[name].notes]
    if stacked and layout == moe.FUSED:
        report.notes.append(
            f"gate and up of {len(stacked)} fused parameters had different lora_A, so their fused LoRA "
            f"stacks both: rank r_gate + r_up per expert ({', '.join(stacked[:3])}"
            f"{' …' if len(stacked) > 3 else ''}); exact"
        )
    return tensors


def _check_dora_rank(adapter, adapter_path, target: str, max_rank: int | None) -> None:
    """--for peft keeps DoRA as DoRA, which no truncation can follow below a module's rank."""
    if target != "peft" or max_rank is None:
        return
    if any(lo.dora and lo.r > max_rank for lo in adapter.modules.values()):
        raise UnsupportedError(
            f"{adapter_path}: --max-rank below a DoRA module's rank needs the DoRA → LoRA conversion; "
            f"export it --for vllm (or resize --base) instead; nothing was written"
        )


@dataclass
class _Shape:
    """The exported adapter's ranks and the target's multiplier t_m per module."""

    keep_dora: bool  # --for peft writes DoRA as DoRA; every other target as a plain LoRA of W' − W
    rank_out: dict[str, int]  # the rank each module's factors are computed at
    ranks: dict[str, int]  # the rank each module is written at (SGLang: padded to one)
    R: int  # the config's r
    multiplier: dict[str, float]  # the scale the target applies to module m
    alpha: float | None = None  # llama.cpp's one adapter.lora.alpha

    def via_svd(self, lo) -> bool:
        return (lo.dora and not self.keep_dora) or self.rank_out[lo.name] < lo.r


def _shape_of(modules, target: str, max_rank: int | None, experts=None) -> _Shape:
    """`experts`: _expert_layout's (layout, fused factors, scale), whose ranks SGLang's one rank covers
    and whose scale is the target's when the adapter has no other module."""
    keep_dora = target == "peft"

    def rank_out(lo) -> int:
        if lo.dora and not keep_dora:  # W' − W is full rank: --max-rank is the rank it is written at
            return min(max_rank or lo.r, min(lo.shape[0], math.prod(lo.shape[1:])))
        return min(lo.r, max_rank) if max_rank is not None else lo.r

    out = {lo.name: rank_out(lo) for lo in modules}
    ranks = dict(out)
    expert_ranks = experts[3] if experts else []
    if target == "sglang":
        common = max([*ranks.values(), *expert_ranks])
        ranks = {name: common for name in ranks}
    R = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    R = max([*ranks.values(), *expert_ranks] or [1]) if target in ("vllm", "sglang") else R
    shape = _Shape(keep_dora, out, ranks, R, {})

    # The target's multiplier t_m, chosen so that as many modules as possible are copied unchanged.
    plain = [lo for lo in modules if not shape.via_svd(lo)]
    if target == "llama.cpp":
        shape.alpha = _most_common([lo.scale * lo.r for lo in plain], float(R))
        shape.multiplier = {lo.name: shape.alpha / ranks[lo.name] for lo in modules}
    else:
        g = _most_common([lo.scale for lo in plain], 1.0)
        shape.multiplier = {lo.name: g for lo in modules}
    return shape


def _target_factors(adapter, base_ckpt, modules, shape: _Shape, report: ExportReport, progress):
    """{module: _Factors} as the target loads them: stored factors refolded, or an SVD (DoRA → LoRA,
    above --max-rank), SGLang's padded to one rank; a ModuleExport row for each."""
    bound = adapter
    if base_ckpt is not None and any(lo.dora and not shape.keep_dora for lo in modules):
        # DoRA's W and its layout, for the DoRA → LoRA conversion
        (bound,) = bind([adapter], base_ckpt, config_option=False)
        report.notes += [a.message() for a in bound.assumptions]
    sglang = report.target == "sglang"
    factors: dict[str, _Factors] = {}
    for i, lo in enumerate(modules):
        t, k = shape.multiplier[lo.name], shape.rank_out[lo.name]
        if lo.dora and not shape.keep_dora:
            f = _svd_factors(bound, lo, t, k, "dora→lora")
        elif k < lo.r:  # above --max-rank
            f = _svd_factors(adapter, lo, t, k, "truncated")
        else:
            f = _plain_factors(adapter, lo, t)
        f = factors[lo.name] = _pad(f, shape.ranks[lo.name]) if sglang else f
        report.modules.append(
            ModuleExport(lo.name, lo.kind, lo.r, f.A.shape[0], lo.scale, t, f.method, f.error)
        )
        progress(Progress("export", i + 1, len(modules), lo.name))
    return factors


def _report_dropped(adapter, copies: set[str], report: ExportReport) -> None:
    """--drop-saved: the norm of each saved tensor left out, so the difference is said."""
    for name, key in sorted(adapter.replacements.items()):
        if name in copies:
            continue
        report.dropped[name] = float(torch.linalg.vector_norm(adapter.read(key).double()))
    if report.dropped:
        report.notes.append(
            f"dropped {len(report.dropped)} saved tensors (--drop-saved); the exported adapter is a "
            f"different model from the input by exactly these tensors"
        )


def _check_copies(adapter, copies: set[str], base_ckpt, report: ExportReport) -> None:
    """PEFT's saved copies of a targeted embedding must be the base's own weight to be left out."""
    if not copies:
        return
    if base_ckpt is None:
        report.notes.append(
            f"left out PEFT's saved copies of the base embedding ({', '.join(sorted(copies))}); "
            f"not checked against the base (no --base weights)"
        )
        return

    rule, _ = find_prefix_rule(sorted(copies), base_ckpt.tensors)
    for name in sorted(copies):
        base_name = rule.apply(name)
        saved = adapter.read(adapter.replacements[name])
        if base_name not in base_ckpt.tensors or not torch.equal(
            saved, base_ckpt.read(base_name).to(saved.dtype)
        ):
            raise UnsupportedError(
                f"{adapter.path}: the saved {name} differs from the base's {base_name}: it is a trained "
                f"embedding, which the target cannot load; merge the adapter into the base "
                f"(`lorasurgery merge`) or pass --drop-saved; nothing was written"
            )
    report.notes.append(
        f"left out PEFT's saved copies of the base embedding ({', '.join(sorted(copies))}), equal to the base"
    )


def _folder_config(adapter, target, modules, ranks, R, multiplier, keep_dora) -> dict:
    source = adapter.config
    g = next(iter(multiplier.values()), 1.0)
    others = {lo.name: ranks[lo.name] for lo in modules if ranks[lo.name] != R}
    names = [lo.name for lo in modules]
    if target == "sglang":
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:
        targets = names
    config = {
        "peft_type": "LORA",
        "task_type": source.task_type,
        "base_model_name_or_path": source.base_model_name_or_path,
        "r": R,
        "lora_alpha": _number(g * R),
        "target_modules": targets,
        "rank_pattern": {re.escape(n): k for n, k in others.items()},
        "alpha_pattern": {re.escape(n): _number(g * k) for n, k in others.items()},
        "use_rslora": False,
        "use_dora": bool(keep_dora and source.use_dora),
        "fan_in_fan_out": saved_fan_in_fan_out([adapter]),
        "bias": source.bias if target == "peft" else "none",
        "lora_bias": bool(target == "peft" and source.lora_bias),
        "modules_to_save": source.modules_to_save if target == "peft" else None,
        "lora_dropout": source.raw.get("lora_dropout", 0.0),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config


def _folder_tensors(adapter, target, modules, factors, multiplier, keep_dora, experts: dict) -> dict:
    tensors = dict(experts)
    for lo in modules:
        f = factors[lo.name]
        keys = lora_keys(lo.name, lo.kind)
        tensors[keys.A], tensors[keys.B] = f.A.contiguous(), f.B.contiguous()
        if keep_dora:
            if lo.magnitude_key:
                tensors[keys.magnitude] = adapter.read(lo.magnitude_key)
            if lo.bias_key:  # PEFT scales lora_B's bias with the module's scaling: fold it the same way
                bias = adapter.read(lo.bias_key)
                ratio = lo.scale / multiplier[lo.name]
                tensors[keys.bias] = bias if ratio == 1.0 else (bias.double() * ratio).to(bias.dtype)
    if target == "peft":
        for key in {adapter.replacements[n] for n in adapter.replacements}:
            tensors[key] = adapter.read(key)
    if not tensors:
        raise AdapterError(f"{adapter.path}: nothing to export")
    return tensors


@dataclass
class ServingCheck:
    adapter: str
    target: str
    rules: list
    release: str | None = None  # vllm: the range of releases whose rules were checked

    @property
    def status(self) -> str:
        return verdict(self.rules)

    @property
    def exit_code(self) -> int:
        """0 loadable as is, 3 export makes it loadable, 4 the target cannot carry it."""
        return {PASS: 0, FIXED: 3, IMPOSSIBLE: 4}[self.status]

    @property
    def summary(self) -> str:
        return {
            PASS: "loadable as is",
            FIXED: f"not loadable as is; `lorasurgery export --for {self.target}` makes it exact",
            IMPOSSIBLE: "the target cannot carry this adapter (see the impossible rules)",
        }[self.status]

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "target": self.target,
            "target_release": self.release,
            "status": self.status,
            "rules": [r.to_json() for r in self.rules],
        }


def serving_check(adapter_path, target: str, base=None) -> ServingCheck:
    """`inspect --for`: every rule of `target` (a targets.Target or its text, `vllm==0.31`) against the
    adapter, nothing written."""
    spec = parse_target(target)
    adapter = load_adapter(adapter_path)
    base_config, base_ckpt = _base_parts(base)
    structure = base_structure(base, base_config, base_ckpt)
    rules = check_rules(
        adapter, spec, base_config=base_config, have_base_weights=base_ckpt is not None, structure=structure
    )
    groups = moe.expert_groups(adapter, structure)
    experts_rule = moe.experts_rule(
        adapter, spec.name, groups, structure, base_ckpt.tensors if base_ckpt else ()
    )
    rules += [experts_rule] if experts_rule else []
    return ServingCheck(str(adapter_path), spec.name, rules, spec.release_text)
