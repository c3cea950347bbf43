"""`combine`: several PEFT LoRA adapters into one, ΔW = Σ wᵢ·ΔWᵢ per module, in factored form.

Per module Σ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ … wₙsₙBₙ]·[A₁; …; Aₙ] (`linalg.lowrank.concatenated_factors`):
`--exact` writes that concatenation (rank Σrᵢ, PEFT's "cat"); a policy truncates it optimally from
the exact SVD of the concatenation by QR (`lowrank_svd`), O((d + k)·(Σrᵢ)²), never forming d × k.
Adapters may differ in targets, ranks, scales, rsLoRA and patterns: every scale is folded into B
and the output has α = r per module. A DoRA input's update is its effective W' − W on `--base`
(dense; resize.module_svd). See docs/combine.md, "Semantics".
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorasurgery.adapter import load_adapter
from lorasurgery.adapter.model import is_base_layer
from lorasurgery.binding import decided_fan_in_fan_out, saved_fan_in_fan_out
from lorasurgery.commands.surgery.surgery import (
    ModuleUpdate,
    SurgeryReport,
    build_output,
    check_finite,
    check_output_options,
    choose_ranks,
    preload,
    rewritten_adapter_config,
    write_output,
)
from lorasurgery.concurrency import torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import LoraSurgeryError, MismatchError, OptionError
from lorasurgery.factored import (
    adapter_of,
    as_checkpoint,
    assumption_notes,
    bind_base,
    check_dora_base,
    check_factors_finite,
    loras_of,
    module_svd,
    module_tensor_keys,
)
from lorasurgery.io.safetensors_format import output_dtype, torch_dtype_of
from lorasurgery.linalg.delta import all_finite
from lorasurgery.linalg.lowrank import concatenated_factors, lowrank_svd
from lorasurgery.linalg.policies import Policy
from lorasurgery.linalg.update import factors
from lorasurgery.naming import natural_key
from lorasurgery.progress import Progress, ProgressCallback, no_progress


def _module_table(sources, paths) -> dict[str, list[int]]:
    """{module: indices of the adapters that adapt it}, checking that they agree on its kind and shape."""
    table: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        for name in loras_of(source):
            table.setdefault(name, []).append(i)
    for name, indices in table.items():
        first = loras_of(sources[indices[0]])[name]
        for j in indices[1:]:
            other = loras_of(sources[j])[name]
            if (other.kind, tuple(other.shape)) != (first.kind, tuple(first.shape)):
                raise MismatchError(
                    f"module {name}: {paths[indices[0]]} adapts a {first.kind} of shape {list(first.shape)} "
                    f"but {paths[j]} a {other.kind} of shape {list(other.shape)}; they are not adapters "
                    f"of the same model"
                )
    return table


def _saved_tensors(adapters, paths, modules: set[str]) -> dict[str, object]:
    """{key: tensor} of every saved (non-LoRA) tensor, once; two different ones under one name are an error."""
    chosen: dict[str, tuple[int, str, object]] = {}  # base-relative name -> (adapter, key, tensor)
    for i, adapter in enumerate(adapters):
        keys = module_tensor_keys(adapter)
        for relative, key in adapter.replacements.items():
            if key in keys:
                continue
            module = relative.rsplit(".", 1)[0]
            # <m>.base_layer.weight is the layer a LoRA wraps (PEFT saves targeted embeddings so);
            # <m>.weight is a whole module (modules_to_save), which cannot also carry a LoRA.
            if module in modules and relative.endswith(".weight") and not is_base_layer(key):
                owner = next(j for j, a in enumerate(adapters) if module in a.modules)
                raise MismatchError(
                    f"{paths[i]} saves {relative} whole while {paths[owner]} adapts module {module} with "
                    f"LoRA; one output cannot hold both"
                )
            tensor = adapter.read(key)
            if relative in chosen:
                j, _, previous = chosen[relative]
                same = (
                    previous.shape == tensor.shape
                    and previous.dtype == tensor.dtype
                    and torch.equal(previous, tensor)
                )
                if not same:
                    raise MismatchError(
                        f"{paths[j]} and {paths[i]} both save the tensor {relative} with different values; "
                        f"combine cannot choose one (drop it from one adapter's modules_to_save)"
                    )
                continue
            chosen[relative] = (i, key, tensor)
    return {key: tensor for _, key, tensor in chosen.values()}


def _combined_update(sources, indices, weights, name, device, dtype, exact):
    """One module's ModuleUpdate: the concatenated factors (exact) or their SVD. `sources`: the
    adapters, bound to the base when there is one (lorasurgery.binding)."""
    adapters = [adapter_of(source) for source in sources]
    terms, bias, stored = [], None, None
    first = loras_of(sources[indices[0]])[name]
    for i in indices:
        adapter, lora, w = adapters[i], loras_of(sources[i])[name], weights[i]
        if lora.dora:
            # the effective update, dense: its full SVD as balanced factors
            check_factors_finite(sources[i], name)
            svd = module_svd(sources[i], name, device=device)
            root = svd.S.sqrt()
            terms.append((root[:, None] * svd.Vh, svd.U * root, w))
        else:
            f = factors(adapter, lora)
            terms.append((f.A.to(torch.float64), f.B.to(torch.float64), w * f.scale))
        if lora.bias_key:  # written at scale 1: w·s·b
            term = adapter.read(lora.bias_key).to(torch.float64) * (w * lora.scale)
            bias = term if bias is None else bias + term
        a_dtype = torch_dtype_of(adapter.tensors[lora.a_key].dtype)
        stored = a_dtype if stored is None else torch.promote_types(stored, a_dtype)
    A, B = concatenated_factors(terms)  # (Σr, n), (d, Σr) float64
    if not (all_finite(A) and all_finite(B) and (bias is None or all_finite(bias))):
        for i in indices:  # the error path: name the adapter and the tensor
            check_factors_finite(sources[i], name)
    a_info = adapters[indices[0]].tensors[first.a_key]
    update = ModuleUpdate(
        name=name,
        kind=first.kind,
        shape=tuple(first.shape),
        kernel=tuple(a_info.shape[1:]) if first.kind == "conv" else (),
        rank_in=A.shape[0],
        out_dtype=output_dtype(dtype, stored),
        svd=None if exact else lowrank_svd(A, B),
        exact=(A, B) if exact else None,
        bias=bias,
        sources=[str(adapters[i].path) for i in indices],
    )
    check_finite(update, ", ".join(update.sources))
    return update


def _check_lora_bias(updates, sources, checkpoint) -> None:
    """PEFT's lora_bias is one flag for a whole adapter, and a layer without a bias of its own cannot
    carry one (PEFT then refuses to merge). So when some input has lora_B biases, every other output
    module gets a zero one — allowed only where the base is known to have that bias."""
    with_bias = next((u for u in updates if u.bias is not None), None)
    if with_bias is None:
        return
    for u in updates:
        if u.bias is not None or u.kind == "embedding":
            continue  # embeddings: build_output refuses the mix with its own message
        source = next(s for s in sources if u.name in loras_of(s))
        has_bias = False
        if checkpoint is not None:
            weight = source.modules[u.name].tensor
            has_bias = weight.removesuffix(".weight") + ".bias" in checkpoint.tensors
        if not has_bias:
            raise LoraSurgeryError(
                f"module {with_bias.name} has a lora_B bias (from {with_bias.sources[0]}) but module {u.name} "
                f"(from {u.sources[0]}) has none, and PEFT's lora_bias holds for every module of an adapter: "
                + (
                    f"the base {checkpoint.path} has no bias for {u.name}, so PEFT could not merge it"
                    if checkpoint is not None
                    else "pass --base BASE to check that the layer has a bias of its own"
                )
            )


def _merged_config(adapters, bound) -> dict:
    """Fields of the output config that come from all inputs (the rest is the first input's);
    `bound`: the adapters bound to --base, or () without one."""
    saves = []
    for adapter in adapters:
        for module in adapter.config.modules_to_save or []:
            if module not in saves:
                saves.append(module)
    biases = {adapter.config.bias for adapter in adapters}

    known = decided_fan_in_fan_out(bound)
    return {
        "modules_to_save": saves or None,
        "bias": "all" if "all" in biases else "lora_only" if "lora_only" in biases else "none",
        # A layer's layout is the model's: as laid out on --base when given, else any input's flag.
        "fan_in_fan_out": saved_fan_in_fan_out([a for a in adapters if a.modules])
        if known is None
        else known,
        "layers_to_transform": None,  # target_modules are full paths: no layer filter is needed
        "layers_pattern": None,
        "exclude_modules": None,
        "ensure_weight_tying": any(a.config.raw.get("ensure_weight_tying") for a in adapters),
        "task_type": next((a.config.task_type for a in adapters if a.config.task_type), None),
    }


@dataclass(frozen=True)
class CombineRequest:
    """What `combine` is asked: the adapters, their weights, the output, --exact or a rank policy, and
    every option (the CLI's)."""

    adapters: Sequence[str | os.PathLike]
    out: str | os.PathLike
    weights: Sequence[float] | None = None  # one per adapter, 1 by default
    exact: bool = False
    policy: Policy | None = None  # exactly one of a policy and `exact`
    max_rank: int | None = None
    base: str | os.PathLike | None = None
    dtype: str = "auto"
    device: str = "cpu"
    force: bool = False


def combine_adapters(request: CombineRequest, progress: ProgressCallback | None = None):
    """Write the weighted sum of `request.adapters` to `request.out`, exactly or truncated under its
    policy; return a SurgeryReport."""
    out, exact, policy, max_rank = request.out, request.exact, request.policy, request.max_rank
    base, dtype, force = request.base, request.dtype, request.force
    started = time.perf_counter()
    progress = progress or no_progress
    paths = [str(p) for p in request.adapters]
    weights = _checked_options(paths, request.weights, exact, policy, max_rank)
    inputs = paths + ([base] if base is not None else [])
    check_output_options(max_rank, dtype, out, inputs, force)
    loaded = [preload(load_adapter(p)) for p in paths]
    for adapter in loaded:
        check_dora_base(adapter, base)
    checkpoint = as_checkpoint(base)
    sources = bind_base(loaded, checkpoint)  # the layouts of one base: decided together
    table = _module_table(sources, paths)
    saved = _saved_tensors(loaded, paths, set(table))
    device = resolve_device(request.device)
    policy_text = "exact sum" if exact else policy.describe()
    report = SurgeryReport("combine", paths, str(out), policy_text, weights=weights)

    # small per-module kernels: one torch thread (lorasurgery.concurrency.torch_threads)
    with torch_threads(1 if device == "cpu" else None):
        names = sorted(table, key=natural_key)
        updates = []
        for i, name in enumerate(names):
            updates.append(_combined_update(sources, table[name], weights, name, device, dtype, exact))
            progress(Progress("combine", i + 1, len(names), name))
        _check_lora_bias(updates, sources, checkpoint)
        ranks = None if exact else choose_ranks(updates, policy, max_rank, saved)
        output = build_output(updates, ranks, report)
    if not output.module_ranks:
        raise LoraSurgeryError(f"every combined module has rank 0 under {policy_text}; nothing to write")
    report.notes += _notes(sources, loaded, saved, weights, base)
    config = rewritten_adapter_config(
        loaded[0].config.raw,
        output.module_ranks,
        output.lora_bias,
        **_merged_config(loaded, sources if checkpoint is not None else ()),
    )
    return write_output(report, out, inputs, force, output, saved, config, started)


def _checked_options(paths: list[str], weights, exact: bool, policy, max_rank) -> list[float]:
    """Each adapter's weight (1 by default); an OptionError for a bad count, or for --exact with a
    rank policy, --max-rank or neither; a policy validated."""
    if not paths:
        raise OptionError("combine needs at least one adapter")
    weights = [1.0] * len(paths) if not weights else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise OptionError(
            f"{len(weights)} --weight values for {len(paths)} adapters; give one --weight per adapter, in order"
        )
    if exact and policy is not None:
        raise OptionError("--exact writes the full sum; it takes no rank policy")
    if not exact and policy is None:
        raise OptionError(
            "choose --exact or exactly one rank policy (--rank, --energy, --ratio, --auto, --budget)"
        )
    if policy is not None:
        policy.validate()
    if max_rank is not None and exact:
        raise OptionError("--max-rank applies to a rank policy, not to --exact")
    return weights


def _notes(sources, loaded, saved: dict, weights: list[float], base) -> list[str]:
    """The report's notes: assumed layouts, unweighted saved tensors, DoRA inputs."""
    notes = assumption_notes(sources)
    if saved and any(w != 1.0 for w in weights):
        notes.append("tensors saved whole (modules_to_save, biases) are copied unchanged, not weighted")
    if any(m.dora for a in loaded for m in a.modules.values()):
        notes.append(f"DoRA inputs entered as their effective update W' − W on {base}")
    return notes
