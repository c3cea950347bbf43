"""An adapter bound to its base: for each LoRA module, the base tensor it updates, how that tensor is
laid out and what kind it is; for each saved tensor and trainable-token row, what it replaces. Every
command that has a base asks here (merge, inspect, rank-report, resize, combine, export, the probe).

`bind(adapters, base)` takes its steps in the order they depend on each other:
1. LoRA on nn.Parameters (target_parameters): which parameter each wrapper targets, with its rank
   and layout (adapter/parameters.py), from the stored shapes and the model's structure;
2. the prefix rule mapping the adapter's module paths onto the checkpoint's names (adapter/names.py);
3. the model's structure (lorasurgery/model/): a tied member stored once is read from the stored one; a
   fused expert parameter that the checkpoint stores split is merged as one piece per stored tensor;
   a per-expert module (`…experts.3.gate_proj`, transformers 4.x's and trainers' layout) of a fused
   parameter the checkpoint stores whole is bound to its slice (model/experts.py: expert e, and for
   gate_up_proj the gate or up part, concatenated or gpt-oss's interleaved columns), which its
   LoraModule carries as `slot`; a checkpoint that stores it split has it as a tensor of its own;
4. the layout of every linear target, decided for all adapters together, since a square weight's
   layout compares their flags (model.layouts.linear_layouts: the structure, else --fan-in-fan-out,
   else the stored shape, else the adapter's flag);
5. with `check_shapes`, every module's ΔW against its base tensor (merge checks against the tensor
   each module will really meet, a saved and resized one included, and passes False).
The result is immutable, and the loaded Adapter is left as it was: bound modules are laid-out copies.

A layout that rests on the adapter's flag rather than on the structure, the option or the shape (a
square weight of a base without config.json) is an `Assumption`: each BoundAdapter lists its own,
naming the modules, what was assumed and how to be sure, for every command to report.

Reading adapter_config.json's fan_in_fan_out, and the rule that turns a layout into a transpose
(`stored_transposed`), belong to this layer and lorasurgery.model only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from lorasurgery.adapter.model import Adapter, LoraModule, TokenRows, is_base_layer
from lorasurgery.adapter.names import (
    PrefixRule,
    find_prefix_rule,
    missing_modules_error,
    shape_mismatch_error,
)
from lorasurgery.adapter.parameters import (
    bind_parameters,
    read_parameter,
    split_pieces,
    with_split_parameters,
)
from lorasurgery.errors import MismatchError
from lorasurgery.model import (
    Layout,
    LinearTarget,
    Structure,
    linear_layouts,
    model_tensors,
    structure_of,
)
from lorasurgery.model.experts import TRAINER_NAMES as EXPERT_CLASSES

_LISTED = 8  # how many modules a message names


def stored_transposed(lora: LoraModule) -> bool:
    """Whether the base weight is stored as the transpose of ΔW = s·B@A's (out, in): a linear layer
    stored (in, out) (GPT-2's Conv1D, PEFT's fan_in_fan_out), an embedding (num_embeddings, dim), or,
    expert by expert, a 3-D expert parameter stored (E, in, out). The one place this rule is written;
    a bound module's `fan_in_fan_out` is the base's layout."""
    if lora.kind == "parameter":
        return lora.transposed
    return lora.kind == "embedding" or (lora.kind == "linear" and lora.fan_in_fan_out)


@dataclass(frozen=True)
class BoundModule:
    """One LoRA module on its base tensor."""

    key: str  # its key in BoundAdapter.modules / .targets
    lora: LoraModule  # laid out as the base stores the tensor: lora.shape is that tensor's shape
    name: str  # the base tensor it updates, by the model's name (a tied member by its own name)
    tensor: str  # where the checkpoint keeps it: a tie's stored member; a fused parameter stored split
    # by its fused name (BoundAdapter.read_base puts it together)
    layout: Layout | None = None  # a linear target's: stored (in, out) or not, and who decided

    @property
    def kind(self) -> str:
        return self.lora.kind

    @property
    def transposed(self) -> bool:
        return stored_transposed(self.lora)


@dataclass(frozen=True)
class SavedTensor:
    """A tensor the adapter saves whole (modules_to_save, bias="all", a targeted layer's base weight)."""

    relative: str  # the model-relative name the adapter gives it
    key: str  # its key in the adapter's weight file
    name: str | None  # the base tensor it replaces (a tied member by its own name); None: the base has none
    tensor: str | None  # where the checkpoint stores that tensor (a tie's stored member)
    base_layer: bool  # saved as <m>.base_layer.<p>: the wrapped layer's own parameter, shared by ties


@dataclass(frozen=True)
class BoundTokens:
    """Trainable tokens: rows of a base embedding the adapter overwrites."""

    rows: TokenRows
    name: str  # the embedding weight, by the model's name
    tensor: str  # where the checkpoint stores it


@dataclass(frozen=True)
class Assumption:
    """Linear targets whose layout follows the adapter's fan_in_fan_out because nothing decides it."""

    adapter: str
    modules: tuple[str, ...]
    fan_in_fan_out: bool  # the layout assumed: stored (in, out) when true
    because: str  # why nothing decides it
    remedy: str  # how to be sure

    @property
    def assumed(self) -> str:
        return (
            "stored (in, out) as a GPT-2 Conv1D"
            if self.fan_in_fan_out
            else "stored (out, in) as an nn.Linear"
        )

    def message(self) -> str:
        listed = ", ".join(self.modules[:_LISTED]) + (
            f" and {len(self.modules) - _LISTED} more" if len(self.modules) > _LISTED else ""
        )
        flag = str(self.fan_in_fan_out).lower()
        count = f"{len(self.modules)} module{'s' if len(self.modules) != 1 else ''}"
        return (
            f"{self.adapter}: the layout of {count} ({listed}) is assumed from adapter_config.json's "
            f"fan_in_fan_out: {flag}, {self.assumed}: {self.because}. {self.remedy[0].upper()}{self.remedy[1:]}"
        )

    def to_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "modules": list(self.modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "assumed": self.assumed,
            "because": self.because,
            "remedy": self.remedy,
        }


@dataclass(frozen=True)
class BoundAdapter:
    """An adapter on one base checkpoint (see the module docstring)."""

    adapter: Adapter
    checkpoint: object  # io.Checkpoint
    structure: Structure
    rule: PrefixRule
    modules: Mapping[str, BoundModule]  # per adapter module (a fused expert parameter whole)
    targets: Mapping[str, BoundModule]  # what a merge updates: one per stored base tensor
    saved: tuple[SavedTensor, ...]
    tokens: Mapping[str, BoundTokens]  # embedding module -> its overwritten rows
    assumptions: tuple[Assumption, ...] = ()  # layouts that rest on the adapter's flag
    _last_fused: dict = field(default_factory=dict, repr=False, compare=False)  # read_base's one tensor

    @property
    def path(self):
        return self.adapter.path

    @property
    def loras(self) -> dict[str, LoraModule]:
        """{key: the laid-out LoraModule} of every module."""
        return {key: bound.lora for key, bound in self.modules.items()}

    def read_base(self, key: str, device: str = "cpu"):
        """The base tensor module `key` updates, in its stored layout (a split expert parameter put
        together; a per-expert module's slice of its fused parameter)."""
        module = self.modules[key]
        if module.lora.slot is None:
            return read_parameter(self.checkpoint, self.structure, module.tensor, device)
        # The per-expert modules of one fused parameter read it once when asked in turn: the last
        # fused tensor read is kept (one tensor, as every read here).
        last = self._last_fused
        if last.get("key") != (module.tensor, device):
            last.clear()
            last["W"] = read_parameter(self.checkpoint, self.structure, module.tensor, device)
            last["key"] = (module.tensor, device)
        return module.lora.slot.view(last["W"]).clone()

    def base_dtype(self, key: str):
        """The stored torch dtype of module `key`'s base tensor (its first piece when stored split)."""
        name = self.modules[key].tensor
        tensors = self.checkpoint.tensors
        if name not in tensors:
            name = self.structure.pieces(name, tensors)[0][0]
        return tensors[name].torch_dtype


def bind(
    adapters: Sequence[Adapter],
    base,
    *,
    structure: Structure | None = None,
    config_file=None,
    fan_in_fan_out: str | None = None,
    check_shapes: bool = True,
    config_option: bool = True,
) -> list[BoundAdapter]:
    """Bind `adapters` to the checkpoint `base` (an io.Checkpoint), together. `structure` is the base's
    (read from `config_file` or its own config.json when not given); `fan_in_fan_out` is merge's
    `--fan-in-fan-out REGEX`; `config_option`: the command takes --config (the remedy an Assumption
    names). Raises naming the adapter and module when they do not fit."""
    if structure is None:
        structure = structure_of(base, config_file)
    model = model_tensors(base, structure)  # every name the model has, tied members stored once included
    tensors = with_split_parameters(model, base, structure)  # and fused parameters stored split
    tensors = _with_expert_slices(tensors, structure)  # and the per-expert slices of fused ones
    found = [_map_modules(adapter, base, structure, tensors) for adapter in adapters]

    targets, where = [], {}
    for index, (adapter, (_, modules, names)) in enumerate(zip(adapters, found)):
        for key, lora in modules.items():
            info = tensors[names[key]]
            if lora.kind != "linear" or len(info.shape) != 2:
                continue
            target = LinearTarget(
                str(adapter.path),
                key,
                names[key],
                tuple(info.shape),
                lora.features,
                adapter.config.fan_in_fan_out,
            )
            targets.append(target)
            # an adapter given twice (combine A A) is laid out alike in both places
            where.setdefault((target.adapter, key), []).append(index)
    layouts: list[dict[str, Layout]] = [{} for _ in adapters]
    for (path, key), layout in linear_layouts(structure, targets, fan_in_fan_out).items():
        for index in where[(path, key)]:
            layouts[index][key] = layout

    remedy = (
        "pass --config with the base's config.json to be sure"
        if config_option
        else "put the base's config.json in its folder to be sure"
    )
    bound = []
    for adapter, (rule, modules, names), laid_out in zip(adapters, found, layouts):
        assumptions = _assumptions(adapter, structure, laid_out, remedy)
        laid = _laid_out_modules(structure, model, tensors, modules, names, laid_out)
        if check_shapes:
            _check_shapes(adapter, base, tensors, names, laid)
        bound.append(_bound(adapter, base, structure, model, rule, laid, assumptions))
    return bound


def decided_fan_in_fan_out(bound: Sequence[BoundAdapter]) -> bool | None:
    """The fan_in_fan_out every linear module was laid out with on the base, when the base decided it
    (its structure, --fan-in-fan-out or its shape) alike for all; else None (PEFT decides per layer).
    A per-expert module is an nn.Linear in its own model whatever its slice's storage (gpt-oss's is
    (in, out)): it does not count."""
    flags = {
        module.lora.fan_in_fan_out
        for b in bound
        for module in b.modules.values()
        if module.kind == "linear"
        and module.layout is not None
        and module.layout.reason not in ("adapter", "assumed")
        and module.lora.slot is None
        and b.structure.expert_slice(module.name) is None
    }
    return flags.pop() if len(flags) == 1 else None


def saved_fan_in_fan_out(adapters: Sequence[Adapter]) -> bool:
    """The fan_in_fan_out the adapters' own configs say, any of them true making it true."""
    return any(adapter.config.fan_in_fan_out for adapter in adapters)


# --------------------------------------------------------------------------------------------------


def _map_modules(adapter: Adapter, checkpoint, structure: Structure, tensors: dict):
    """(modules with target_parameters bound, the prefix rule, {key: base name}) of one adapter."""
    modules = _bind_parameters(adapter, checkpoint.tensors, structure)
    # The rule comes from the LoRA modules, else from the saved tensors, else from the token rows.
    names = [m.base_weight_name for m in modules.values()]
    if names:
        rule, unmatched = find_prefix_rule(names, tensors)
        if unmatched:
            error = missing_modules_error(adapter.path, unmatched, len(modules), checkpoint.path)
            beyond = _experts_beyond(unmatched, rule, structure)
            raise MismatchError(f"{error}; {beyond}") if beyond else error
    elif adapter.replacements:
        rule, _ = find_prefix_rule(list(adapter.replacements), tensors)
    else:
        rule, _ = find_prefix_rule([rows.base_weight_name for rows in adapter.tokens.values()], tensors)
    return rule, modules, {key: rule.apply(m.base_weight_name) for key, m in modules.items()}


_EXPERT = re.compile(r"^(?P<head>.*\.)(?P<expert>\d+)(?P<tail>\..*)$")


def _experts_beyond(unmatched: list[str], rule: PrefixRule, structure: Structure) -> str:
    """Why per-expert modules are missing when their expert index is beyond the base's experts
    (expert 0 of the same name is a per-expert weight of the model, model/experts.py), else ""."""
    reasons = []
    for name in unmatched:
        match = _EXPERT.match(name)
        first = match and rule.apply(f"{match['head']}0{match['tail']}")
        slot = structure.expert_slice(first) if first else None
        if slot is not None:
            reasons.append(
                f"{name.removesuffix('.weight')} names expert {match['expert']} but the base has "
                f"{slot.experts} experts (0–{slot.experts - 1}) in {slot.parameter}"
            )
    return "; ".join(reasons[:_LISTED])


def _assumptions(adapter: Adapter, structure: Structure, layouts: dict[str, Layout], remedy: str):
    """One Assumption per layout assumed from the adapter's flag (model.layouts.linear_layouts)."""
    by_flag: dict[bool, list[str]] = {}
    for key, layout in layouts.items():
        if layout.reason == "assumed":
            by_flag.setdefault(layout.fan_in_fan_out, []).append(key)
    because = (
        f"{structure.source}, and square weights do not tell a Linear from a GPT-2 Conv1D"
        if not structure.known
        else f"the model of {structure.source} does not know these modules, and their weights are square"
    )
    return [
        Assumption(str(adapter.path), tuple(keys), flag, because, remedy)
        for flag, keys in sorted(by_flag.items())
    ]


def _bind_parameters(adapter: Adapter, stored: dict, structure: Structure) -> dict[str, LoraModule]:
    """adapter/parameters.bind_parameters against the checkpoint's tensors `stored` and its structure."""
    if not any(m.kind == "parameter" for m in adapter.modules.values()):
        return dict(adapter.modules)
    names = [
        f"{m.name}.{m.candidates[0]}" if m.kind == "parameter" else m.base_weight_name
        for m in adapter.modules.values()
    ]
    rule, _ = find_prefix_rule(names, stored)

    def shape_of(name: str, parameter: str):
        base = rule.apply(f"{name}.{parameter}")
        if base in stored:
            return tuple(stored[base].shape)
        known = structure.known and structure.pieces(base, stored) is not None
        module = structure.module(rule.apply(name) or name) if known else None
        return tuple(module.parameters[parameter]) if module is not None else None  # stored split

    def layout_of(name: str):
        module = structure.module(rule.apply(name) or name) if structure.known else None
        return (list(module.parameters), module.transposed) if module is not None else None

    return bind_parameters(adapter, shape_of, layout_of)


def _laid_out_modules(structure, model, tensors, modules, names, layouts) -> dict[str, BoundModule]:
    """{key: BoundModule} of one adapter's modules (`names`: their base tensors), each in its layout;
    a per-expert module of a fused parameter on its slice of it."""
    bound: dict[str, BoundModule] = {}
    for key, lora in modules.items():
        layout = layouts.get(key)
        if layout is not None:
            lora = lora.laid_out(layout.fan_in_fan_out)
        name = names[key]
        slot = structure.expert_slice(name) if lora.kind == "linear" and name not in model else None
        if slot is not None:  # updates its slice of the fused parameter (model/experts.py)
            lora = dataclasses.replace(lora, slot=slot)
            name = slot.parameter
        bound[key] = BoundModule(key, lora, name, tensors[name].name, layout)
    return bound


def _check_shapes(adapter, checkpoint, tensors, names, bound: dict[str, BoundModule]) -> None:
    """Every module's shape against its base tensor's, or an error listing each that differs."""
    wrong = [
        f"{key} (adapter expects {list(m.lora.shape)}, base has {list(tensors[names[key]].shape)}"
        + (f", {m.lora.slot.label}" if m.lora.slot is not None else "")
        + ")"
        for key, m in bound.items()
        if tuple(tensors[names[key]].shape) != tuple(m.lora.shape)
    ]
    if wrong:
        raise shape_mismatch_error(adapter.path, wrong, checkpoint.path)


def _bound(
    adapter, checkpoint, structure, model, rule, bound: dict[str, BoundModule], assumptions
) -> BoundAdapter:
    """One adapter bound: its laid-out modules, what a merge writes of them, its saved tensors and tokens."""
    return BoundAdapter(
        adapter=adapter,
        checkpoint=checkpoint,
        structure=structure,
        rule=rule,
        modules=MappingProxyType(bound),
        targets=MappingProxyType(_targets(adapter, checkpoint, structure, bound)),
        saved=tuple(_saved(adapter, rule, model)),
        tokens=MappingProxyType(_tokens(adapter, rule, model)),
        assumptions=tuple(assumptions),
    )


def _targets(adapter, checkpoint, structure, modules: dict[str, BoundModule]) -> dict[str, BoundModule]:
    """The modules as a merge writes them: a fused expert parameter the checkpoint stores split
    becomes one module per stored tensor (adapter/parameters.split_pieces)."""
    targets = {}
    for key, module in modules.items():
        lora = module.lora
        pieces = None
        if lora.kind == "parameter" and lora.experts and module.tensor not in checkpoint.tensors:
            pieces = structure.pieces(module.tensor, checkpoint.tensors)
        if pieces is None:
            targets[key] = module
            continue
        where = f"{adapter.path}: module {lora.name}, parameter {lora.parameter}"
        for piece_key, piece in split_pieces(where, key, lora, pieces, checkpoint.tensors).items():
            targets[piece_key] = BoundModule(piece_key, piece, piece.base_weight_name, piece.base_weight_name)
    return targets


def _with_expert_slices(tensors: dict, structure: Structure) -> dict:
    """`tensors` plus every per-expert weight name of a fused expert parameter the checkpoint stores
    whole (model/experts.py), under the fused tensor's stored name with the slice's shape."""
    from types import SimpleNamespace

    if (
        not structure.known
        or not structure.stored
        and not any(m.cls in EXPERT_CLASSES for m in structure.modules.values())
    ):
        return tensors
    tensors = dict(tensors)
    for name, slot in structure.expert_slices().items():
        if name not in tensors and slot.parameter in tensors:
            tensors[name] = SimpleNamespace(name=tensors[slot.parameter].name, shape=slot.shape)
    return tensors


def _saved(adapter: Adapter, rule: PrefixRule, model: dict):
    for relative, key in adapter.replacements.items():
        name = rule.apply(relative)
        if name not in model:
            name = None
        tensor = model[name].name if name is not None else None
        yield SavedTensor(relative, key, name, tensor, is_base_layer(key))


def _tokens(adapter: Adapter, rule: PrefixRule, model: dict) -> dict[str, BoundTokens]:
    tokens = {}
    for module, rows in adapter.tokens.items():
        name = rule.apply(rows.base_weight_name)
        if name not in model:
            raise MismatchError(
                f"{adapter.path}: trainable tokens of {module}: the base has no {rows.base_weight_name}"
            )
        count = model[name].shape[0]
        if max(rows.indices) >= count:
            raise MismatchError(
                f"{adapter.path}: trainable tokens of {module}: token {max(rows.indices)} is beyond the "
                f"{count} rows of {name}"
            )
        tokens[module] = BoundTokens(rows, name, model[name].name)
    return tokens
