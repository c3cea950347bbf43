"""`inspect`: what an adapter targets, its ranks and scales, the size of its update — no model loaded.

‖ΔW‖_F = |s|·‖B@A‖_F comes from two r × r Gram matrices (linalg.lowrank), never the d × k product.
With a base, every target must exist there with the right shape, and ‖ΔW‖_F / ‖W‖_F is reported,
reading W one tensor at a time. A quantized base whose format can be written adds, per module, the
retention ρ its update would have under `merge --requantize` and the share of codes that would
change — computed as the merge computes them (linalg.requantize), nothing written (docs/design.md §13).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorasurgery.adapter import Adapter, LoraModule, load_adapter
from lorasurgery.binding import BoundAdapter, bind
from lorasurgery.errors import MismatchError
from lorasurgery.io import open_checkpoint
from lorasurgery.linalg.lowrank import lowrank_fro_norm
from lorasurgery.model.experts import grouped_label
from lorasurgery.progress import Progress, ProgressCallback, no_progress

DEAD_RELATIVE = 1e-12  # ‖ΔW‖ below this share of ‖W‖ (or exactly 0 without a base) counts as dead


@dataclass
class ModuleInfo:
    name: str
    kind: str  # linear | embedding | conv | parameter | tokens | replaced
    shape: list[int]  # [out, in] of ΔW (conv: [out, in, *kernel]; experts: [E, out, in]); replaced /
    # tokens: the saved tensor's shape
    r: int | None
    alpha: float | None
    scale: float | None
    dora: bool
    params: int
    delta_fro_norm: float | None
    nonfinite: int
    relative_norm: float | None = None  # only with a base
    tokens: list[int] | None = None  # trainable tokens: the rows overwritten
    retention: float | None = None  # quantized base: ρ under merge --requantize (None: ΔW = 0)
    codes_changed: float | None = None  # quantized base: share of its codes that would change
    experts: list[int] | None = None  # per-expert modules of a fused parameter as one: the experts it has


@dataclass
class InspectReport:
    path: str
    peft_type: str
    base_model_name_or_path: str | None
    modules: list[ModuleInfo]
    totals: dict
    warnings: list[str] = field(default_factory=list)
    base: str | None = None
    format: str = "peft"
    requantizable: bool = False  # the base is quantized in a format merge --requantize writes

    def to_json(self) -> dict:
        modules = []
        for module in self.modules:
            entry = asdict(module)
            if not self.requantizable:
                entry.pop("retention")
                entry.pop("codes_changed")
            if self.base is None:
                entry.pop("relative_norm")
            if module.kind != "tokens":  # only trainable tokens list their rows
                entry.pop("tokens")
            if module.experts is None:
                entry.pop("experts")
            modules.append(entry)
        return {
            "path": self.path,
            "format": self.format,
            "peft_type": self.peft_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "modules": modules,
            "totals": self.totals,
            "warnings": self.warnings,
        }


def _nonfinite(tensor) -> int:

    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def _lora_info(adapter: Adapter, module: LoraModule) -> ModuleInfo:
    A, B = adapter.read_factors(module)
    extra = [adapter.read(k) for k in (module.bias_key, module.magnitude_key) if k]
    A2, B2 = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # conv: (r, in·k), (out, r)
    nonfinite = sum(_nonfinite(t) for t in (A, B, *extra))
    experts = adapter.expert_factors(module)
    shape = [B.shape[0], *A.shape[1:]]
    norm = None
    if not nonfinite:
        if experts is None:
            norm = lowrank_fro_norm(A2, B2, module.scale)
        else:  # ‖ΔW‖_F over the whole (E, out, in) parameter: Σₑ ‖s·Bₑ@Aₑ‖²
            norm = sum(lowrank_fro_norm(a, b, module.scale) ** 2 for a, b in experts) ** 0.5
            shape = [len(experts), B.shape[0], A.shape[1]]
    return ModuleInfo(
        name=module.label,
        kind=module.kind,
        shape=shape,
        r=module.r,
        alpha=module.alpha,
        scale=module.scale,
        dora=module.dora,
        params=A.numel() + B.numel() + sum(t.numel() for t in extra),
        delta_fro_norm=norm,
        nonfinite=nonfinite,
    )


def _tensor_info(name: str, kind: str, tensor, **extra) -> ModuleInfo:
    """A tensor the adapter saves whole (no ΔW factors): its size is the tensor's."""
    return ModuleInfo(
        name=name,
        kind=kind,
        shape=list(tensor.shape),
        r=None,
        alpha=None,
        scale=None,
        dora=False,
        params=tensor.numel(),
        delta_fro_norm=None,
        nonfinite=_nonfinite(tensor),
        **extra,
    )


def _tokens_info(adapter: Adapter, rows) -> ModuleInfo:
    """Trainable tokens: rows of the embedding overwritten."""
    return _tensor_info(rows.base_weight_name, "tokens", adapter.read(rows.key), tokens=list(rows.indices))


def _replaced_info(adapter: Adapter, name: str, key: str) -> ModuleInfo:
    return _tensor_info(name, "replaced", adapter.read(key))


def inspect_adapter(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    progress: ProgressCallback = no_progress,
    *,
    config_file: str | os.PathLike | None = None,
    fan_in_fan_out: str | None = None,
) -> InspectReport:
    """Describe the adapter at `path`; with `base`, check it fits and compare ‖ΔW‖ with ‖W‖.

    With a base, each module is laid out as the base's structure says (lorasurgery.model;
    `config_file` and `fan_in_fan_out` as for merge)."""
    adapter = load_adapter(path)
    bound = None
    if base is not None:  # the modules as the base lays them out (LoRA on nn.Parameters resolved)
        (bound,) = bind(
            [adapter], open_checkpoint(base), config_file=config_file, fan_in_fan_out=fan_in_fan_out
        )
    modules = list(bound.loras.values() if bound is not None else adapter.modules.values())
    total = len(modules) + len(adapter.replacements) + len(adapter.tokens)
    infos: list[ModuleInfo] = []
    for module in modules:
        infos.append(_lora_info(adapter, module))
        progress(Progress("inspect", len(infos), total, module.name))
    for name, rows in sorted(adapter.tokens.items()):
        infos.append(_tokens_info(adapter, rows))
        progress(Progress("inspect", len(infos), total, name))
    for name, key in sorted(adapter.replacements.items()):
        infos.append(_replaced_info(adapter, name, key))
        progress(Progress("inspect", len(infos), total, name))

    warnings: list[str] = []
    requantizable = False
    if bound is not None:
        warnings += [a.message() for a in bound.assumptions]
        warnings += _compare_with_base(bound, infos)
        infos, groups = _experts_as_one(bound, infos)
        requantizable = _would_be_retention(bound, infos, progress, groups)
    _warn_about_updates(adapter, infos, warnings, with_base=base is not None)
    tensors = adapter.tensors.values()
    return InspectReport(
        path=str(path),
        peft_type=adapter.config.peft_type,
        base_model_name_or_path=adapter.config.base_model_name_or_path,
        modules=infos,
        totals={
            "modules": len(modules),
            "params": sum(t.numel for t in tensors),
            "bytes": sum(t.nbytes for t in tensors),
        },
        warnings=warnings,
        base=None if base is None else str(base),
        requantizable=requantizable,
    )


def _compare_with_base(bound: BoundAdapter, infos: list[ModuleInfo]) -> list[str]:

    adapter, checkpoint = bound.adapter, bound.checkpoint
    notes = []
    by_name = {info.name: info for info in infos}
    for tokens in bound.tokens.values():
        rows = tokens.rows
        W = checkpoint.read(tokens.tensor).double()
        info = by_name[rows.base_weight_name]
        info.delta_fro_norm = float(
            torch.linalg.vector_norm(adapter.read(rows.key).double() - W[rows.indices])
        )
        w_norm = float(torch.linalg.vector_norm(W))
        info.relative_norm = info.delta_fro_norm / w_norm if w_norm else None
    # per tensor, so that the per-expert modules of one fused parameter read it once (read_base)
    for key, module in sorted(bound.modules.items(), key=lambda item: item[1].tensor):
        info = by_name[module.lora.label]
        w_norm = float(torch.linalg.vector_norm(bound.read_base(key).double()))
        if info.delta_fro_norm is not None:
            info.relative_norm = info.delta_fro_norm / w_norm if w_norm else float("inf")
    for saved in bound.saved:
        info = by_name[saved.relative]
        if saved.name is None:
            notes.append(f"{saved.relative}: saved by the adapter but not in the base; a merge would add it")
            continue
        base_tensor = checkpoint.read(saved.tensor)
        if list(base_tensor.shape) != info.shape:
            notes.append(
                f"{saved.relative}: replaces a base tensor of shape {list(base_tensor.shape)} with {info.shape}"
            )
            continue
        difference = float(torch.linalg.vector_norm(adapter.read(saved.key).double() - base_tensor.double()))
        info.delta_fro_norm = difference
        w_norm = float(torch.linalg.vector_norm(base_tensor.double()))
        info.relative_norm = difference / w_norm if w_norm else None
    if bound.saved and not adapter.modules and all(saved.name is None for saved in bound.saved):
        raise MismatchError(f"{adapter.path}: none of its saved tensors is in the base {checkpoint.path}")
    return notes


def _experts_as_one(bound: BoundAdapter, infos: list[ModuleInfo]):
    """(infos with the per-expert modules of one fused expert parameter's part — `experts.{e}.gate_proj`
    for every e — as one module `experts.gate_proj` of shape [E, out, in], {module label: its row's
    name}). Which modules are per-expert comes from the base's structure (model/experts.py)."""
    groups: dict[str, str] = {}
    slots = {}
    for module in bound.modules.values():
        lora = module.lora
        slot = lora.slot or (bound.structure.expert_slice(module.name) if lora.kind == "linear" else None)
        if slot is not None:
            groups[lora.label] = grouped_label(lora.name)
            slots[lora.label] = slot
    if not groups:
        return infos, groups
    merged: dict[str, list[ModuleInfo]] = {}
    out: list[ModuleInfo] = []
    for info in infos:
        name = groups.get(info.name)
        if name is None:
            out.append(info)
            continue
        if name not in merged:
            merged[name] = []
            out.append(ModuleInfo(name, info.kind, [], None, None, None, False, 0, None, 0))
        merged[name].append(info)
    for row in out:
        members = merged.get(row.name)
        if not members:
            continue
        experts = sorted(slots[m.name].expert for m in members)

        def same(values):
            return values[0] if len(set(values)) == 1 else None

        row.shape = [len(members), *members[0].shape]
        row.r, row.alpha, row.scale = (
            same([getattr(m, f) for m in members]) for f in ("r", "alpha", "scale")
        )
        row.dora = any(m.dora for m in members)
        row.params = sum(m.params for m in members)
        row.nonfinite = sum(m.nonfinite for m in members)
        row.experts = experts
        if all(m.delta_fro_norm is not None for m in members):
            row.delta_fro_norm = sum(m.delta_fro_norm**2 for m in members) ** 0.5
            if all(m.relative_norm for m in members):  # ‖ΔW‖ over ‖W‖ of the experts' slices together
                w_squares = sum((m.delta_fro_norm / m.relative_norm) ** 2 for m in members)
                row.relative_norm = row.delta_fro_norm / w_squares**0.5
    return out, groups


def _would_be_retention(bound: BoundAdapter, infos: list[ModuleInfo], progress, groups=None) -> bool:
    """Per module on a quantized tensor: its retention under merge --requantize (this adapter alone,
    weight 1), one base tensor at a time; False when the base is not quantized in a format that
    merge can write."""
    from lorasurgery.io import readers
    from lorasurgery.linalg.requantize import requantize, retention
    from lorasurgery.linalg.update import kernel_update, merge_into

    checkpoint = bound.checkpoint
    quantization = checkpoint.quantization
    if quantization is None or not readers.can_quantize(quantization.format):
        return False
    stored = checkpoint.raw
    by_tensor: dict[str, list[str]] = {}
    for key, target in bound.targets.items():
        info = checkpoint.tensors.get(target.tensor)
        if info is not None and info.dequantized:
            by_tensor.setdefault(target.tensor, []).append(key)
    sums: dict[str, list[float]] = {}  # module label -> [kept, update, changed, codes]
    for done, (name, keys) in enumerate(by_tensor.items(), 1):
        info = checkpoint.tensors[name]
        W = checkpoint.read(name)
        updates = [kernel_update(bound.adapter, bound.targets[key].lora) for key in keys]
        merged = merge_into(W.clone(), updates, out_dtype=torch.float32, name=name)
        result = requantize(info, W, merged, lambda part: stored.read(part.name))
        del W, merged
        labels = (bound.modules[key.split("[", 1)[0]].lora.label for key in keys)
        for label in dict.fromkeys((groups or {}).get(label, label) for label in labels):
            total = sums.setdefault(label, [0.0, 0.0, 0, 0])
            for i, value in enumerate((result.kept, result.update, result.codes_changed, result.codes)):
                total[i] += value
        progress(Progress("retention", done, len(by_tensor), name))
    for info in infos:
        if info.name in sums:
            kept, update, changed, codes = sums[info.name]
            info.retention = retention(kept, update)
            info.codes_changed = changed / codes if codes else 0.0
    return True


def _warn_about_updates(
    adapter: Adapter, infos: list[ModuleInfo], warnings: list[str], with_base: bool
) -> None:
    lora = [i for i in infos if i.kind not in ("replaced", "tokens")]
    nonfinite = [i for i in infos if i.nonfinite]
    for info in nonfinite:
        warnings.append(f"{info.name}: {info.nonfinite} NaN/Inf values in the adapter's tensors")

    def dead(info: ModuleInfo) -> bool:
        if info.delta_fro_norm is None:
            return False
        if with_base and info.relative_norm is not None:
            return info.relative_norm < DEAD_RELATIVE
        return info.delta_fro_norm == 0

    dead_modules = [i for i in lora if dead(i)]
    if lora and len(dead_modules) == len(lora) and not any(i.dora for i in lora):
        warnings.append(
            "dead adapter: ΔW = 0 for every module (lora_B still at its zero initialisation?); "
            "merging it changes nothing"
        )
    elif dead_modules:
        warnings.append(f"{len(dead_modules)} of {len(lora)} modules have ΔW = 0")
    if any(i.dora for i in lora):
        warnings.append(
            "DoRA: delta_fro_norm is ‖s·B@A‖; the merged update also rescales each row of W + s·B@A "
            "to the learned magnitude, so the effective change depends on W"
        )
    if Path(adapter.path).is_dir() and adapter.config.base_model_name_or_path is None:
        warnings.append("adapter_config.json names no base_model_name_or_path")
