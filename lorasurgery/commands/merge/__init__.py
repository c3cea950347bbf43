"""`merge`: fold one or more PEFT LoRA adapters into a base checkpoint, one tensor at a time.

W' = W + Σᵢ wᵢ·ΔWᵢ for every targeted weight (kernels: linalg/delta.py), saved tensors
(modules_to_save, `bias="all"`, saved base layers) replace the base's, every other tensor is copied
byte for byte. The package is split by concern:

    plan.py    every output tensor's recipe, resolved and checked before the output folder exists
               (layouts from lorasurgery.binding; recipes and the tie rule from lorasurgery.recipes)
    write.py   the plan executed through lorasurgery.concurrency's pipeline into the shard writer
    verify.py  --verify: PEFT's adapted model against the merged one, on the same tokens

The output is written into a temporary folder that becomes OUT only when complete (and, with verify,
only when the merged model matches base + adapters). A journal there records each finished shard, so
that --resume can reuse them after a kill (lorasurgery.io.journal, docs/design.md §7). The semantics
are in docs/merge.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorasurgery.commands.merge.plan import (
    AdapterSummary,
    Item,
    MergePlan,
    PlanOptions,
    check_options,
    check_requantize_options,
    plan_merge,
    unquantize,
)
from lorasurgery.commands.merge.verify import require_verification_libraries, verify_merge
from lorasurgery.commands.merge.write import measure_retention, write_all, write_side_files
from lorasurgery.concurrency import torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import LoraSurgeryError
from lorasurgery.io import SafetensorsWriter, atomic_output_dir, check_output_path, plan_shards
from lorasurgery.io.journal import Journal, resume_work, run_identity
from lorasurgery.io.quantization import declares_unreadable_quantization
from lorasurgery.io.writer import shard_layouts
from lorasurgery.memory import tune_allocator
from lorasurgery.model import prefetch, read_config
from lorasurgery.progress import ProgressCallback, no_progress

__all__ = [
    "AdapterSummary",
    "Item",
    "MergePlan",
    "MergeRequest",
    "MergeSummary",
    "merge_checkpoint",
    "plan_merge",
    "verify_merge",
]


@dataclass
class MergeSummary:
    """What a merge did; `--json` prints `to_dict()`."""

    base: str
    output: str
    adapters: list[AdapterSummary]
    tensors: int = 0  # tensors in the output
    tensors_merged: int = 0  # W + ΣΔW computed
    tensors_replaced: int = 0  # taken from an adapter (modules_to_save, saved biases, base layers)
    tensors_copied: int = 0  # byte-identical copies of the base
    tensors_converted: int = 0  # untouched but cast to the output dtype
    bytes_written: int = 0
    shards_reused: int = 0  # --resume: complete shards of an interrupted run kept, not recomputed
    files: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "cpu"
    precise: bool = False
    subtract: bool = False
    config_changes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. the tied-embeddings note
    # layouts that rest on an adapter's fan_in_fan_out, not on the base (binding.Assumption)
    assumptions: list = field(default_factory=list)
    verified: bool = False
    max_logit_difference: float | None = None
    # --requantize (docs/design.md §13): per merged quantized tensor its retention, codes changed, how written
    requantize: bool = False
    min_retention: float | None = None
    tensors_requantized: int = 0
    retention: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        result = asdict(self)
        result["assumptions"] = [a.to_dict() for a in self.assumptions]
        return result


@dataclass(frozen=True)
class MergeRequest:
    """What `merge` is asked: the base, the adapters, the output and every option (the CLI's).

    `config_file` describes the base's structure when it has no config.json (or overrides it);
    `fan_in_fan_out` (a regex on module names) says which layers store (in, out) when nothing else can.
    `requantize` keeps a quantized base's format; `min_retention` writes the modules whose retention
    falls below it unquantized (docs/design.md §13). `resume` continues the unfinished output of a
    killed run with the same inputs and options, and keeps this run's unfinished output if it fails."""

    base: str | os.PathLike
    adapters: Sequence[str | os.PathLike]
    out: str | os.PathLike
    weights: Sequence[float] | None = None
    subtract: bool = False
    dtype: str = "auto"
    max_shard_bytes: int | None = None
    device: str = "cpu"
    precise: bool = False
    force: bool = False
    allow_nonfinite: bool = False
    verify: bool = False
    config_file: str | os.PathLike | None = None
    fan_in_fan_out: str | None = None
    resume: bool = False
    requantize: bool = False
    min_retention: float | None = None

    def plan_options(self) -> PlanOptions:
        """The options that decide the plan (plan.plan_merge)."""
        return PlanOptions(
            self.subtract,
            self.dtype,
            self.allow_nonfinite,
            self.config_file,
            self.fan_in_fan_out,
            self.requantize,
        )

    def identity_options(self) -> dict:
        """The options that identify a resumable run: every field unless it cannot change the output
        bytes, so that an option added later counts by default and changing it refuses a resume
        rather than mix two runs."""
        return {
            _OPTION_NAMES.get(f.name, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name not in _NOT_IDENTITY
        }


# MergeRequest's fields that do not decide the output bytes (the rest identify a resumable run)
_NOT_IDENTITY = {"base", "adapters", "out", "force", "verify", "resume"}
_OPTION_NAMES = {"weights": "weight", "max_shard_bytes": "max_shard_size", "config_file": "config"}


def merge_checkpoint(request: MergeRequest, progress: ProgressCallback | None = None) -> MergeSummary:
    """Merge `request.adapters` into the checkpoint `request.base` and write a plain checkpoint to
    `request.out`.

    Raises a LoraSurgeryError (nothing written) for bad input, and VerificationError when `verify`
    finds the merged model's logits differ from base+adapters beyond the dtype's tolerance.
    """
    started = time.perf_counter()
    progress = progress or no_progress
    _prefetch_structure(request)
    tune_allocator()
    adapters, weights, device, options = _checked(request)
    with torch_threads(1):  # isfinite on many small adapter tensors: no OpenMP spin-up each time
        plan = plan_merge(Path(request.base), adapters, weights, request.plan_options())
    if request.min_retention is not None:  # which modules stay quantized fixes the layout: measured first
        measured = measure_retention(plan, device, request.precise, request.allow_nonfinite, progress)
        unquantize(
            plan,
            [
                n
                for n, r in measured.items()
                if r.retention is not None and r.retention < request.min_retention
            ],
        )
    summary = _summary(request, plan, device)
    _write_output(request, plan, adapters, weights, device, options, summary, progress)
    summary.seconds = time.perf_counter() - started
    return summary


def _prefetch_structure(request: MergeRequest) -> None:
    """Start building the base's skeleton while we start up (a bad --config is reported by the plan)."""
    with contextlib.suppress(LoraSurgeryError):
        config = read_config(request.base, request.config_file)[0]
        if not declares_unreadable_quantization(config):  # such a base is refused at once by the plan
            prefetch(config)


def _checked(request: MergeRequest) -> tuple[list[Path], list[float], str, dict]:
    """The adapters' paths, their effective weights, the resolved device and the run's identifying
    options; an OptionError (or a refused output path) before anything is read."""
    options = request.identity_options()
    adapters = [Path(a) for a in request.adapters]
    weights = check_options(
        adapters, request.weights, request.subtract, request.dtype, request.max_shard_bytes
    )
    check_requantize_options(request.requantize, request.min_retention, request.verify)
    device = options["device"] = resolve_device(request.device)
    if request.config_file:  # as the same file, however it was spelt
        options["config"] = str(Path(request.config_file).resolve())
    check_output_path(request.out, [request.base, *adapters], request.force)  # checked again when writing
    if request.verify:
        require_verification_libraries()
    return adapters, weights, device, options


def _summary(request: MergeRequest, plan: MergePlan, device: str) -> MergeSummary:
    return MergeSummary(
        base=str(request.base),
        output=str(request.out),
        adapters=plan.adapter_summaries,
        dtype=request.dtype,
        device=device,
        precise=request.precise,
        subtract=request.subtract,
        config_changes=plan.config_changes,
        notes=plan.notes,
        assumptions=plan.assumptions,
        requantize=request.requantize,
        min_retention=request.min_retention,
    )


def _write_output(request, plan, adapters, weights, device, options, summary, progress) -> None:
    """The output folder, written atomically (resumed from its journal with --resume), verified
    with --verify; the files, bytes and tensors written counted into `summary`."""
    base, out, config_file = request.base, request.out, request.config_file
    shards = (
        plan_shards(plan.specs, max_shard_bytes=request.max_shard_bytes)
        if request.max_shard_bytes
        else plan_shards(plan.specs, groups=plan.shard_groups())
    )
    layouts = shard_layouts(shards)
    inputs = [base, *adapters, *([config_file] if config_file else [])]
    identity = run_identity(inputs=inputs, options=options, layouts=layouts)
    with atomic_output_dir(
        out, inputs=[base, *adapters], force=request.force, resume=request.resume
    ) as folder:
        journal, complete = _start_journal(folder, identity, layouts, request.resume, Path(out), summary)
        reused = {spec.name for index in complete for spec in shards[index]}
        with (
            torch_threads(1),
            SafetensorsWriter(folder, shards, complete=complete, on_shard=journal.on_shard) as writer,
        ):
            write_all(
                plan, writer, summary, device, request.precise, request.allow_nonfinite, progress, reused
            )
            written = writer.close()
        write_side_files(plan, folder)
        summary.files = [f.name for f in written.files]
        summary.bytes_written = written.bytes
        summary.tensors = written.tensors
        if request.verify:
            summary.max_logit_difference = verify_merge(
                base, adapters, folder, weights=weights, merged_dtype=plan.output_dtype_code
            )
            summary.verified = True
        journal.remove()  # no part of the output


def _start_journal(folder, identity, layouts, resume, out, summary):
    """The run's journal and the shards it can keep: a fresh one, or what --resume found."""
    if not resume:
        journal = Journal(folder, identity)
        journal.save()
        return journal, frozenset()
    found = resume_work(folder, identity, layouts, out=out)
    summary.shards_reused = len(found.complete)
    total = len(layouts)
    if not found.found:
        summary.notes.append("--resume: no unfinished merge of this output was found; merged from the start")
    else:
        summary.notes.append(
            f"--resume: {len(found.complete)} of {total} shards reused from the unfinished merge "
            f"(each checked by size and digest), {total - len(found.complete)} written now"
        )
    for name in found.rejected:
        summary.notes.append(f"--resume: {name} failed its size or digest check and was written again")
    return found.journal, found.complete
