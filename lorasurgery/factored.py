"""One module's update in factored form, from an adapter (bound to its base or not): the library API
that `resize`, `combine` and `export` share (docs/resize.md, "Semantics"), below every command so
that none imports another.

- `module_svd(adapter, module, base=None)`: the exact SVD of one module's ΔW, in PEFT's factor layout
  (B@A: (out, in) for Linear and Conv1D alike, (dim, vocab) for an embedding, (out, in·∏kernel) for a conv);
- `truncated_factors(svd, k, dtype)`: balanced rank-k factors cast to `dtype` and the relative error of
  what is written, measured after the cast;
- `adapter_of`, `loras_of`, `bind_base`, `assumption_notes`: an Adapter or a BoundAdapter
  (lorasurgery.binding) seen the same way.
"""

from __future__ import annotations

import torch

from lorasurgery.adapter import Adapter, load_adapter
from lorasurgery.binding import BoundAdapter, bind
from lorasurgery.errors import NonFiniteError, UnsupportedError
from lorasurgery.io import open_checkpoint
from lorasurgery.io.checkpoint import Checkpoint
from lorasurgery.linalg.lowrank import LowRankSVD, balanced_factors, factors_error, lowrank_svd
from lorasurgery.linalg.update import dora_delta, factors


def as_adapter(adapter):
    """An Adapter, loaded from a path when given one."""
    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def as_checkpoint(base):
    """A Checkpoint, opened from a path when given one."""
    if base is None or isinstance(base, Checkpoint):
        return base
    return open_checkpoint(base)


def parts(adapter, module: str):
    """(the Adapter, module `module`'s LoraModule, the BoundAdapter or None) of an Adapter, a path or
    a BoundAdapter (lorasurgery.binding: the module laid out as its base stores it)."""
    if isinstance(adapter, BoundAdapter):
        return adapter.adapter, adapter.modules[module].lora, adapter
    adapter = as_adapter(adapter)
    return adapter, adapter.modules[module], None


def module_svd(adapter, module: str, base=None, device: str = "cpu"):
    """The exact SVD (float64) of `module`'s true ΔW in PEFT's factor layout, as a LowRankSVD.

    Plain LoRA: of s·B@A from QR factors (r singular values, never forming d × k). DoRA: of the
    effective update W' − W computed densely from the base: `adapter` bound to it (a BoundAdapter),
    or `base` (a Checkpoint or a path; min(d, k) values).
    """
    raw, lora, bound = parts(adapter, module)
    if lora.dora:
        if bound is None and base is None:
            raise UnsupportedError(
                f"{raw.path}: module {module} is DoRA: its update depends on the base weight; "
                f"DoRA needs --base"
            )
        if bound is None:
            (bound,) = bind([raw], as_checkpoint(base), config_option=False)
        U, S, Vh = torch.linalg.svd(dora_delta(bound, module, device=device), full_matrices=False)
        return LowRankSVD(U=U, S=S, Vh=Vh)
    f = factors(raw, lora, device)
    return lowrank_svd(f.A, f.B, f.scale)


def truncated_factors(svd, k: int, dtype) -> tuple[object, object, float]:
    """(A (k, in), B (out, k), relative error): balanced rank-k factors of `svd` cast to `dtype`.

    The error ‖ΔW − B̃Ã‖_F/‖ΔW‖_F is of the cast factors B̃, Ã against ΔW = U Σ Vᵀ, computed exactly
    in float64 without forming d × k (`linalg.lowrank.factors_error`): it is Eckart–Young's
    √(Σ_{i>k}σᵢ²/Σσᵢ²) plus whatever the cast adds, measured, not assumed.
    """
    k = max(0, min(int(k), len(svd.S)))
    A, B = balanced_factors(svd, k)  # (k, in), (out, k) in the SVD's dtype
    A, B = A.to(dtype), B.to(dtype)
    return A, B, factors_error(svd, A, B)


def check_factors_finite(adapter, module: str) -> None:
    """NonFiniteError naming the adapter file and module when a stored factor holds NaN/Inf."""
    adapter, lora, _ = parts(adapter, module)
    for label, key in (
        ("lora_A", lora.a_key),
        ("lora_B", lora.b_key),
        ("lora_B.bias", lora.bias_key),
        ("lora_magnitude_vector", lora.magnitude_key),
    ):
        if key and not bool(torch.isfinite(adapter.read(key)).all()):
            raise NonFiniteError(f"{adapter.weights_file}: module {module}: {label} holds NaN/Inf")


def module_tensor_keys(adapter) -> set[str]:
    """Every tensor key that belongs to a LoRA module (factors, lora_B bias, DoRA magnitude)."""
    return {
        key
        for m in adapter.modules.values()
        for key in (m.a_key, m.b_key, m.bias_key, m.magnitude_key)
        if key
    }


def check_dora_base(adapter, base) -> None:
    """UnsupportedError when a DoRA module has no base: its update depends on the base weights."""
    dora = [m for m, module in adapter.modules.items() if module.dora]
    if dora and base is None:
        raise UnsupportedError(
            f"{adapter.path}: module {dora[0]} is DoRA ({len(dora)} modules): its update "
            f"m/‖W + sBA‖·(W + sBA) − W depends on the base weights; DoRA needs --base BASE"
        )


def bind_base(adapters, checkpoint) -> list:
    """With a base: the adapters bound to it (lorasurgery.binding; every module found with the shape
    it expects, MismatchError otherwise, and laid out as the base's structure says); else the adapters."""
    return bind(adapters, checkpoint, config_option=False) if checkpoint is not None else list(adapters)


def assumption_notes(sources) -> list[str]:
    """The notes naming every layout a binding assumed (binding.Assumption)."""
    bound = [s for s in sources if isinstance(s, BoundAdapter)]
    return [a.message() for s in bound for a in s.assumptions]


def adapter_of(source):
    """The Adapter of an Adapter or a BoundAdapter."""
    return source.adapter if isinstance(source, BoundAdapter) else source


def loras_of(source) -> dict:
    """{key: LoraModule} of an Adapter, or of a BoundAdapter (laid out on its base)."""
    return source.loras if isinstance(source, BoundAdapter) else source.modules
