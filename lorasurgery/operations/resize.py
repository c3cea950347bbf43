"""`resize`: re-rank a PEFT LoRA adapter in factored form, never forming the d × k update.

Per module ΔW = s·B@A has its SVD exactly from QR factors (`linalg.lowrank.lowrank_svd`): O((d+k)·r²).
The optimal rank-k update (Eckart–Young) is then B' = U_k Σ_k^½, A' = Σ_k^½ V_kᵀ (balanced), written
with lora_alpha = r so that every scale is exactly 1. A DoRA module's true update depends on the base
(W' = m/‖W + sBA‖ ⊙ (W + sBA)): with `--base` it is computed densely from the base weight and the
result is a plain LoRA of W' − W (the DoRA → LoRA conversion); without a base it is refused.

The library API used by `resize`, `combine` and `export` (see docs/resize.md, "Semantics"):
- `module_svd(adapter, module, base=None)`: the exact SVD of one module's ΔW, in PEFT's factor layout
  (B@A: (out, in) for Linear and Conv1D alike, (dim, vocab) for an embedding, (out, in·∏kernel) for a conv);
- `truncated_factors(svd, k, dtype)`: balanced rank-k factors cast to `dtype` and the relative error of
  what is written, measured after the cast.
"""

from __future__ import annotations

import os
import time

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import decided_fan_in_fan_out
from lorasurgery.concurrency import torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import (
    AdapterError,
    LoraSurgeryError,
    NonFiniteError,
    OptionError,
    UnsupportedError,
)
from lorasurgery.io import check_output_path
from lorasurgery.io.safetensors_format import output_dtype
from lorasurgery.operations.extract_plan import natural_key
from lorasurgery.operations.surgery import (
    SurgeryReport,
    adapter_config,
    build_output,
    choose_ranks,
    preload,
    write_output,
)
from lorasurgery.progress import Progress, no_progress


def as_adapter(adapter):
    """An Adapter, loaded from a path when given one."""
    from lorasurgery.adapter import Adapter, load_adapter

    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def as_checkpoint(base):
    """A Checkpoint, opened from a path when given one."""
    from lorasurgery.io import open_checkpoint
    from lorasurgery.io.checkpoint import Checkpoint

    if base is None or isinstance(base, Checkpoint):
        return base
    return open_checkpoint(base)


def _parts(adapter, module: str):
    """(the Adapter, module `module`'s LoraModule, the BoundAdapter or None) of an Adapter, a path or
    a BoundAdapter (lorasurgery.binding: the module laid out as its base stores it)."""
    from lorasurgery.binding import BoundAdapter

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
    import torch

    from lorasurgery.binding import bind
    from lorasurgery.linalg.lowrank import LowRankSVD, lowrank_svd
    from lorasurgery.linalg.update import dora_delta, factors

    raw, lora, bound = _parts(adapter, module)
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
    from lorasurgery.linalg.lowrank import balanced_factors, factors_error

    k = max(0, min(int(k), len(svd.S)))
    A, B = balanced_factors(svd, k)  # (k, in), (out, k) in the SVD's dtype
    A, B = A.to(dtype), B.to(dtype)
    return A, B, factors_error(svd, A, B)


# ------------------------------------------------------------------------------------------ resize


def module_update(adapter, module: str, base, device: str, dtype: str):
    """A surgery.ModuleUpdate of one module: its exact SVD, its lora_B bias at scale 1, its layout.

    `adapter`: an Adapter, or a BoundAdapter when there is a base (its layouts and DoRA's W)."""
    import torch

    from lorasurgery.io.safetensors_format import output_dtype, torch_dtype_of
    from lorasurgery.linalg.lowrank import LowRankSVD
    from lorasurgery.operations.surgery import ModuleUpdate, check_finite

    source = adapter
    adapter, lora, _ = _parts(source, module)
    where = str(adapter.weights_file)
    check_factors_finite(source, module)
    svd = module_svd(source, module, base, device)
    svd = LowRankSVD(U=svd.U.cpu(), S=svd.S.cpu(), Vh=svd.Vh.cpu())
    bias = adapter.read_lora_bias(lora)
    if bias is not None:
        bias = bias.to(torch.float64) * lora.scale  # the written scale is 1
    a_info = adapter.tensors[lora.a_key]
    update = ModuleUpdate(
        name=module,
        kind=lora.kind,
        shape=tuple(lora.shape),
        kernel=tuple(a_info.shape[1:]) if lora.kind == "conv" else (),
        rank_in=lora.r,
        out_dtype=output_dtype(dtype, torch_dtype_of(a_info.dtype)),
        svd=svd,
        bias=bias,
        sources=[str(adapter.path)],
    )
    check_finite(update, where)
    return update


def check_factors_finite(adapter, module: str) -> None:
    import torch

    adapter, lora, _ = _parts(adapter, module)
    for label, key in (
        ("lora_A", lora.a_key),
        ("lora_B", lora.b_key),
        ("lora_B.bias", lora.bias_key),
        ("lora_magnitude_vector", lora.magnitude_key),
    ):
        if key and not bool(torch.isfinite(adapter.read(key)).all()):
            raise NonFiniteError(f"{adapter.weights_file}: module {module}: {label} holds NaN/Inf")


def lora_keys(adapter) -> set[str]:
    """Every tensor key that belongs to a LoRA module (factors, lora_B bias, DoRA magnitude)."""
    return {
        key
        for m in adapter.modules.values()
        for key in (m.a_key, m.b_key, m.bias_key, m.magnitude_key)
        if key
    }


def check_dora_base(adapter, base) -> None:
    dora = [m for m, module in adapter.modules.items() if module.dora]
    if dora and base is None:
        raise UnsupportedError(
            f"{adapter.path}: module {dora[0]} is DoRA ({len(dora)} modules): its update "
            f"m/‖W + sBA‖·(W + sBA) − W depends on the base weights; DoRA needs --base BASE"
        )


def bind_base(adapters, checkpoint) -> list:
    """With a base: the adapters bound to it (lorasurgery.binding; every module found with the shape
    it expects, MismatchError otherwise, and laid out as the base's structure says); else the adapters."""
    from lorasurgery.binding import bind

    return bind(adapters, checkpoint, config_option=False) if checkpoint is not None else list(adapters)


def assumption_notes(sources) -> list[str]:
    """The notes naming every layout a binding assumed (binding.Assumption)."""
    from lorasurgery.binding import BoundAdapter

    bound = [s for s in sources if isinstance(s, BoundAdapter)]
    return [a.message() for s in bound for a in s.assumptions]


def adapter_of(source):
    """The Adapter of an Adapter or a BoundAdapter."""
    from lorasurgery.binding import BoundAdapter

    return source.adapter if isinstance(source, BoundAdapter) else source


def loras_of(source) -> dict:
    """{key: LoraModule} of an Adapter, or of a BoundAdapter (laid out on its base)."""
    from lorasurgery.binding import BoundAdapter

    return source.loras if isinstance(source, BoundAdapter) else source.modules


def resize_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    policy,
    max_rank: int | None = None,
    base: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    force: bool = False,
    progress=None,
):
    """Write `adapter` re-ranked under `policy` to `out` (α = r per module); return a SurgeryReport."""
    started = time.perf_counter()
    progress = progress or no_progress
    policy.validate()
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}")
    output_dtype(dtype, None)  # refuse a bad --dtype before any work
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_path(out, inputs, force)
    loaded = load_adapter(adapter)
    if not loaded.modules:
        raise AdapterError(f"{adapter}: the adapter holds no LoRA modules; nothing to resize")
    preload(loaded)
    check_dora_base(loaded, base)
    (source,) = bind_base([loaded], as_checkpoint(base))
    modules = loras_of(source)
    device = resolve_device(device)

    # small per-module kernels: one torch thread (lorasurgery.concurrency.torch_threads)
    with torch_threads(1 if device == "cpu" else None):
        names = sorted(modules, key=natural_key)
        updates = []
        for i, name in enumerate(names):
            updates.append(module_update(source, name, None, device, dtype))
            progress(Progress("resize", i + 1, len(names), name))
        keys = lora_keys(loaded)
        saved = {key: loaded.read(key) for key in loaded.tensors if key not in keys}
        ranks = choose_ranks(updates, policy, max_rank, saved)
        report = SurgeryReport("resize", [str(adapter)], str(out), policy.describe())
        output = build_output(updates, ranks, report)
    if not output.module_ranks:
        raise LoraSurgeryError(
            f"{adapter}: every module has rank 0 under {policy.describe()}; nothing to write"
        )
    dora = [u.name for u in updates if modules[u.name].dora]
    report.notes += assumption_notes([source])
    if dora:
        report.notes.append(
            f"{len(dora)} DoRA modules became plain LoRA of their effective update W' − W on {base}; "
            f"the result belongs to that base"
        )
    # the flag is PEFT's hint: say the truth when the base decided it
    fan_in_fan_out = decided_fan_in_fan_out([source]) if base is not None else None
    overrides = {} if fan_in_fan_out is None else {"fan_in_fan_out": fan_in_fan_out}
    config = adapter_config(loaded.config.raw, output.module_ranks, output.lora_bias, **overrides)
    return write_output(report, out, inputs, force, output, saved, config, started)
