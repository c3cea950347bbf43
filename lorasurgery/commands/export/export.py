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
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from lorasurgery.adapter import Adapter, load_adapter
from lorasurgery.adapter.experts import FusedFactors, padded, split
from lorasurgery.adapter.model import lora_keys
from lorasurgery.adapter.names import find_prefix_rule
from lorasurgery.adapter.writer import write_adapter_folder
from lorasurgery.binding import bind, saved_fan_in_fan_out
from lorasurgery.commands.export import moe, moe_factors
from lorasurgery.commands.export.gguf import check_gguf_output, write_gguf
from lorasurgery.concurrency import torch_threads
from lorasurgery.errors import AdapterError, CheckpointError, OptionError, UnsupportedError
from lorasurgery.factored import adapter_of, module_svd, truncated_factors
from lorasurgery.io import (
    Checkpoint,
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
    Target,
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
    relative_error: float  # ‖t_m·B'@A' − ΔW_m‖_F / ‖ΔW_m‖_F, after the cast (experts: the worst one's)
    expert_errors: list[float] | None = None  # a fused expert parameter: each expert's relative error


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


@dataclass(frozen=True)
class _Job:
    """What one export works from: the adapter, the target and its options, the base's parts."""

    adapter: Adapter
    path: str | os.PathLike  # the adapter, as given
    spec: Target  # the target and, for vLLM, the releases whose rules the report says
    output: str | os.PathLike
    base: str | os.PathLike | None
    max_rank: int | None
    drop_saved: bool
    force: bool
    base_config: dict | None = None  # the base's config.json
    base_ckpt: Checkpoint | None = None  # the base's weights
    structure: object = None  # the base's model.Structure

    @property
    def target(self) -> str:
        return self.spec.name

    @property
    def inputs(self) -> list:
        return [self.path] + ([self.base] if self.base else [])

    @property
    def base_tensors(self) -> dict:
        return self.base_ckpt.tensors if self.base_ckpt is not None else {}


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

    The steps: the inputs opened and the output checked (_open), the rules checked with the expert
    LoRA grouped (a refusal names every impossible rule: _checked), the ranks and the target's
    multipliers chosen (_shape_of), each module's factors for the target (_target_factors), the saved
    tensors left out or dropped (_leave_out_saved), then the GGUF file or the folder written atomically
    (_write_folder, with the experts in the layout the target loads: _expert_tensors). `target` is a
    targets.Target or its text (`vllm==0.31`: that release's rules in the report; what is written is
    the same for every vLLM release, since every one reads it alike: docs/export.md "Semantics")."""
    job = _open(adapter_path, parse_target(target), output, base, max_rank, drop_saved, force)
    target = job.target
    report, experts = _checked(job)
    # small per-module kernels (QRs of (d, r), r × r SVDs): one torch thread (concurrency.torch_threads)
    with torch_threads(1):
        in_groups = experts.sources
        modules = sorted(
            (lo for lo in job.adapter.modules.values() if id(lo) not in in_groups),
            key=lambda lo: natural_key(lo.name),
        )
        shape = _shape_of(modules, target, max_rank, experts.ranks)
        factors = _target_factors(job, modules, shape, report, progress)
        _leave_out_saved(job, report)
        if target == "llama.cpp":
            report.config = {"adapter.lora.alpha": shape.alpha}
            write_gguf(
                job.adapter,
                modules,
                factors,
                shape.alpha,
                job.base_config,
                output,
                force=force,
                inputs=job.inputs,
            )
        else:
            _write_folder(job, modules, factors, shape, experts, report)
        return report


def _open(
    adapter_path, spec: Target, output, base, max_rank: int | None, drop_saved: bool, force: bool
) -> _Job:
    """The adapter and the base's parts, after refusing a rank below 1 or an unusable OUT (an unknown
    target was refused by parse_target)."""
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}")
    adapter = load_adapter(adapter_path)
    job = _Job(adapter, adapter_path, spec, output, base, max_rank, drop_saved, force)
    if spec.name == "llama.cpp":  # refuse an unusable OUT before any work
        check_gguf_output(output, job.inputs, force)
    else:
        check_output_path(output, job.inputs, force)
    base_config, base_ckpt = _base_parts(base)
    structure = base_structure(base, base_config, base_ckpt)
    return replace(job, base_config=base_config, base_ckpt=base_ckpt, structure=structure)


def _checked(job: _Job) -> tuple[ExportReport, _Experts]:
    """The target's rules against the adapter and its expert LoRA grouped, or a refusal naming every
    impossible rule; the report begun."""
    rules = check_rules(
        job.adapter,
        job.spec,
        base_config=job.base_config,
        have_base_weights=job.base_ckpt is not None,
        max_rank=job.max_rank,
        drop_saved=job.drop_saved,
        structure=job.structure,
    )
    hints: list[str] = []
    groups = _expert_groups(job, hints)
    experts_rule = moe.experts_rule(job.adapter, job.target, groups, job.structure, job.base_tensors)
    rules += [experts_rule] if experts_rule is not None else []
    if any(r.status == IMPOSSIBLE for r in rules):
        raise UnsupportedError(refusal(job.path, job.target, rules))
    _check_dora_rank(job.adapter, job.path, job.target, job.max_rank)
    experts = _expert_layout(job, groups)
    rules = _with_expert_ranks(rules, experts, job.adapter)
    report = ExportReport(
        str(job.path), job.target, str(job.output), rules, notes=hints, release=job.spec.release_text
    )
    if job.spec.releases is not None:
        report.notes.append(
            f"rules of vLLM {job.spec.releases}; written so that every release known ({VLLM_KNOWN}) "
            "computes the same: use_rslora off, the patterns' α/r of every module equal to lora_alpha/r"
        )
    return report, experts


def _write_folder(
    job: _Job, modules, factors, shape: _Shape, experts: _Experts, report: ExportReport
) -> None:
    """The PEFT folder: config and tensors (the experts' in the layout the target loads), side files."""
    config = _folder_config(
        job.adapter, job.target, modules, shape.ranks, shape.R, shape.multiplier, shape.keep_dora
    )
    expert_tensors = _expert_tensors(job, experts, shape, config, report)
    report.config = {"r": config["r"], "lora_alpha": config["lora_alpha"]}
    tensors = _folder_tensors(
        job.adapter, job.target, modules, factors, shape.multiplier, shape.keep_dora, expert_tensors
    )
    with atomic_output_dir(job.output, inputs=job.inputs, force=job.force) as folder:
        write_adapter_folder(folder, tensors, config)
        if Path(job.path).is_dir():
            copy_side_files(Path(job.path), folder, SIDE_FILES)


_EXPERT_NAME = re.compile(r"\.experts\.\d+\.")


def _expert_groups(job: _Job, warnings: list) -> dict:
    """The adapter's expert LoRA per fused parameter (commands/export/moe.py), or a refusal naming
    what the target cannot carry."""
    adapter, structure = job.adapter, job.structure
    fused_alone = sorted(
        lo.name for lo in adapter.modules.values() if lo.kind == "parameter" and lo.experts > 1
    )
    if structure is None and fused_alone:
        raise UnsupportedError(
            f"{job.path}: module {fused_alone[0]}: a LoRA on fused expert parameters (target_parameters) "
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
    why = moe.refusal(job.target, groups)
    if why is not None:
        some = ", ".join(sorted(groups)[:3]) + (f" and {len(groups) - 3} more" if len(groups) > 3 else "")
        raise UnsupportedError(
            f"{job.path}: cannot export for {job.target}: the adapter has LoRA on MoE experts ({some}); "
            f"{why}: merge the adapter (`lorasurgery merge`) and serve the merged model; nothing was written"
        )
    return groups


@dataclass
class _Experts:
    """The adapter's expert LoRA in one export: its groups per fused parameter (moe.expert_groups),
    the layout the target loads, each group in PEFT's fused layout as stored, and the rank each
    module of that layout has (per expert: a fused parameter, or a part of it in the per-expert layout)."""

    layout: str | None
    groups: dict = field(default_factory=dict)  # fused parameter -> moe.ExpertGroup
    stored: dict = field(default_factory=dict)  # fused parameter -> FusedFactors
    stored_ranks: dict = field(default_factory=dict)  # fused parameter -> its modules' ranks, as stored
    max_rank: int | None = None

    @property
    def sources(self) -> set[int]:
        """The ids of the adapter's LoraModules the groups hold."""
        return {id(lo) for group in self.groups.values() for lo in group.sources}

    @property
    def scale(self) -> float | None:
        return _most_common([f.scale for f in self.stored.values()], 1.0) if self.stored else None

    @property
    def ranks(self) -> list[int]:
        """The ranks of the modules written, --max-rank applied."""
        cap = self.max_rank if self.max_rank is not None else math.inf
        return [min(r, cap) for ranks in self.stored_ranks.values() for r in ranks]

    @property
    def over(self) -> list[str]:
        """The fused parameters --max-rank truncates."""
        if self.max_rank is None:
            return []
        return sorted(name for name, ranks in self.stored_ranks.items() if max(ranks) > self.max_rank)


def _expert_layout(job: _Job, groups: dict) -> _Experts:
    """The expert groups for `job.target`: their layout, their factors as stored and their ranks."""
    structure = job.structure
    layout = moe.layout_for(job.target, structure.architecture if structure is not None else None)
    experts = _Experts(layout, groups, max_rank=job.max_rank)
    for name, group in sorted(groups.items()):
        f = experts.stored[name] = moe.fused_factors(job.adapter, group)
        if layout == moe.FUSED:
            experts.stored_ranks[name] = [f.rank]
        else:  # a stacked gate/up splits back into its own ranks
            experts.stored_ranks[name] = [p.A[0].shape[0] for p in split(f, group.parts, group.interleaved)]
    return experts


def _with_expert_ranks(rules: list, experts: _Experts, adapter) -> list:
    """The max_rank rule, with the fused parameters --max-rank truncates in place of their modules (a
    fused rank counts gate and up together where their lora_A differ)."""
    over = experts.over
    if not over:
        return rules
    in_groups = {key for key, lo in adapter.modules.items() if id(lo) in experts.sources}
    rule = next(r for r in rules if r.id == "max_rank")
    modules = [m for m in rule.modules if m not in in_groups] + over
    action = f"truncated to rank {experts.max_rank} by SVD (optimal; the error is reported), expert LoRA per expert"
    fixed = replace(rule, status=FIXED, modules=modules, action=action)
    return [fixed if r is rule else r for r in rules]


def _expert_tensors(job: _Job, experts: _Experts, shape: _Shape, config: dict, report: ExportReport) -> dict:
    """Every expert group in the layout the target loads (moe.layout_for), at the target's one scale g
    and truncated per expert above --max-rank (moe_factors.for_target): PEFT's target_parameters on the
    fused parameter, or one 2-D module per expert and projection under the checkpoint's names; the
    config's patterns and targets extended; a report row per fused parameter."""
    if not experts.groups:
        return {}
    g = next(iter(shape.multiplier.values())) if shape.multiplier else experts.scale
    written = {
        name: moe_factors.for_target(job.adapter, experts.groups[name], f, g, experts.layout, job.max_rank)
        for name, f in experts.stored.items()
    }
    if not shape.multiplier:  # only experts: the config's r is their most common rank (vLLM, SGLang: shape.R)
        R = Counter(w.rank for w in written.values()).most_common(1)[0][0]
        R = shape.R if job.target in ("vllm", "sglang") else R
        config.update(r=R, lora_alpha=_number(g * R))
    if experts.layout == moe.FUSED:
        if job.target == "vllm":
            _complete_for_vllm(written, job.structure, g)
        tensors = _fused_tensors(written, job.structure, config, g)
    else:
        tensors = _per_expert_tensors(job, written, experts.groups, config, g)
    sglang_rank = config["r"] if job.target == "sglang" else None
    report.modules += _expert_rows(written, experts.groups, g, sglang_rank)
    report.notes += _expert_notes(written, experts)
    return tensors


def _complete_for_vllm(written: dict, structure, g: float) -> None:
    """vLLM's fused expert LoRA (FusedMoE3DWithLoRA) needs both gate_up_proj and down_proj of every
    experts module, at one rank: a missing one is written with ΔW = 0, the lower rank zero-padded
    (vLLM stacks its gate_up and down LoRA in buffers of one rank); both exact."""
    for name in list(written):
        for leaf in ("gate_up_proj", "down_proj"):
            sibling = f"{name.rpartition('.')[0]}.{leaf}"
            if sibling not in written:
                w = written[name]
                zero = moe.zero_fused(structure, sibling, w.rank, w.fused.A.dtype)
                zero = FusedFactors(zero.A, zero.B, zero.rank, zero.experts, g, ["zero"])
                written[sibling] = moe_factors.Written(zero, None, [0.0] * zero.experts, ["zero"])
    for name, w in written.items():
        module = name.rpartition(".")[0]
        rank = max(v.rank for n, v in written.items() if n.rpartition(".")[0] == module)
        if rank > w.rank:
            w.fused = padded(w.fused, rank)
            w.notes = w.notes + ([] if "padded" in w.notes else ["padded"])


def _pattern(config: dict, name: str, rank: int, g: float) -> None:
    """A module of another rank than the config's r: its rank_pattern and alpha_pattern (t = g)."""
    if rank != config["r"]:
        config["rank_pattern"][re.escape(name)] = rank
        config["alpha_pattern"][re.escape(name)] = _number(g * rank)


def _fused_tensors(written: dict, structure, config: dict, g: float) -> dict:
    """PEFT's target_parameters tensors, under the keys PEFT nests a module's parameters by."""
    tensors = {}
    by_module: dict[str, list[str]] = {}
    for name in written:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
    for module, leaves in by_module.items():
        keys = moe.fused_keys(module, leaves, list(structure.module(module).parameters))
        for leaf in leaves:
            f = written[f"{module}.{leaf}"].fused
            tensors[keys[leaf][0]], tensors[keys[leaf][1]] = f.A.contiguous(), f.B.contiguous()
            _pattern(config, f"{module}.{leaf}", f.rank, g)
    config["target_parameters"] = sorted(written)
    return tensors


def _per_expert_tensors(job: _Job, written: dict, groups: dict, config: dict, g: float) -> dict:
    """One 2-D module per expert and projection under the base checkpoint's names (SGLang: every one
    zero-padded to the config's r, as it stacks gate with up)."""
    tensors, names_written = {}, []
    for name, w in written.items():
        names = moe.per_expert_names(job.structure, groups[name], job.base_tensors)
        for k, part in enumerate(w.parts):
            for e, (A, B) in enumerate(zip(part.A, part.B)):
                module = names[(e, k)]
                if job.target == "sglang":
                    f = _pad(_Factors(A, B, "", 0.0), config["r"])
                    A, B = f.A, f.B
                keys = lora_keys(module)
                tensors[keys.A], tensors[keys.B] = A.contiguous(), B.contiguous()
                _pattern(config, module, A.shape[0], g)
                names_written.append(module)
    if job.target == "sglang":
        leaves = {n.rsplit(".", 1)[-1] for n in names_written}
        config["target_modules"] = sorted(set(config["target_modules"]) | leaves)
    else:
        config["target_modules"] = sorted(config["target_modules"] + names_written, key=natural_key)
    return tensors


def _expert_rows(written: dict, groups: dict, g: float, padded_to: int | None) -> list[ModuleExport]:
    """A report row per fused parameter: its rank, what was done and its worst expert's error (each
    expert's in `expert_errors`)."""
    rows = []
    for name, group in sorted(groups.items()):
        w, sources = written[name], group.sources
        rows.append(
            ModuleExport(
                name,
                "parameter",
                max(lo.r for lo in sources),
                padded_to or w.rank,
                _most_common([lo.scale for lo in sources], g),
                g,
                w.method + ("+split" if w.parts is not None else ""),
                max(w.errors, default=0.0),
                expert_errors=w.errors,
            )
        )
    return rows


def _expert_notes(written: dict, experts: _Experts) -> list[str]:
    """What the report says of the experts beyond its rows: zero-filled siblings, stacked gate/up,
    truncation."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (" …" if len(names) > 3 else "")

    notes = []
    zeros = sorted(set(written) - set(experts.groups))
    if zeros:
        notes.append(
            f"vLLM's fused expert LoRA needs both gate_up_proj and down_proj: {some(zeros)} written with ΔW = 0 (exact)"
        )
    stacked = [name for name in experts.stored if "stacked" in experts.stored[name].notes]
    if stacked and experts.layout == moe.FUSED:
        notes.append(
            f"gate and up of {len(stacked)} fused parameters had different lora_A, so their fused LoRA "
            f"stacks both: rank r_gate + r_up per expert ({some(stacked)}); exact"
        )
    if experts.over:
        worst = max(max(written[name].errors) for name in experts.over)
        unit = (
            "each expert's slice of the fused parameter"
            if experts.layout == moe.FUSED
            else "each expert's module"
        )
        notes.append(
            f"--max-rank {experts.max_rank}: {some(experts.over)} truncated per expert ({unit}: its optimal "
            f"rank-{experts.max_rank} factors); worst expert's relative error {worst:.3g} (every expert's: "
            f"expert_errors in --json)"
        )
    return notes


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


def _shape_of(modules, target: str, max_rank: int | None, expert_ranks: list[int]) -> _Shape:
    """`modules` the plain (not expert) modules; `expert_ranks` the ranks of the expert modules written
    (_Experts.ranks), which the config's r of vLLM and SGLang covers."""
    keep_dora = target == "peft"

    def rank_out(lo) -> int:
        if lo.dora and not keep_dora:  # W' − W is full rank: --max-rank is the rank it is written at
            return min(max_rank or lo.r, min(lo.shape[0], math.prod(lo.shape[1:])))
        return min(lo.r, max_rank) if max_rank is not None else lo.r

    out = {lo.name: rank_out(lo) for lo in modules}
    ranks = dict(out)
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


def _target_factors(job: _Job, modules, shape: _Shape, report: ExportReport, progress):
    """{module: _Factors} as the target loads them: stored factors refolded, or an SVD (DoRA → LoRA,
    above --max-rank), SGLang's padded to one rank; a ModuleExport row for each."""
    adapter, base_ckpt = job.adapter, job.base_ckpt
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


def _leave_out_saved(job: _Job, report: ExportReport) -> None:
    """A serving target gets no saved tensors: PEFT's copies of the base embedding checked and left
    out, the others (with --drop-saved) dropped with their norms said."""
    if job.target == "peft":
        return
    copies = embedding_copies(job.adapter)
    _check_copies(job.adapter, copies, job.base_ckpt, report)
    if job.drop_saved:
        _report_dropped(job.adapter, copies, report)


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
