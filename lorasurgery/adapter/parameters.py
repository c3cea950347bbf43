"""LoRA on nn.Parameters (PEFT's `target_parameters`, its ParamWrapper): which parameter each saved
wrapper targets, and how its ΔW lies in it.

PEFT (peft/tuners/lora/layer.py, ParamWrapper) reads the layout off the parameter itself:
- 2-D parameter: (out, in) is its stored shape; lora_A (r, shape[1]), lora_B (shape[0], r), ΔW = s·B@A.
- 3-D parameter (E, d1, d2), E experts: lora_A (r·E, in), lora_B (out, r·E). Stored (E, out, in)
  (in = d2, Qwen3-MoE / Mixtral experts): ΔW[e] = s·B_e@A_e; stored (E, in, out) (transformers'
  `is_transposed` experts, gpt-oss): ΔW[e] = s·(B_e@A_e)ᵀ. A_e and B_e: see linalg/delta.py.
- Several parameters of one module get one wrapper each, nested in the order the module registers
  them: the first-registered parameter is the innermost (the most `.base_layer` segments in its keys).
  rank_pattern/alpha_pattern keys match `<module>.<parameter>`.

Which parameter a wrapper targets, and whether a square 3-D parameter is stored (E, in, out), come from
the model's structure (registration order, is_transposed) when the base has a config.json; without one
the shapes decide where they can, and an undecidable case is refused naming the module and `--config`.
A fused parameter that the checkpoint stores split (Qwen3-MoE, Mixtral: per expert and projection)
becomes one 2-D module per stored tensor for the merge (`split_stored`); reports read the fused
parameter put together (`read_parameter`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from lorasurgery.errors import MismatchError, UnsupportedError

# (module path, parameter) -> the base tensor's stored shape, or None when the base lacks it
ShapeOf = Callable[[str, str], "tuple[int, ...] | None"]
# module path -> (parameters in registration order, is_transposed), or None when the structure is unknown
LayoutOf = Callable[[str], "tuple[list[str], bool] | None"]


def _fits(adapter, module, parameter: str, shape, transposed: bool) -> bool:
    rows, fan_in = adapter.tensors[module.a_key].shape
    fan_out = adapter.tensors[module.b_key].shape[0]
    r = adapter.config.rank_of(f"{module.name}.{parameter}")
    if len(shape) == 2:
        return rows == r and tuple(shape) == (fan_out, fan_in)
    if len(shape) == 3:
        experts, d1, d2 = shape
        return rows == r * experts and (fan_in, fan_out) == ((d1, d2) if transposed else (d2, d1))
    return False


def bind_parameters(adapter, shape_of: ShapeOf, layout_of: LayoutOf) -> None:
    """Give every target_parameters module of `adapter` its parameter, rank, scale and layout against
    the base; re-keys `adapter.modules` as `<module>.<parameter>`. Raises naming the module otherwise."""
    groups: dict[str, list] = {}
    for module in adapter.modules.values():
        if module.kind == "parameter":
            groups.setdefault(module.name, []).append(module)
    if not groups:
        return
    bound = {}
    for name, wrappers in groups.items():
        wrappers.sort(key=lambda m: -m.depth)  # innermost first: the first-registered parameter
        present = [p for p in wrappers[0].candidates if shape_of(name, p) is not None]
        layout = layout_of(name)
        where = f"{adapter.path}: module {name}"
        if len(present) < len(wrappers):
            raise MismatchError(
                f"{where}: the adapter has {len(wrappers)} LoRA on its parameters "
                f"({', '.join(wrappers[0].candidates)} targeted) but the base has "
                f"{', '.join(f'{name}.{p}' for p in present) or 'none of them'}"
            )
        if layout is not None:
            order, transposed = layout
            ordered = [p for p in order if p in present][: len(wrappers)]
            choices = [tuple((m, p, transposed) for m, p in zip(wrappers, ordered))]
            choices = [c for c in choices if all(_fits(adapter, m, p, shape_of(name, p), t) for m, p, t in c)]
        else:
            choices = []
            for chosen in itertools.permutations(present, len(wrappers)):
                options = []
                for m, p in zip(wrappers, chosen):
                    shape = shape_of(name, p)
                    fitting = [
                        t
                        for t in ((False, True) if len(shape) == 3 else (False,))
                        if _fits(adapter, m, p, shape, t)
                    ]
                    options.append([(m, p, t) for t in fitting])
                choices += [tuple(c) for c in itertools.product(*options)]
        if not choices:
            shapes = ", ".join(f"{p} {list(shape_of(name, p))}" for p in present)
            factors = "; ".join(
                f"lora_A {list(adapter.tensors[m.a_key].shape)} / lora_B {list(adapter.tensors[m.b_key].shape)}"
                for m in wrappers
            )
            raise MismatchError(
                f"{where}: the LoRA factors ({factors}) fit none of the base's parameters ({shapes})"
            )
        if len(choices) > 1:
            raise UnsupportedError(
                f"{where}: the base has no config.json and the shapes of {', '.join(present)} do not tell which "
                f"LoRA targets which parameter, or whether experts are stored (E, in, out) or (E, out, in); "
                f"pass --config with the base's config.json"
            )
        for module, parameter, transposed in choices[0]:
            shape = tuple(shape_of(name, parameter))
            r = adapter.config.rank_of(f"{name}.{parameter}")
            bound[id(module)] = dataclasses.replace(
                module,
                parameter=parameter,
                r=r,
                alpha=adapter.config.alpha_of(f"{name}.{parameter}"),
                scale=adapter.config.scale_of(f"{name}.{parameter}", r),
                experts=shape[0] if len(shape) == 3 else 0,
                transposed=transposed and len(shape) == 3,
                shape=shape,
            )
    adapter.modules = {
        (bound[id(m)].key if id(m) in bound else key): bound.get(id(m), m)
        for key, m in adapter.modules.items()
    }


def bind_against(adapter, tensors: dict, structure) -> None:
    """bind_parameters against a base: `tensors` maps its tensor names to infos with `.shape`;
    `structure` is lorasurgery.architecture's Structure of the base (or None)."""
    from lorasurgery.adapter.names import find_prefix_rule

    if not any(m.kind == "parameter" for m in adapter.modules.values()):
        return
    names = [
        f"{m.name}.{m.candidates[0]}" if m.kind == "parameter" else m.base_weight_name
        for m in adapter.modules.values()
    ]
    rule, _ = find_prefix_rule(names, tensors)

    def shape_of(name: str, parameter: str):
        base = rule.apply(f"{name}.{parameter}")
        if base in tensors:
            return tuple(tensors[base].shape)
        known = structure is not None and structure.known and structure.pieces(base, tensors) is not None
        module = structure.module(rule.apply(name) or name) if known else None
        return tuple(module.parameters[parameter]) if module is not None else None  # stored split

    def layout_of(name: str):
        module = (
            structure.module(rule.apply(name) or name) if structure is not None and structure.known else None
        )
        return (list(module.parameters), module.transposed) if module is not None else None

    bind_parameters(adapter, shape_of, layout_of)


def split_stored(adapter, tensors: dict, structure) -> None:
    """A bound expert parameter the checkpoint stores split (structure.pieces: per expert, per
    projection, concatenated along d1) becomes one 2-D module per stored tensor: expert e's rows
    [start, stop) of ΔW[e] = s·B_e@A_e, i.e. the rows of B_e (linalg/delta.py). Keys
    `<fused key>[e].<k>`; merge reads the slices through Adapter.read_factors."""
    from lorasurgery.adapter.names import find_prefix_rule

    fused = [m for m in adapter.modules.values() if m.kind == "parameter" and m.experts]
    if not fused or structure is None or not structure.known:
        return
    rule, _ = find_prefix_rule(
        [m.base_weight_name for m in adapter.modules.values()], {**tensors, **structure.stored}
    )
    fused_ids = {id(m) for m in fused}
    modules = {}
    for key, module in adapter.modules.items():
        base = rule.apply(module.base_weight_name) if id(module) in fused_ids else None
        pieces = structure.pieces(base, tensors) if base is not None and base not in tensors else None
        if pieces is None:
            modules[key] = module
            continue
        where = f"{adapter.path}: module {module.name}, parameter {module.parameter}"
        if module.transposed:
            raise UnsupportedError(f"{where}: a fused (E, in, out) parameter stored split is not supported")
        experts, d1, d2 = module.shape
        share = d1 // len(pieces[0])
        for e, names in enumerate(pieces):
            for k, name in enumerate(names):
                if tuple(tensors[name].shape) != (share, d2):
                    raise MismatchError(
                        f"{where}: the base stores expert {e} as {name} of shape {list(tensors[name].shape)}, "
                        f"expected {[share, d2]} ({d1} rows of the fused parameter split {len(names)} ways)"
                    )
                piece = dataclasses.replace(
                    module,
                    name=name.removesuffix(".weight"),
                    parameter="weight",
                    experts=0,
                    shape=(share, d2),
                    piece=(e, experts, k * share, (k + 1) * share),
                )
                modules[f"{key}[{e}].{k}"] = piece
    adapter.modules = modules


def with_split_parameters(tensors: dict, checkpoint, structure) -> dict:
    """`tensors` plus every fused expert parameter the checkpoint stores split (structure.pieces), under
    its fused name with the skeleton's shape, for reports that resolve names (read with read_parameter)."""
    from types import SimpleNamespace

    tensors = dict(tensors)
    if structure is not None and structure.known:
        for name in structure.stored:
            module = structure.module(name.rpartition(".")[0])
            parameter = name.rpartition(".")[2]
            if module is not None and name not in tensors and structure.pieces(name, checkpoint.tensors):
                tensors[name] = SimpleNamespace(name=name, shape=tuple(module.parameters[parameter]))
    return tensors


def read_parameter(checkpoint, structure, name: str, device: str = "cpu"):
    """The base tensor `name`; a fused expert parameter stored split is put together (E, d1, d2)."""
    import torch

    pieces = None
    if name not in checkpoint.tensors and structure is not None:
        pieces = structure.pieces(name, checkpoint.tensors)
    if pieces is None:
        return checkpoint.read(name, device)
    return torch.stack([torch.cat([checkpoint.read(n, device) for n in names], dim=0) for names in pieces])
