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
becomes one 2-D module per stored tensor for the merge (`split_pieces`); reports read the fused
parameter put together (`read_parameter`). lorasurgery.binding calls these against a base.
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


def bind_parameters(adapter, shape_of: ShapeOf, layout_of: LayoutOf) -> dict:
    """`adapter.modules` with every target_parameters module given its parameter, rank, scale and
    layout against the base, keyed `<module>.<parameter>` (new objects; the adapter is not changed).
    Raises naming the module when the base does not tell."""
    groups: dict[str, list] = {}
    for module in adapter.modules.values():
        if module.kind == "parameter":
            groups.setdefault(module.name, []).append(module)
    if not groups:
        return dict(adapter.modules)
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
    return {
        (bound[id(m)].key if id(m) in bound else key): bound.get(id(m), m)
        for key, m in adapter.modules.items()
    }


def split_pieces(where: str, key: str, module, pieces: list[list[str]], tensors: dict) -> dict:
    """A bound expert parameter the checkpoint stores split (structure.pieces: per expert, per
    projection, concatenated along d1) as one 2-D module per stored tensor: expert e's rows
    [start, stop) of ΔW[e] = s·B_e@A_e, i.e. the rows of B_e (linalg/delta.py). Keys
    `<key>[e].<k>`; Adapter.read_factors reads the slices."""
    if module.transposed:
        raise UnsupportedError(f"{where}: a fused (E, in, out) parameter stored split is not supported")
    experts, d1, d2 = module.shape
    share = d1 // len(pieces[0])
    split = {}
    for e, names in enumerate(pieces):
        for k, name in enumerate(names):
            if tuple(tensors[name].shape) != (share, d2):
                raise MismatchError(
                    f"{where}: the base stores expert {e} as {name} of shape {list(tensors[name].shape)}, "
                    f"expected {[share, d2]} ({d1} rows of the fused parameter split {len(names)} ways)"
                )
            split[f"{key}[{e}].{k}"] = dataclasses.replace(
                module,
                name=name.removesuffix(".weight"),
                parameter="weight",
                experts=0,
                shape=(share, d2),
                piece=(e, experts, k * share, (k + 1) * share),
            )
    return split


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
