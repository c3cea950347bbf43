"""What `resize` and `combine` share once each module's update is known in factored form.

Each operation turns every module into a `ModuleUpdate`: the exact SVD of its ΔW (float64, PEFT's
factor layout) or, for `combine --exact`, the concatenated factors themselves. From there:
- `choose_ranks`: one rank per module under the policy (per module, or jointly for --budget);
- `build_output`: the written factors (cast, with the error of what is written), lora_B biases,
  saved tensors, and an adapter_config.json with α = r per module (adapter.writer);
- `write_output`: the folder, atomically, and the totals of the `SurgeryReport`, the table / JSON
  report (see docs/resize.md, docs/combine.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from lorasurgery.adapter.model import PEFT_PREFIX, lora_keys
from lorasurgery.adapter.writer import check_module_keys, lora_rank_fields, write_adapter_folder
from lorasurgery.errors import LoraSurgeryError, NonFiniteError, OptionError
from lorasurgery.factored import truncated_factors
from lorasurgery.io import atomic_output_dir, check_output_path
from lorasurgery.io.checkpoint import read_range
from lorasurgery.io.output import write_text_atomically
from lorasurgery.io.safetensors_format import byte_size, dtype_code_of, output_dtype, torch_dtype_of
from lorasurgery.linalg.gram import numerical_rank_tolerance
from lorasurgery.linalg.lowrank import factors_error, lowrank_svd
from lorasurgery.linalg.policies import allocate_budget
from lorasurgery.naming import natural_key


@dataclass
class ModuleUpdate:
    """One output module before its rank is chosen. ΔW (d, n) in PEFT's factor layout: B@A."""

    name: str
    kind: str  # linear | embedding | conv
    shape: tuple[int, ...]  # the base weight's stored shape (as `inspect` shows it)
    kernel: tuple[int, ...]  # a conv's lora_A trailing dims (in, *kernel); () otherwise
    rank_in: int  # the rank of what came in (Σ rᵢ for combine)
    out_dtype: object  # torch dtype of the written factors
    svd: object = None  # LowRankSVD of ΔW (float64)
    exact: tuple | None = None  # (A, B) written as they are (combine --exact), float64
    bias: object = None  # lora_B.bias at scale 1 (float64), or None
    sources: list[str] = field(default_factory=list)  # adapters that contribute

    @property
    def dims(self) -> tuple[int, int]:
        """(d, n) of ΔW = B@A."""
        if self.svd is not None:
            return self.svd.U.shape[0], self.svd.Vh.shape[1]
        A, B = self.exact
        return B.shape[0], A.shape[1]

    @property
    def fro_sq(self) -> float:
        return float(self.svd.S.double().square().sum()) if self.svd is not None else 0.0


@dataclass
class SurgeryModule:
    name: str
    kind: str
    shape: list[int]
    original_rank: int
    rank: int
    retained_energy: float  # 1 − ‖ΔW − B'A'‖²/‖ΔW‖², of the written (cast) factors
    relative_error: float  # ‖ΔW − B'A'‖_F/‖ΔW‖_F, of the written (cast) factors
    params: int


@dataclass
class DroppedModule:
    name: str
    reason: str
    fro_norm: float  # ‖ΔW‖_F of what was left out


@dataclass
class SurgeryReport:
    command: str  # resize | combine
    inputs: list[str]
    output: str
    policy: str
    weights: list[float] = field(default_factory=list)
    modules: list[SurgeryModule] = field(default_factory=list)
    skipped: list[DroppedModule] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # tensors copied unchanged
    totals: dict = field(default_factory=dict)  # params, bytes, relative_error
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        result = {
            "inputs": self.inputs,
            "output": self.output,
            "policy": self.policy,
            "modules": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "shape": m.shape,
                    "original_rank": m.original_rank,
                    "rank": m.rank,
                    "retained_energy": m.retained_energy,
                    "relative_error": m.relative_error,
                }
                for m in self.modules
            ],
            "skipped": [{"name": s.name, "reason": s.reason, "fro_norm": s.fro_norm} for s in self.skipped],
            "saved": self.saved,
            "totals": self.totals,
            "notes": self.notes,
        }
        if self.command == "combine":
            result["weights"] = self.weights
        return result


def check_output_options(max_rank: int | None, dtype: str, out, inputs: list, force: bool) -> None:
    """--max-rank, --dtype and the output path of resize and combine, refused before any work."""
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}")
    output_dtype(dtype, None)
    check_output_path(out, inputs, force)


def check_finite(update: ModuleUpdate, where: str) -> None:

    values = [update.svd.S] if update.svd is not None else list(update.exact)
    if update.bias is not None:
        values.append(update.bias)
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise NonFiniteError(f"{where}: module {update.name}: NaN/Inf in its update")


def _floor(update: ModuleUpdate) -> float:
    """σ at or below σ₁·max(d, n)·eps(float64) are rounding of the float64 arithmetic, not signal."""
    S = update.svd.S
    return float(S[0]) * numerical_rank_tolerance(update.dims, torch.float64) if len(S) else 0.0


def choose_ranks(updates: list[ModuleUpdate], policy, max_rank: int | None, saved: dict) -> dict[str, int]:
    """{module: rank} under `policy`; a --budget counts the `saved` tensors (copied unchanged) and the
    lora_B biases first, and the factors spend the rest."""
    ranks = {}
    if policy.budget is None:
        for u in updates:
            d, n = u.dims
            S = u.svd.S.double().cpu()
            if policy.auto and len(S) < min(d, n):  # a rank-r product's other σ are exactly 0
                S = torch.cat([S, S.new_zeros(min(d, n) - len(S))])
            ranks[u.name] = policy.module_rank(S, (d, n), floor=_floor(u), max_rank=max_rank)
        return ranks
    fixed = sum(t.numel() for t in saved.values()) + sum(
        u.bias.numel() for u in updates if u.bias is not None
    )
    if fixed > policy.budget:
        raise LoraSurgeryError(
            f"--budget {policy.budget:,}: the tensors copied unchanged and the lora_B biases alone take "
            f"{fixed:,} parameters"
        )
    spectra = []
    for u in updates:
        S = u.svd.S.double().cpu()
        spectra.append((S[S > _floor(u)], *u.dims))
    chosen = allocate_budget(spectra, policy.budget - fixed, max_rank=max_rank)
    return {u.name: k for u, k in zip(updates, chosen)}


@dataclass
class Output:
    tensors: dict
    module_ranks: dict[str, int]
    lora_bias: bool


def build_output(updates: list[ModuleUpdate], ranks: dict[str, int] | None, report: SurgeryReport) -> Output:
    """Factors (cast) per module at its rank (None: --exact, the concatenation as it is); fills the report."""
    tensors: dict = {}
    module_ranks: dict[str, int] = {}
    err_sq = total_sq = 0.0
    any_bias = any(u.bias is not None for u in updates)
    embedding = next((u for u in updates if u.kind == "embedding"), None)
    if any_bias and embedding is not None:
        with_bias = next(u for u in updates if u.bias is not None)
        raise LoraSurgeryError(
            f"module {with_bias.name} has a lora_B bias (from {', '.join(with_bias.sources)}) and module "
            f"{embedding.name} an embedding LoRA (from {', '.join(embedding.sources)}): PEFT's lora_bias is "
            f"one flag for the whole adapter and it refuses it on embeddings, so no PEFT adapter can hold both"
        )
    for u in updates:
        if ranks is None:
            A, B = (t.to(u.out_dtype) for t in u.exact)
            svd = lowrank_svd(*u.exact)  # only to measure what the cast lost
            u_sq = float(svd.S.square().sum())
            error = factors_error(svd, A, B)
            k = A.shape[0]
        else:
            k = ranks[u.name]
            u_sq = u.fro_sq
            if k == 0 and u.bias is not None and bool(u.bias.any()):
                k = 1  # keep the module: its lora_B bias is part of the update
                report.notes.append(f"{u.name}: rank 1 kept (the policy kept none) to carry its lora_B bias")
            if k == 0:
                reason = "ΔW = 0" if u_sq == 0 else f"rank 0 under {report.policy}"
                report.skipped.append(DroppedModule(u.name, reason, math.sqrt(u_sq)))
                err_sq += u_sq
                total_sq += u_sq
                continue
            A, B, error = truncated_factors(u.svd, k, u.out_dtype)
        err_sq += error**2 * u_sq
        total_sq += u_sq
        keys = lora_keys(u.name, u.kind)
        if u.kind == "conv":
            A = A.reshape(k, *u.kernel)  # (k, in, *kernel)
            B = B.reshape(B.shape[0], k, *([1] * (len(u.kernel) - 1)))  # (out, k, 1, …)
        tensors[keys.A], tensors[keys.B] = A.contiguous(), B.contiguous()
        if u.kind != "embedding" and any_bias:
            # PEFT's lora_bias is global: every LoRA Linear has one (zeros where none came in)
            bias = u.bias if u.bias is not None else torch.zeros(B.shape[0], dtype=torch.float64)
            tensors[keys.bias] = bias.to(u.out_dtype)
        module_ranks[u.name] = k
        report.modules.append(
            SurgeryModule(
                name=u.name,
                kind=u.kind,
                shape=list(u.shape),
                original_rank=u.rank_in,
                rank=k,
                retained_energy=max(0.0, 1.0 - error**2),
                relative_error=error,
                params=A.numel() + B.numel(),
            )
        )
    report.totals["relative_error"] = math.sqrt(err_sq / total_sq) if total_sq else 0.0
    return Output(tensors, module_ranks, any_bias)


def rewritten_adapter_config(raw: dict, module_ranks: dict[str, int], lora_bias: bool, **overrides) -> dict:
    """The input's adapter_config.json with every LoRA field rewritten for α = r per module."""
    config = {k: v for k, v in raw.items() if k not in ("rank_pattern", "alpha_pattern")}
    config.update(lora_rank_fields(module_ranks, natural_key))
    check_module_keys(module_ranks, config.get("modules_to_save") or [], set(module_ranks))
    config["lora_bias"] = lora_bias
    config["inference_mode"] = True
    config.update(overrides)
    return config


def write_output(
    report: SurgeryReport,
    out,
    inputs: list,
    force: bool,
    output: Output,
    saved: dict,
    config: dict,
    started: float,
) -> SurgeryReport:
    """The adapter folder (factors + the saved tensors) to `out`, atomically; the report's totals."""
    tensors = {**output.tensors, **saved}
    report.saved = [key.removeprefix(PEFT_PREFIX) for key in saved]
    report.totals["params"] = sum(t.numel() for t in tensors.values())
    report.totals["bytes"] = sum(byte_size(dtype_code_of(t.dtype), tuple(t.shape)) for t in tensors.values())
    report.totals = {k: report.totals[k] for k in ("params", "bytes", "relative_error")}
    with atomic_output_dir(out, inputs=inputs, force=force) as folder:
        write_adapter_folder(folder, tensors, config)
    report.seconds = time.perf_counter() - started
    return report


def write_surgery_report(report: SurgeryReport, path: str | os.PathLike) -> None:
    """The JSON report to `path`, atomically."""
    write_text_atomically(path, json.dumps(report.to_json(), indent=2) + "\n")


class PreloadedCheckpoint:
    """A safetensors Checkpoint read in one sequential pass, serving `read` from memory.

    An adapter is small (its factors, a few saved tensors), and surgery reads every tensor, some
    twice (the NaN/Inf check, then the factors); the streaming reader opens the file and drops the
    page cache per tensor, which made reading dominate a 210-module combine. Anything else (pickle
    files, shards) is delegated to the checkpoint itself.
    """

    def __init__(self, checkpoint):

        self._checkpoint = checkpoint
        self._buffer = None
        infos = list(checkpoint.tensors.values())
        if len(checkpoint.files) != 1 or not infos or any(i.start < 0 for i in infos):
            return
        self._start = min(i.start for i in infos)
        end = max(i.start + i.nbytes for i in infos)
        self._buffer = torch.empty(end - self._start, dtype=torch.uint8)
        read_range(checkpoint.files[0], self._start, self._buffer.numpy())

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def read(self, name: str, device: str = "cpu"):
        """Tensor `name` in its stored dtype, in memory of its own."""

        info = self._checkpoint.tensors.get(name)
        if self._buffer is None or info is None:
            return self._checkpoint.read(name, device)
        offset = info.start - self._start
        raw = self._buffer[offset : offset + info.nbytes].clone()  # aligned, and its own memory
        tensor = raw.view(torch_dtype_of(info.dtype)).reshape(info.shape)
        return tensor if device == "cpu" else tensor.to(device)


def preload(adapter):
    """`adapter` with its weights read in one pass (PreloadedCheckpoint); returns it."""
    if not isinstance(adapter.checkpoint, PreloadedCheckpoint):
        adapter.checkpoint = PreloadedCheckpoint(adapter.checkpoint)
    return adapter
