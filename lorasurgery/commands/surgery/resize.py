"""`resize`: re-rank a PEFT LoRA adapter in factored form, never forming the d × k update.

Per module ΔW = s·B@A has its SVD exactly from QR factors (`linalg.lowrank.lowrank_svd`): O((d+k)·r²).
The optimal rank-k update (Eckart–Young) is then B' = U_k Σ_k^½, A' = Σ_k^½ V_kᵀ (balanced), written
with lora_alpha = r so that every scale is exactly 1. A DoRA module's true update depends on the base
(W' = m/‖W + sBA‖ ⊙ (W + sBA)): with `--base` it is computed densely from the base weight and the
result is a plain LoRA of W' − W (the DoRA → LoRA conversion); without a base it is refused.

The module-level library API it shares with `combine` and `export` (`module_svd`, `truncated_factors` …)
is lorasurgery.factored.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import decided_fan_in_fan_out
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
from lorasurgery.errors import (
    AdapterError,
    LoraSurgeryError,
)
from lorasurgery.factored import (
    as_checkpoint,
    assumption_notes,
    bind_base,
    check_dora_base,
    check_factors_finite,
    loras_of,
    module_svd,
    module_tensor_keys,
    parts,
)
from lorasurgery.io.safetensors_format import output_dtype, torch_dtype_of
from lorasurgery.linalg.lowrank import LowRankSVD
from lorasurgery.linalg.policies import Policy
from lorasurgery.naming import natural_key
from lorasurgery.progress import Progress, ProgressCallback, no_progress

# ------------------------------------------------------------------------------------------ resize


def module_update(adapter, module: str, base, device: str, dtype: str):
    """A surgery.ModuleUpdate of one module: its exact SVD, its lora_B bias at scale 1, its layout.

    `adapter`: an Adapter, or a BoundAdapter when there is a base (its layouts and DoRA's W)."""
    source = adapter
    adapter, lora, _ = parts(source, module)
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


@dataclass(frozen=True)
class ResizeRequest:
    """What `resize` is asked: the adapter, the output, the rank policy and every option (the CLI's)."""

    adapter: str | os.PathLike
    out: str | os.PathLike
    policy: Policy
    max_rank: int | None = None
    base: str | os.PathLike | None = None  # needed for DoRA; lays modules out as the base stores them
    dtype: str = "auto"
    device: str = "cpu"
    force: bool = False


def resize_adapter(request: ResizeRequest, progress: ProgressCallback | None = None):
    """Write `request.adapter` re-ranked under its policy to `request.out` (α = r per module); return
    a SurgeryReport."""
    adapter, out, policy, max_rank = request.adapter, request.out, request.policy, request.max_rank
    base, dtype, force = request.base, request.dtype, request.force
    started = time.perf_counter()
    progress = progress or no_progress
    policy.validate()
    inputs = [adapter] + ([base] if base is not None else [])
    check_output_options(max_rank, dtype, out, inputs, force)
    loaded = load_adapter(adapter)
    if not loaded.modules:
        raise AdapterError(f"{adapter}: the adapter holds no LoRA modules; nothing to resize")
    preload(loaded)
    check_dora_base(loaded, base)
    (source,) = bind_base([loaded], as_checkpoint(base))
    modules = loras_of(source)
    device = resolve_device(request.device)

    # small per-module kernels: one torch thread (lorasurgery.concurrency.torch_threads)
    with torch_threads(1 if device == "cpu" else None):
        names = sorted(modules, key=natural_key)
        updates = []
        for i, name in enumerate(names):
            updates.append(module_update(source, name, None, device, dtype))
            progress(Progress("resize", i + 1, len(names), name))
        keys = module_tensor_keys(loaded)
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
    config = rewritten_adapter_config(loaded.config.raw, output.module_ranks, output.lora_bias, **overrides)
    return write_output(report, out, inputs, force, output, saved, config, started)
