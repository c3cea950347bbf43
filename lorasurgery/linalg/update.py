"""One LoRA module's update ΔW in each form the commands need, with the layout rule applied once.

- `factors(adapter, lora)`: ΔW = scale·B@A in factored form, in PEFT's (out, in) orientation, the
  same for every layer kind: A (r, in) / (r, vocab) / (r, in·∏kernel), B (out, r) / (dim, r) / (out, r)
  (a conv's 1×1 lora_B flattened; another kernel has no such form and is refused);
- `kernel_update(adapter, lora, weight)`: the merge kernel's Update (linalg.delta), which computes in
  the base tensor's stored layout;
- `from_stored(lora, W)` / `to_stored(lora, M)`: a base tensor between its stored layout and ΔW's
  (out, in): transposed where binding.stored_transposed says (a Conv1D-like linear, an embedding),
  a conv's kernel flattened, a 3-D expert parameter per expert ((E, in, out) experts transposed);
- `dora_delta(bound, key)`: DoRA's effective update W' − W (it depends on W: the magnitude rescales
  each output feature of W + s·B@A), by the merge kernel with PEFT's semantics, in float64 always;
- `merge_into(W, updates)` / `delta_into(update, shape)`: the merge kernel and ΔW on a whole base
  tensor where some updates are per-expert modules bound to a slice of a fused expert parameter
  (`SlicedUpdate`, model/experts.py): each slice merged as the Linear it was, the whole rounded once.

`lora` is a LoraModule: an adapter's own (read alone) or a bound one (lorasurgery.binding), whose
layout is the base's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lorasurgery.binding import stored_transposed
from lorasurgery.errors import UnsupportedError
from lorasurgery.linalg import delta as kernels
from lorasurgery.linalg.delta import Update, compute_dtype_for, delta_weight, merge_weight


@dataclass(frozen=True)
class Factors:
    """ΔW = scale·B@A, flattened to 2-D in PEFT's (out, in) orientation (dtypes as stored)."""

    A: torch.Tensor  # (r, in) / (r, vocab) / (r, in·∏kernel)
    B: torch.Tensor  # (out, r) / (dim, r) / (out, r)
    scale: float


def flatten(adapter, lora, A: torch.Tensor, B: torch.Tensor) -> Factors:
    """The factors A, B of `lora` as read (Adapter.read_factors) in their 2-D form."""
    r = A.shape[0]
    if lora.kind == "conv" and (B.dim() < 2 or B.shape[1] != r or any(k != 1 for k in B.shape[2:])):
        raise UnsupportedError(
            f"{adapter.path}: module {lora.key}: lora_B of shape {tuple(B.shape)} is not a 1×1 "
            f"convolution; it has no low-rank form lorasurgery can use"
        )
    return Factors(A.reshape(r, -1), B.reshape(B.shape[0], r), lora.scale)


def factors(adapter, lora, device: str = "cpu") -> Factors:
    """The factors of `lora` (a module of `adapter`), read and flattened to 2-D."""
    A, B = adapter.read_factors(lora, device)
    return flatten(adapter, lora, A, B)


def from_stored(lora, W: torch.Tensor) -> torch.Tensor:
    """The base tensor `W` of `lora` as ΔW's (out, in) (a view where it can be); a 3-D expert
    parameter as (E, out, in)."""
    if W.dim() == 3 and lora.kind == "parameter":
        return W.transpose(1, 2) if stored_transposed(lora) else W
    return W.T if stored_transposed(lora) else W.reshape(W.shape[0], -1)


def to_stored(lora, M: torch.Tensor, shape) -> torch.Tensor:
    """`M`, (out, in) like ΔW (experts (E, out, in)), in the layout and `shape` the base stores it in."""
    if M.dim() == 3 and lora.kind == "parameter":
        return M.transpose(1, 2) if stored_transposed(lora) else M
    return (M.T if stored_transposed(lora) else M).reshape(shape)


@dataclass
class SlicedUpdate(Update):
    """An Update of a per-expert module on its slice of a fused expert parameter (merge_into)."""

    slot: object = None  # a model.ExpertSlice


def kernel_update(adapter, lora, *, weight: float = 1.0, device: str = "cpu") -> Update:
    """The merge kernel's Update of `lora` (a bound module: its layout is the base's), with the
    adapter's --weight; a SlicedUpdate for a per-expert module bound to a slice (its `slot`)."""
    A, B = adapter.read_factors(lora, device)
    update = Update(
        module=lora.name if lora.kind != "parameter" else lora.base_weight_name,
        kind=lora.kind,
        A=A,
        B=B,
        scale=lora.scale,
        weight=weight,
        transposed=stored_transposed(lora),
        magnitude=adapter.read_magnitude(lora, device) if lora.dora else None,
        source=str(adapter.path),
        experts=lora.experts,
    )
    if lora.slot is None:
        return update
    return SlicedUpdate(**{f.name: getattr(update, f.name) for f in fields(Update)}, slot=lora.slot)


def merge_into(weight: torch.Tensor, updates: list[Update], *, out_dtype: torch.dtype, **options):
    """linalg.delta.merge_weight on the whole base tensor `weight`, where SlicedUpdates merge into their
    slice as the per-expert Linear they were (its DoRA norm the slice's rows, as the Linear's): the
    slices in the compute dtype first, then the whole-tensor updates, rounded once to `out_dtype`."""
    sliced: dict[object, list[Update]] = {}
    whole = []
    for update in updates:
        slot = getattr(update, "slot", None)
        (sliced.setdefault(slot, []) if slot is not None else whole).append(update)
    # kernels.merge_weight looked up at each call: the merge's one kernel, which tests replace
    if not sliced:
        return kernels.merge_weight(weight, whole, out_dtype=out_dtype, **options)
    dtype = compute_dtype_for(options.get("precise", False))
    work = weight.to(dtype, copy=True)
    name = options.pop("name", "")
    for slot, group in sliced.items():
        view = slot.view(work)
        view.copy_(
            kernels.merge_weight(view.clone(), group, out_dtype=dtype, name=f"{name} {slot.label}", **options)
        )
    if whole:
        return kernels.merge_weight(work, whole, out_dtype=out_dtype, name=name, **options)
    return work.to(out_dtype)


def delta_into(update: Update, shape, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """linalg.delta.delta_weight in the base tensor's `shape`: a SlicedUpdate's ΔW in its slice, zeros
    elsewhere."""
    slot = getattr(update, "slot", None)
    if slot is None:
        return delta_weight(update, shape, dtype=dtype)
    delta = torch.zeros(shape, dtype=dtype)
    slot.view(delta).copy_(delta_weight(update, slot.shape, dtype=dtype))
    return delta


def dora_delta(bound, key: str, W: torch.Tensor | None = None, device: str = "cpu") -> torch.Tensor:
    """DoRA's effective update W' − W of module `key` of `bound` (a BoundAdapter), float64, (out, in).

    `W` is the base tensor in its stored layout (read from the base when not given). W' is the merge
    kernel's in float64 (`linalg.delta.merge_weight`: PEFT's DoRA, its norm per output feature)."""
    module = bound.modules[key]
    if W is None:
        W = bound.read_base(key, device)
    W = W.to(device=device, dtype=torch.float64)
    update = kernel_update(bound.adapter, module.lora, device=device)
    merged = merge_weight(
        W.clone(), [update], out_dtype=torch.float64, precise=True, device=device, name=module.tensor
    )
    return from_stored(module.lora, merged - W)
