"""The layout of a LoRA target's base weight: stored (out, in), or (in, out) as GPT-2's Conv1D.

The model's structure decides where it is known (model/structure.py); else `--fan-in-fan-out REGEX`;
else the stored shape where it is not square. A square weight nothing decides follows the adapter's
saved flag as a stated assumption ("assumed"), refused by name where something contradicts it. The
rules are in docs/merge.md, "Semantics".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorasurgery.errors import MismatchError, UnsupportedError
from lorasurgery.model.structure import Structure, leaf


@dataclass(frozen=True)
class LinearTarget:
    """A LoRA module with lora_A/lora_B (r, in)/(out, r) on a 2-D base weight, as a layout question."""

    adapter: str  # the adapter's path, for messages
    module: str  # the adapter's module name
    weight: str  # the base tensor's name
    stored: tuple[int, ...]  # the base tensor's stored shape
    features: tuple[int, int]  # (out, in) = (lora_B rows, lora_A columns)
    hint: bool  # adapter_config.json's fan_in_fan_out, which PEFT saves from its last-created layer


@dataclass(frozen=True)
class Layout:
    fan_in_fan_out: bool  # stored (in, out)
    # who decided: "structure" | "option" | "shape"; "assumed": the adapter's flag, nothing deciding
    # (a square weight without a structure); "adapter": the flag, no layout fitting (the shape check
    # then reports it)
    reason: str


def fan_in_fan_out_matcher(pattern: str | None):
    """A predicate on module names for `--fan-in-fan-out REGEX` (re.search), or None."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise UnsupportedError(f"--fan-in-fan-out {pattern!r} is not a regular expression: {error}") from None
    return lambda name: compiled.search(name) is not None


def linear_layouts(
    structure: Structure, targets: list[LinearTarget], fan_in_fan_out: str | None = None
) -> dict[tuple[str, str], Layout]:
    """{(adapter, module): Layout} for every target, or an error naming the module and the fix.

    The structure decides when it knows the module (PEFT sets fan_in_fan_out per layer: on for
    Conv1D, off for Linear). Else `--fan-in-fan-out REGEX` decides (matching modules are stored
    (in, out)); else the stored shape when it is not square. Else the layout is assumed from the
    adapter's flag (reason "assumed"), unless something contradicts it: another target of that
    adapter whose shape decides disagrees, the adapters targeting that weight disagree, or (without a
    structure) the flag is true and the adapter's square targets have several names. PEFT saves
    the flag of the layer it created last: false is nn.Linear's, the layer custom models are built
    of (transformers models, which have Conv1D, come with a config.json); true is a Conv1D's, and
    square targets of several names need not all be Conv1D."""
    matches = fan_in_fan_out_matcher(fan_in_fan_out)
    layouts: dict[tuple[str, str], Layout] = {}
    undecided: list[LinearTarget] = []
    for target in targets:
        layout = _decided_layout(structure, target, matches, fan_in_fan_out)
        if layout is None:
            undecided.append(target)  # square, or fitting neither way (a shape check will say so)
        else:
            layouts[(target.adapter, target.module)] = layout
    contradicted = _contradicted_flags(targets, layouts)
    hints: dict[str, set[bool]] = {}
    square_kinds: dict[str, set[str]] = {}  # adapter -> leaf names of its undecided targets
    for target in undecided:
        hints.setdefault(target.weight, set()).add(target.hint)
        square_kinds.setdefault(target.adapter, set()).add(leaf(target.module))
    for target in undecided:
        layouts[(target.adapter, target.module)] = _assumed_layout(
            structure, target, contradicted, hints, square_kinds
        )
    return layouts


def _decided_layout(structure: Structure, target: LinearTarget, matches, fan_in_fan_out) -> Layout | None:
    """The layout the structure, `--fan-in-fan-out` or a non-square shape decides, in that order; None
    when nothing does (a square weight, or one fitting neither way)."""
    module = structure.module_of_tensor(target.weight) if structure.known else None
    slot = structure.expert_slice(target.weight) if structure.known else None
    if slot is not None:  # a per-expert module of a fused expert parameter (model/experts.py)
        return Layout(slot.transposed, "structure")
    if module is not None and module.kind in ("linear", "conv1d"):
        if matches is not None and matches(target.module) != module.fan_in_fan_out:
            raise MismatchError(
                f"--fan-in-fan-out {fan_in_fan_out!r} {'matches' if matches(target.module) else 'does not match'} "
                f"module {target.module}, but {structure.source} makes {target.weight} a {module.cls} "
                f"(stored {'(in, out)' if module.fan_in_fan_out else '(out, in)'}); drop the option or fix it"
            )
        return Layout(module.fan_in_fan_out, "structure")
    if matches is not None:
        return Layout(matches(target.module), "option")
    out_features, in_features = target.features
    stored = tuple(target.stored)
    if stored == (out_features, in_features) and out_features != in_features:
        return Layout(False, "shape")
    if stored == (in_features, out_features) and out_features != in_features:
        return Layout(True, "shape")
    return None


def _contradicted_flags(
    targets: list[LinearTarget], layouts: dict[tuple[str, str], Layout]
) -> dict[str, str]:
    """{adapter: why its flag is not trusted} for each adapter a module laid out by its shape
    contradicts (the first such module)."""
    contradicted: dict[str, str] = {}
    for key, layout in layouts.items():
        if layout.reason != "shape":
            continue
        target = next(t for t in targets if (t.adapter, t.module) == key)
        if layout.fan_in_fan_out != target.hint and target.adapter not in contradicted:
            contradicted[target.adapter] = (
                f"its module {target.module} is stored {'(in, out)' if layout.fan_in_fan_out else '(out, in)'}, "
                f"so the adapter targets layers of another kind than its flag says"
            )
    return contradicted


def _assumed_layout(
    structure: Structure, target: LinearTarget, contradicted: dict[str, str], hints, square_kinds
) -> Layout:
    """An undecided target's layout: the adapter's flag, stated as assumed, unless something
    contradicts it (then refused by name, with the fix); "adapter" where no layout fits at all."""
    stored = tuple(target.stored)
    if stored not in ((target.features[0], target.features[1]), (target.features[1], target.features[0])):
        return Layout(target.hint, "adapter")  # no layout fits: the shape check reports it
    why = contradicted.get(target.adapter)
    if why is None and len(hints[target.weight]) > 1:
        why = "the adapters that target it disagree on fan_in_fan_out"
    if why is None and target.hint and not structure.known and len(square_kinds[target.adapter]) > 1:
        # PEFT saves the flag of the layer it created last: a true flag (a Conv1D's) with square
        # targets of several names does not say they are all Conv1D.
        names = ", ".join(sorted(square_kinds[target.adapter]))
        why = f"it targets square weights of several names ({names}) and saves the flag of only one"
    if why is not None:
        unknown = (
            structure.source if not structure.known else f"the model of {structure.source} has no such module"
        )
        raise UnsupportedError(
            f"{target.adapter}: module {target.module}: the base's {target.weight} is square "
            f"({stored[0]}×{stored[1]}) and {unknown}, so neither tells a Linear (stored (out, in)) "
            f"from a GPT-2 Conv1D (stored (in, out)); the adapter's fan_in_fan_out: "
            f"{str(target.hint).lower()} cannot be trusted ({why}). Pass --config with the base's "
            f"config.json, or --fan-in-fan-out REGEX matching the Conv1D modules (e.g. 'c_attn|c_proj|c_fc')"
        )
    return Layout(target.hint, "assumed")
