"""merge planning: every output tensor's recipe, resolved and checked before any output exists.

`plan_merge` opens the base and the adapters, binds them to it (lorasurgery.binding: base tensor
names, layouts, ties, split expert parameters), takes each tensor's recipe and the tie rule from
lorasurgery.recipes (shared with verify) and checks shapes,
finiteness, options and conflicts. The result,
`MergePlan`, is plain data: one `Item` per output tensor (start, updates, bias terms), the config
changes and the notes; write.py executes it.

With `requantize` (docs/design.md §13) a quantized base keeps its format: its items are its stored
tensors — an untouched quantized tensor's codes and scales copied byte for byte, a touched one
written by one requantizing Item (its codes, with its recomputed scales as `parts`) and its static
activation scales copied. `unquantize` turns requantizing items back into plain weights once their
retention is known (`--min-retention`), and lists them in the config's ignore list.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import BoundAdapter, bind
from lorasurgery.errors import (
    AdapterError,
    MismatchError,
    NonFiniteError,
    OptionError,
    UnsupportedError,
)
from lorasurgery.io import TensorSpec, open_checkpoint, readers
from lorasurgery.io.safetensors_format import OUTPUT_DTYPES, TensorInfo, dtype_name_of
from lorasurgery.linalg.delta import all_finite
from lorasurgery.model import Layout, Structure, model_tensors, structure_of
from lorasurgery.recipes import BASE, Recipe, TieOutcome, plan_recipes

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LISTED = 8  # how many names a message lists


@dataclass
class AdapterSummary:
    path: str
    weight: float
    modules_merged: int
    dora_modules: int
    lora_biases: int
    tensors_replaced: int


@dataclass
class Item:
    """How one output tensor is produced: its recipe (lorasurgery.recipes) on a known tensor."""

    name: str  # output tensor name
    spec: TensorSpec
    source: TensorInfo | None  # base tensor read when nothing replaces it (a tied one: the stored member)
    recipe: Recipe = field(default_factory=Recipe)  # recipe.start: (adapter index, tensor) replacing it
    # --requantize: the stored tensors written beside the codes (`name`) of the requantized `source`
    parts: tuple[TensorSpec, ...] = ()
    requantize: bool = False

    @property
    def untouched(self) -> bool:
        return self.recipe.untouched


@dataclass
class MergePlan:
    checkpoint: object  # the base (io.Checkpoint)
    structure: Structure
    adapters: list[BoundAdapter]  # the adapters bound to the base (their `targets` are what is merged)
    weights: list[float]
    items: list[Item]  # output order
    config: dict | None  # the output config.json (None: the base has none)
    config_changes: dict
    notes: list[str]
    adapter_summaries: list[AdapterSummary]
    output_dtype_code: str | None  # --dtype as a safetensors code, None for auto
    layouts: dict[tuple[int, str], Layout] = field(default_factory=dict)  # (adapter, module) -> layout
    ties: list[TieOutcome] = field(default_factory=list)
    assumptions: list = field(default_factory=list)  # binding.Assumption: layouts resting on a flag
    requantize: bool = False
    # --requantize: logical tensor name -> linalg.requantize.Requantized (its tensors dropped), as
    # measured before writing (--min-retention) or while writing
    measured: dict = field(default_factory=dict)

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for i in self.items for spec in (i.spec, *i.parts)]

    def shard_groups(self) -> list[list[str]]:
        """The base's files, by the names the output has (stored ones when it keeps the format)."""
        return (self.checkpoint.raw if self.requantize else self.checkpoint).shard_groups()

    def item(self, name: str) -> Item | None:
        return next((i for i in self.items if i.name == name), None)


def check_options(adapters, weights, subtract, dtype, max_shard_bytes) -> list[float]:
    """The effective weight of each adapter (negated by subtract), or an error for bad options."""
    if not adapters:
        raise OptionError("merge needs at least one adapter")
    if len(set(map(lambda p: Path(p).resolve(), adapters))) != len(adapters):
        raise OptionError("the same adapter is given twice; use --weight to scale it instead")
    if dtype not in ("auto", *OUTPUT_DTYPES):
        raise OptionError(f"--dtype {dtype}: expected auto, fp32, bf16 or fp16")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise OptionError("--max-shard-size must be positive")
    weights = [1.0] * len(adapters) if not weights else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise OptionError(
            f"{len(weights)} --weight values for {len(adapters)} adapters; give one --weight per adapter, in order"
        )
    for w, path in zip(weights, adapters):
        if not math.isfinite(w):
            raise OptionError(f"--weight {w} for {path} is not a finite number")
    return [-w for w in weights] if subtract else weights


def check_requantize_options(requantize: bool, min_retention: float | None, verify: bool) -> None:
    if min_retention is not None and not requantize:
        raise OptionError(
            "--min-retention R chooses which requantized modules are written unquantized; it needs "
            "--requantize (without it every quantized tensor is written unquantized already)"
        )
    if min_retention is not None and not math.isfinite(min_retention):
        raise OptionError(f"--min-retention {min_retention} is not a finite number")
    if requantize and verify:
        raise OptionError(
            "--verify compares the merged model with base + adapters exactly; a requantized merge "
            "differs from it by its rounding by design (its retention is reported instead): drop --verify"
        )


@dataclass(frozen=True)
class PlanOptions:
    """The merge options that decide the plan (MergeRequest.plan_options(): the CLI's)."""

    subtract: bool = False
    dtype: str = "auto"
    allow_nonfinite: bool = False
    config_file: str | os.PathLike | None = None
    fan_in_fan_out: str | None = None
    requantize: bool = False


def plan_merge(base, adapter_paths, weights: list[float], options: PlanOptions = PlanOptions()) -> MergePlan:
    """Everything a merge will do, checked; raises a LoraSurgeryError naming the input that is wrong.

    The steps: the base and adapters opened and checked, bound to the base, every tensor's recipe and
    the ties (lorasurgery.recipes), one Item per output tensor, the output config, the output order."""
    subtract, dtype, allow_nonfinite = options.subtract, options.dtype, options.allow_nonfinite
    config_file, fan_in_fan_out, requantize = options.config_file, options.fan_in_fan_out, options.requantize
    adapter_paths = [Path(p) for p in adapter_paths]
    checkpoint = open_checkpoint(base)
    if requantize:
        _check_requantizable(checkpoint)
    structure = structure_of(checkpoint, config_file)
    adapters = _load_adapters(adapter_paths, subtract)
    # Shapes are checked below against the tensor each module will really meet (a saved, resized one).
    bound = bind(adapters, checkpoint, structure=structure, fan_in_fan_out=fan_in_fan_out, check_shapes=False)
    if not allow_nonfinite:
        for path, b in zip(adapter_paths, bound):
            _check_finite(b, path)
    # Every tensor's recipe and the ties, as verify expects them too (lorasurgery.recipes).
    planned = plan_recipes(bound)
    out_code = OUTPUT_DTYPES.get(dtype)
    notes = _weight_notes(adapter_paths, bound, weights)
    items = _items(planned.recipes, planned.tensors, bound, out_code)
    config, changes = _output_config(
        checkpoint, structure, planned, items, out_code, dtype, requantize, notes
    )
    ordered = _output_order(checkpoint, planned, items, out_code)
    if requantize:
        ordered = _stored_items(checkpoint, ordered, notes)
    return MergePlan(
        checkpoint=checkpoint,
        structure=structure,
        adapters=bound,
        weights=weights,
        items=ordered,
        config=config,
        config_changes=changes,
        notes=notes,
        adapter_summaries=_adapter_summaries(adapter_paths, bound, weights, items),
        output_dtype_code=out_code,
        layouts={
            (index, key): module.layout
            for index, b in enumerate(bound)
            for key, module in b.targets.items()
            if module.layout is not None
        },
        ties=planned.ties,
        assumptions=[a for b in bound for a in b.assumptions],
        requantize=requantize,
    )


def _load_adapters(adapter_paths: list[Path], subtract: bool) -> list:
    """The adapters, each holding something to merge (and, with --subtract, something undoable)."""
    adapters = [load_adapter(p) for p in adapter_paths]
    if subtract:
        for path, adapter in zip(adapter_paths, adapters):
            if adapter.tokens:
                raise UnsupportedError(
                    f"{path}: --subtract is refused for trainable tokens ({', '.join(adapter.tokens)}): "
                    f"their rows replace the base's, and the base's rows are not in the adapter"
                )
            dora = [m for m, module in adapter.modules.items() if module.dora]
            if dora:
                raise UnsupportedError(
                    f"{path}: --subtract is refused for DoRA adapters (module {dora[0]}): "
                    f"W' = (m/‖V‖)·V cannot be undone by subtracting an update"
                )
    for path, adapter in zip(adapter_paths, adapters):
        if not adapter.modules and not adapter.replacements and not adapter.tokens:
            raise AdapterError(
                f"{path}: the adapter holds no LoRA modules and no saved tensors; nothing to merge"
            )
    return adapters


def _weight_notes(adapter_paths: list[Path], bound: list[BoundAdapter], weights: list[float]) -> list[str]:
    """A note for each adapter whose --weight cannot reach its trainable tokens."""
    return [
        f"{path}: --weight {weight:g} does not scale its trainable tokens: their rows "
        f"replace the base's whatever the weight (PEFT's scaling does not reach them either)"
        for path, b, weight in zip(adapter_paths, bound, weights)
        if b.tokens and weight != 1.0
    ]


def _items(
    recipes: dict, tensors: dict[str, TensorInfo], bound: list[BoundAdapter], out_code
) -> dict[str, Item]:
    """An Item for every tensor with a recipe, its shape checked against each update it receives."""
    items: dict[str, Item] = {}
    for name, recipe in recipes.items():
        info = tensors[name]
        spec = _spec(name, info, out_code)
        if recipe.start is not BASE:
            index, tensor_name = recipe.start
            spec = TensorSpec(name, spec.dtype, tuple(bound[index].adapter.tensors[tensor_name].shape))
        items[name] = Item(name, spec, info, recipe)
        for index, module in recipe.updates:
            _check_shape(bound[index], module, name, spec.shape)
    return items


def _adapter_summaries(
    adapter_paths: list[Path], bound: list[BoundAdapter], weights: list[float], items: dict[str, Item]
) -> list[AdapterSummary]:
    summaries = []
    for index, (path, b, weight) in enumerate(zip(adapter_paths, bound, weights)):
        # a fused expert parameter stored split counts once (its pieces are keyed `<key>[e].k`)
        merged = len({key.split("[", 1)[0] for key in b.targets})
        dora = sum(bool(module.lora.dora) for module in b.targets.values())
        biases = sum(bool(module.lora.lora_bias) for module in b.targets.values())
        replaced = sum(1 for i in items.values() if i.recipe.start and i.recipe.start[0] == index)
        summaries.append(AdapterSummary(str(path), weight, merged, dora, biases, replaced))
    return summaries


def _output_config(
    checkpoint,
    structure: Structure,
    planned,
    items: dict[str, Item],
    out_code,
    dtype,
    requantize,
    notes: list,
) -> tuple[dict | None, dict]:
    """The output's config.json (None: the base has none) and the changes made to the base's."""
    changes: dict = {}
    config = dict(checkpoint.config) if checkpoint.config is not None else None
    for outcome in planned.ties:
        if outcome.untied:
            _untie_note(structure, outcome, notes, changes)
    _check_vocabulary(structure, checkpoint, items, planned.tensors, config, changes)
    if out_code and config is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config and config[key] != dtype_name_of(out_code):
                changes[key] = dtype_name_of(out_code)
        if "torch_dtype" not in config and "dtype" not in config:
            changes["torch_dtype"] = dtype_name_of(out_code)
    if checkpoint.quantization is not None and not requantize:
        _unquantized_output(checkpoint, out_code, config, changes, notes)
    if config is not None:
        config.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del config[key]  # a change to None removes the key (a quantized base's quantization_config)
    elif changes:
        notes.append(f"the base has no config.json; these settings could not be recorded: {changes}")
    return config, changes


def _output_order(checkpoint, planned, items: dict[str, Item], out_code) -> list[Item]:
    """Every output tensor's Item in the base's file order, tied members new to the output last."""
    written = set(checkpoint.tensors) | set(items)
    for outcome in planned.ties:
        written -= set(outcome.group) - set(outcome.written)
    ordered = [
        items.get(name) or Item(name, _spec(name, info, out_code), info)
        for name, info in planned.tensors.items()
    ]
    return [i for i in ordered if i.name in written]


def _spec(name: str, info: TensorInfo, out_code: str | None) -> TensorSpec:
    stored = info.plain_dtype  # of a dequantized tensor: the dtype the model declares (--dtype auto)
    code = out_code if out_code and stored in FLOAT_CODES else stored
    return TensorSpec(name, code, tuple(info.shape))


def _unquantized_output(checkpoint, out_code: str | None, config, changes: dict, notes: list) -> None:
    """A quantized base (docs/design.md §13) merges into an unquantized checkpoint: each quantized
    tensor dequantized (ΔW added in float32) and rounded once to --dtype, its scales dropped (the
    reader hides them), and config.json without quantization_config."""
    dequantized = [info for info in checkpoint.tensors.values() if info.dequantized]
    written_as = out_code or (dequantized[0].plain_dtype if dequantized else None)
    if config is not None:
        declared_in = checkpoint.quantization.source
        if declared_in in config:  # quantization_config (or compression_config …)
            changes[declared_in] = None
        if written_as and "torch_dtype" not in config and "dtype" not in config:
            changes["torch_dtype"] = dtype_name_of(written_as)
    if dequantized:
        notes.append(
            f"the base is {checkpoint.quantization.name}-quantized: its {len(dequantized)} quantized "
            f"tensors are written dequantized as {dtype_name_of(written_as)} (those merged rounded once, "
            f"after ΔW is added in float32), without their scales, and config.json without "
            f"quantization_config"
        )


def _check_requantizable(checkpoint) -> None:
    quantization = checkpoint.quantization
    if quantization is None:
        raise UnsupportedError(
            f"{checkpoint.path}: --requantize writes the merge in the base's quantized format, but the "
            f"base is not quantized; merge without --requantize"
        )
    if not readers.can_quantize(quantization.format):
        raise UnsupportedError(
            f"{checkpoint.path}: --requantize: lorasurgery reads {quantization.name}-quantized "
            f"checkpoints but cannot write them requantized yet; merge without --requantize writes "
            f"the merge unquantized (docs/design.md §13)"
        )


def _stored_items(checkpoint, items: list[Item], notes: list) -> list[Item]:
    """The output as the base stores it: each quantized (logical) item becomes its stored tensors."""
    out: list[Item] = []
    touched = 0
    for item in items:
        info = item.source
        if info is None or not info.dequantized or item.name != info.name:
            out.append(item)
            continue
        static = [(role, part) for role, part in info.parts if role in readers.STATIC_ROLES]
        if item.untouched:
            out += [Item(t.name, TensorSpec.like(t), t) for t in (info.codes, *(p for _, p in info.parts))]
            continue
        touched += 1
        parts = tuple(TensorSpec.like(p) for role, p in info.parts if role not in readers.STATIC_ROLES)
        out.append(Item(info.codes.name, TensorSpec.like(info.codes), info, item.recipe, parts, True))
        out += [Item(p.name, TensorSpec.like(p), p) for _, p in static]
    notes.append(
        f"--requantize: the base stays {checkpoint.quantization.name}-quantized; its {touched} merged "
        f"quantized tensors are requantized (deq(W) + ΔW, scales recomputed), every other tensor is "
        f"copied as stored"
    )
    return out


def unquantize(plan: MergePlan, names) -> None:
    """Write the requantizing items of `names` (logical tensor names) as plain weights in the
    output dtype instead (--min-retention), their activation scales dropped, and list their modules
    in the config's ignore list (docs/design.md §13). A format whose loader converts a module as a
    whole (readers.unit: MXFP4's experts) gets every quantized tensor of that module written plain,
    an untouched one dequantized as it is."""
    names = set(names)
    if not names:
        return
    quantization = plan.checkpoint.quantization
    fmt = quantization.format
    units = {readers.unit(fmt, n) for n in names}
    whole = {
        info.name: info
        for info in plan.checkpoint.tensors.values()
        if info.dequantized and readers.unit(fmt, info.name) in units
    }
    by_codes = {info.codes.name: info for info in whole.values()}
    dropped = {p.name for info in whole.values() for _, p in info.parts}
    items, chosen, siblings = [], [], []
    for item in plan.items:
        if item.requantize and item.source.name in whole:
            info = item.source
            items.append(Item(info.name, _spec(info.name, info, plan.output_dtype_code), info, item.recipe))
            chosen.append(info.name)
        elif not item.requantize and item.name in by_codes:  # an untouched tensor of a chosen unit
            info = by_codes[item.name]
            items.append(Item(info.name, _spec(info.name, info, plan.output_dtype_code), info))
            siblings.append(info.name)
        elif item.name not in dropped:
            items.append(item)
    plan.items = items
    modules = list(dict.fromkeys(readers.unit(fmt, n) for n in sorted(chosen, key=_order(plan))))
    written_as = dtype_name_of(next(i.spec.dtype for i in items if i.name in whole))
    plan.notes.append(
        f"--min-retention: {len(chosen)} of the merged tensors keep too little of their update when "
        f"requantized and are written unquantized as {written_as}, without scales"
        + (
            f"; so are the untouched {', '.join(siblings)}, which {quantization.name}'s loader "
            f"converts with them as one module"
            if siblings
            else ""
        )
    )
    if plan.config is not None and quantization.source in plan.config:
        settings = readers.exclude(quantization, plan.config[quantization.source], modules, _plain(plan))
        plan.config[quantization.source] = settings
        plan.config_changes[quantization.source] = settings
    else:
        plan.notes.append(
            f"the base declares no quantization_config: the {len(modules)} modules written unquantized "
            f"({', '.join(modules[:_LISTED])}{' …' if len(modules) > _LISTED else ''}) are listed nowhere"
        )


def _plain(plan: MergePlan) -> list[str]:
    """The modules whose 2-D weight the base stores unquantized, tied members included (the loader's
    default skip list covers them: readers.exclude)."""
    return [
        name[: -len(".weight")]
        for name, info in model_tensors(plan.checkpoint, plan.structure).items()
        if name.endswith(".weight") and not info.dequantized and len(info.shape) == 2
    ]


def _order(plan: MergePlan):
    position = {i.source.name if i.source is not None else i.name: n for n, i in enumerate(plan.items)}
    return lambda name: position.get(name, 0)


def _untie_note(structure: Structure, outcome: TieOutcome, notes: list, changes: dict) -> None:
    changed = outcome.changed
    what = "both" if len(changed) == len(outcome.group) else ", ".join(changed)
    stored_as = " to ".join(reversed(outcome.group)) if len(outcome.group) == 2 else ", ".join(outcome.group)
    embeddings = {f"{m}.weight" for m in (structure.input_embedding, structure.output_embedding) if m}
    if embeddings & set(outcome.group):
        changes["tie_word_embeddings"] = False
        notes.append(
            f"the base ties {stored_as} and the merge changes {what}: "
            f"both are written and config.json gets tie_word_embeddings: false"
        )
    else:
        notes.append(
            f"the base ties {stored_as} and the merge changes {what}: all are written, but transformers "
            f"may tie them again when loading"
        )


def _check_vocabulary(structure: Structure, checkpoint, items, tensors, config, changes) -> None:
    """A replaced input embedding may have more rows (resized vocabulary): vocab_size follows it."""
    if not structure.input_embedding:
        return
    input_name = f"{structure.input_embedding}.weight"
    item = items.get(input_name)
    if item is None or item.recipe.start is None or input_name not in tensors:
        return
    rows = item.spec.shape[0]
    if rows == tensors[input_name].shape[0]:
        return
    output_name = f"{structure.output_embedding}.weight" if structure.output_embedding else None
    if output_name is not None and output_name in tensors:
        spec = items[output_name].spec if output_name in items else None
        tied_along = output_name in (structure.tie_group(input_name) or ())  # stored once, follows it
        out_rows = (
            spec.shape[0] if spec is not None else (rows if tied_along else tensors[output_name].shape[0])
        )
        if out_rows != rows:
            raise MismatchError(
                f"the adapter resizes {input_name} to {rows} rows but {output_name} keeps {out_rows}; "
                f"an adapter for a resized vocabulary must also carry {output_name} (modules_to_save)"
            )
    if config is not None and config.get("vocab_size") != rows:
        changes["vocab_size"] = rows


def _check_shape(bound: BoundAdapter, key: str, base_name: str, shape: tuple[int, ...]) -> None:
    module = bound.targets[key]
    expected = tuple(module.lora.shape)
    slot = module.lora.slot
    if slot is not None:  # a per-expert module on its slice of a fused parameter (model/experts.py)
        within = slot.within(shape)
        if within != expected:
            has = f"no expert {slot.expert}" if within is None else f"slices of shape {list(within)}"
            raise MismatchError(
                f"{bound.path}: module {key} expects a weight of shape {list(expected)} but the base's "
                f"{base_name} of shape {list(shape)} has {has} ({slot.label})"
            )
        return
    if tuple(shape) != expected:
        layout = ""
        if module.kind == "linear":
            stored = "(in, out)" if module.transposed else "(out, in)"
            decided = module.layout.reason if module.layout is not None else "adapter"
            layout = f" (stored {stored}, decided by the {decided})"
        raise MismatchError(
            f"{bound.path}: module {key} expects a weight of shape {list(expected)}{layout} but the "
            f"base's {base_name} has shape {list(shape)}"
        )


def _check_finite(bound: BoundAdapter, path) -> None:
    adapter = bound.adapter
    for key, module in bound.targets.items():
        for label, tensor in _module_tensors(adapter, module.lora):
            if tensor.is_floating_point() and not all_finite(tensor):
                raise NonFiniteError(
                    f"{path}: module {key}: {label} holds NaN/Inf; pass --allow-nonfinite to go on"
                )
    for relative, tensor_name in adapter.replacements.items():
        tensor = adapter.read(tensor_name)
        if tensor.is_floating_point() and not all_finite(tensor):
            raise NonFiniteError(
                f"{path}: saved tensor {relative} holds NaN/Inf; pass --allow-nonfinite to go on"
            )
    for module, rows in adapter.tokens.items():
        if not all_finite(adapter.read(rows.key)):
            raise NonFiniteError(
                f"{path}: trainable tokens of {module} hold NaN/Inf; pass --allow-nonfinite to go on"
            )


def _module_tensors(adapter, lora):
    A, B = adapter.read_factors(lora)
    yield "lora_A", A
    yield "lora_B", B
    if lora.dora:
        yield "lora_magnitude_vector", adapter.read_magnitude(lora)
    if lora.lora_bias:
        yield "lora_B.bias", adapter.read_lora_bias(lora)
