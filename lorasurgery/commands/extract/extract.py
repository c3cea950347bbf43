"""`extract`: a PEFT LoRA adapter from a full fine-tune, by truncated SVD of ΔW = W_ft − W_base.

Per selected module ΔW ≈ U_k S_k V_kᵀ (float32) and the factors are balanced, B = U√S and
A = √S Vᵀ, with lora_alpha = r so that every scale is exactly 1 (rank_pattern/alpha_pattern when
ranks differ). What is factored, measured or saved whole is decided by `extract_plan`, before any
arithmetic; the output folder appears only when everything is written (docs/design.md §4, §7).

Threads: matrices up to PARALLEL_MAX_BYTES go to a few workers running torch on one thread each —
a module is a handful of small GEMMs and QRs, and single-threaded workers side by side beat OpenMP
teams that spin at every barrier, most of all on a busy machine; reads release the GIL, so one
worker's I/O overlaps another's arithmetic. Larger matrices run one at a time on torch's threads.

Spectra: `--rank` needs none; `--energy/--ratio/--auto` take all singular values, then the truncated
SVD, which the spectrum also certifies (a randomized result that misses the Eckart–Young optimum is
recomputed). `--budget` must see every spectrum before choosing any rank, and keeping each module's
factors up to an unknown rank would keep the whole ΔW in memory: pass 1 keeps only the σ's, pass 2
reads each pair again for its factors — one more read for memory that stays at a few tensors.

The report's errors are measured after the factors are cast to the output dtype: they are what the
written adapter does, not what the SVD promised. Measurements: docs/extract.md.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lorasurgery.adapter.model import lora_keys, saved_key
from lorasurgery.adapter.writer import write_adapter_folder
from lorasurgery.commands.extract.plan import (
    Measured,
    Plan,
    Target,
    build_plan,
    check_architectures,
    compile_regex,
    extracted_adapter_config,
    module_of,
)
from lorasurgery.concurrency import Pipeline, Prefetch, one_blas_thread, torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import LoraSurgeryError, NonFiniteError, OptionError
from lorasurgery.io import atomic_output_dir, open_checkpoint
from lorasurgery.io.codes import CodeComparison
from lorasurgery.io.output import check_output_path, write_text_atomically
from lorasurgery.io.safetensors_format import OUTPUT_DTYPES, byte_size, dtype_code_of, output_dtype
from lorasurgery.linalg.policies import Policy
from lorasurgery.memory import tune_allocator
from lorasurgery.naming import natural_key
from lorasurgery.progress import Progress, ProgressCallback, no_progress

SVD_CHOICES = ("auto", "exact", "randomized")
EMBEDDING_CHOICES = ("skip", "lora", "full")
# Matrices up to this size (as float32) are handled by single-threaded workers, several at once.
PARALLEL_MAX_BYTES = 128 << 20
MAX_WORKERS = 4
# Read ahead while torch is imported: at most this much, and at most EARLY_READ_TENSORS times the
# largest tensor, so that streaming memory stays a few tensors whatever the checkpoint size.
EARLY_READ_BYTES = 1 << 30
EARLY_READ_TENSORS = 4
# Power iterations of an explicit --svd randomized (torch.svd_lowrank, q = k + 10): enough for 1% of
# the optimum on docs/extract.md's planted spectra.
RANDOMIZED_NITER = 4


@dataclass
class ExtractedModule:
    name: str
    shape: list[int]  # as stored in the checkpoint
    rank: int
    retained_energy: float  # 1 − ‖ΔW − BA‖²/‖ΔW‖², of the written (cast) factors
    relative_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F, of the written (cast) factors
    kind: str = "linear"  # linear | embedding | tied (lm_head carrying the embedding's factors)
    params: int = 0
    data_relative_error: float | None = None  # ‖(ΔW − BA)L‖_F / ‖ΔW·L‖_F with --calibrate
    identical_codes: float | None = None  # share of codes equal in base and fine-tune (same format)
    scales_changed: bool | None = None  # whether any scale differs (with identical_codes)


@dataclass
class LeftOut:
    name: str
    reason: str
    relative_norm: float  # ‖ΔW‖_F / ‖W‖_F


@dataclass
class ExtractReport:
    base: str
    finetuned: str
    output: str
    policy: str
    modules: list[ExtractedModule] = field(default_factory=list)
    skipped: list[LeftOut] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules saved whole (modules_to_save, biases)
    totals: dict = field(default_factory=dict)  # params, bytes, relative_error
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        """docs/design.md §4's JSON, exactly."""
        return {
            "modules": [
                {
                    "name": m.name,
                    "shape": m.shape,
                    "rank": m.rank,
                    "retained_energy": m.retained_energy,
                    "relative_error": m.relative_error,
                }
                | ({} if m.data_relative_error is None else {"data_relative_error": m.data_relative_error})
                | (
                    {}
                    if m.identical_codes is None
                    else {"identical_codes": m.identical_codes, "scales_changed": m.scales_changed}
                )
                for m in self.modules
            ],
            "skipped": [
                {"name": s.name, "reason": s.reason, "relative_norm": s.relative_norm} for s in self.skipped
            ],
            "totals": self.totals,
        }


# ------------------------------------------------------------------------------------- kernels


@dataclass
class _Run:
    """What every work item needs; shared read-only by the worker threads."""

    base: object  # Checkpoint
    ft: object  # Checkpoint
    device: str
    policy: Policy
    max_rank: int | None
    svd: str
    dtype: str
    allow_nonfinite: bool
    early: Prefetch | None = None  # _early_reads
    base_raw: object = None  # the stored layers (codes and scales) of a quantized pair: Checkpoint.raw
    ft_raw: object = None
    calibration: dict | None = None  # module -> calibrate.Whitening (--calibrate)
    factored: dict = field(default_factory=dict)  # target name -> _Factored, as workers finish
    measured: list = field(default_factory=list)  # _MeasuredResult, as workers finish

    def whitening(self, target: Target):
        """L of the module's input Gram with --calibrate (commands.extract.calibrate), else None."""
        w = self.calibration.get(target.module) if self.calibration else None
        return None if w is None else w.L

    def read(self, checkpoint, name: str):
        """Tensor `name` in its stored dtype, in memory of its own (from the early reader if it has it)."""
        tensor = _take_early(self.early, checkpoint, name)
        return checkpoint.read(name) if tensor is None else tensor


@dataclass
class _Delta:
    matrix: object  # (d, n) float32 in the SVD layout (a transposed view for Conv1D/embeddings)
    delta_sq: float  # ‖ΔW‖²_F
    base_sq: float  # ‖W_base‖²_F
    nonfinite: int  # NaN/Inf entries set to 0 (only with allow_nonfinite)


@dataclass
class _Factored:
    target: Target
    delta_sq: float
    base_sq: float
    nonfinite: int = 0
    spectrum: object = None  # all singular values (float64, CPU), when computed
    rank: int = 0
    err_sq: float = 0.0
    A: object = None  # (r, n) in the output dtype, CPU
    B: object = None  # (d, r)
    data_err_sq: float | None = None  # ‖(ΔW − BA)L‖²_F and ‖ΔW·L‖²_F with --calibrate
    data_sq: float | None = None
    codes: CodeComparison | None = None  # both sides stored in the same quantized layout
    noise_sq: float | None = None  # --auto on a quantized pair: the quantisation noise's σ² per entry
    plain_rank: int | None = None  # the rank --auto would keep without the quantisation noise floor


@dataclass
class _MeasuredResult:
    item: Measured
    delta_sq: float
    base_sq: float
    tensors: dict | None = None  # adapter key -> tensor, when saved


def _sq_norm(x) -> float:
    """‖x‖²_F from float32 row norms summed in float64 (≈2e-9 relative on a 576 × 1536 matrix).

    torch.linalg.vector_norm(x, dtype=float64) converts element by element: 1.7 ms for 576 × 1536
    against 0.25 ms here, a sixth of the whole per-module arithmetic at rank 32. A whole-matrix
    float32 norm is as fast but 2e-5 off; x * x needs a temporary. The result is inf/NaN iff an
    entry is (or, for |entries| > 1e19, overflows: callers then decide exactly).
    """
    import torch

    if x.dim() != 2:
        x = x.reshape(1, -1)
    elif not x.is_contiguous() and x.mT.is_contiguous():  # a transposed view: same norm, fast rows
        x = x.mT
    return float(torch.linalg.vector_norm(x, dim=1).double().square().sum())


def _sq_norm_exact(x) -> float:
    import torch

    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _nonfinite_error(run: _Run, module: str, names: Iterable[str]) -> NonFiniteError:
    """Name the checkpoint that holds the NaN/Inf (re-reading: this is the error path)."""
    import torch

    for checkpoint in (run.base, run.ft):
        for name in names:
            if not bool(torch.isfinite(checkpoint.read(name).float()).all()):
                return NonFiniteError(
                    f"{checkpoint.path}: module {module}: NaN/Inf in {name}; pass --allow-nonfinite to go on"
                )
    return NonFiniteError(f"module {module}: NaN/Inf in ΔW; pass --allow-nonfinite to go on")


def _read_delta(run: _Run, target: Target) -> _Delta:
    """ΔW = W_ft − W_base in float32 on the device, in the SVD layout; norms for the report."""
    import torch

    w_base = run.read(run.base, target.name).to(device=run.device, dtype=torch.float32)  # stored (d, n)
    delta = run.read(run.ft, target.name).to(device=run.device, dtype=torch.float32)  # our own buffer
    delta.sub_(w_base)
    base_sq = _sq_norm(w_base)
    delta_sq = _sq_norm(delta)  # one pass gives both the norm and the NaN/Inf check
    if not math.isfinite(base_sq):  # NaN/Inf, or an entry beyond 1e19: decide exactly
        base_sq = _sq_norm_exact(w_base)
    del w_base
    if not math.isfinite(delta_sq):
        delta_sq = _sq_norm_exact(delta)
    nonfinite = 0
    if not (math.isfinite(delta_sq) and math.isfinite(base_sq)):
        if not run.allow_nonfinite:
            raise _nonfinite_error(run, target.module, [target.name])
        nonfinite = int((~torch.isfinite(delta)).sum())
        delta.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        delta_sq = _sq_norm_exact(delta)
        base_sq = _sq_norm_exact(torch.nan_to_num(run.base.read(target.name).float(), 0.0, 0.0, 0.0))
    return _Delta(delta.T if target.transpose else delta, delta_sq, base_sq, nonfinite)


def _spectrum(run: _Run, target: Target, matrix):
    """All min(d, n) singular values, float64, CPU (the cheapest exact route for the source dtype)."""
    from lorasurgery.linalg.svd import singular_values

    L = run.whitening(target)
    if L is not None:  # --calibrate: the whitened spectrum σ(ΔW·L), energy in data space
        matrix = _whiten(matrix, L)
    return singular_values(matrix, source_dtype=target.source_dtype).cpu()


def _whiten(M, L):
    """ΔW·L (d, n) float32 on M's device, the product in float64."""
    import torch

    return (M.to(torch.float64) @ L.to(M.device)).to(torch.float32)


def _noise_floor(S, target: Target) -> float:
    """σ below σ₁·max(d, n)·eps(source dtype) are rounding, not signal (docs/design.md §5's numerical rank)."""
    from lorasurgery.linalg.svd import numerical_rank_tolerance

    return float(S[0]) * numerical_rank_tolerance(target.shape, target.source_dtype) if len(S) else 0.0


def _policy_rank(run: _Run, target: Target, S, result: _Factored | None = None) -> int:
    # Rounding noise in an exactly low-rank ΔW is not white: the floor caps --auto at the numerical
    # rank, and τ = 1 keeps every numerically nonzero σ, not rounding noise.
    floor = _noise_floor(S, target)
    rank = _cap(run.policy.module_rank(S, target.shape, floor=floor), target, run.max_rank)
    if result is None or result.noise_sq is None:
        return rank
    # Both sides quantized: --auto knows the noise the codes carry; σ below Gavish–Donoho's
    # known-noise threshold for it are quantisation, not fine-tuning (docs/design.md §13).
    from lorasurgery.linalg.policies import gavish_donoho_known_threshold

    quantized = gavish_donoho_known_threshold(target.shape, math.sqrt(result.noise_sq))
    result.plain_rank = rank
    return _cap(run.policy.module_rank(S, target.shape, floor=max(floor, quantized)), target, run.max_rank)


def _quantized_pair(run: _Run, target: Target, result: _Factored) -> None:
    """Both sides quantized: the share of identical codes (same format and layout) and, for --auto,
    the quantisation noise of ΔW: σ² = v_base + v_ft per entry, each side's rounding (the readers'
    step²/12, averaged over the tensor) counted as independent. That overstates the noise where
    most codes are shared, and is still the choice closest to the true fine-tune: docs/extract.md,
    "Quantized pairs", measures it against the alternatives."""
    a, b = run.base.tensors[target.name], run.ft.tensors[target.name]
    if not (a.dequantized and b.dequantized):
        return
    from lorasurgery.io import readers
    from lorasurgery.io.codes import compare_codes, layout_difference

    def reader(raw):
        return lambda stored: raw.read(stored.name, run.device)

    if layout_difference(a, b) is None:
        result.codes = compare_codes(a, b, reader(run.base_raw), reader(run.ft_raw))
    if run.policy.auto and run.calibration is None and result.delta_sq > 0:
        variances = [
            readers.noise_variance(a, reader(run.base_raw)),
            readers.noise_variance(b, reader(run.ft_raw)),
        ]
        if None not in variances:
            result.noise_sq = sum(variances)


def _cap(k: int, target: Target, max_rank: int | None) -> int:
    k = min(k, *target.shape)
    return min(k, max_rank) if max_rank is not None else k


def _balanced_factors(run: _Run, matrix, k: int, spectrum):
    """B = U_k √S_k (d, k), A = √S_k V_kᵀ (k, n), float32, of the best rank-k approximation."""
    import torch

    from lorasurgery.linalg.svd import truncated_svd

    # "auto" takes block Krylov (2 iterations) on large matrices, certified against the spectrum
    # when there is one (linalg.svd); an explicit --svd randomized is torch.svd_lowrank.
    niter = RANDOMIZED_NITER if run.svd == "randomized" else 2
    U, S, Vh = truncated_svd(matrix, k, method=run.svd, niter=niter, spectrum=spectrum)  # (d,k) (k,) (k,n)
    U, Vh = U[:, :k].to(torch.float32), Vh[:k].to(torch.float32)
    # Each singular pair's sign is LAPACK's choice, and it changes with the BLAS threads of the
    # thread that runs it: the entry of largest magnitude of every column of U is made positive, so
    # the same ΔW gives the same factors whichever worker (or route) computed them.
    sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))  # (1, k)
    sign[sign == 0] = 1
    U.mul_(sign)
    Vh.mul_(sign.T)
    root = torch.sqrt(S[:k].to(torch.float32).clamp_min(0))
    return U * root, root[:, None] * Vh


def _factor(run: _Run, target: Target, rank: int | None = None, spectrum=None) -> _Factored:
    """Read ΔW, choose its rank (policy or given), factor it, cast, and measure the true error."""
    import torch

    delta = _read_delta(run, target)
    result = _Factored(target, delta.delta_sq, delta.base_sq, delta.nonfinite)
    if rank is None:  # the first (or only) pass over this target
        _quantized_pair(run, target, result)
    else:  # --budget's second pass: the first compared the codes
        result.codes = run.factored[target.name].codes
    if delta.delta_sq == 0:
        return result  # unchanged: nothing to extract, nothing lost
    M = delta.matrix  # (d, n)
    if rank is None:
        if run.policy.per_module_spectrum:
            spectrum = _spectrum(run, target, M)
            rank = _policy_rank(run, target, spectrum, result)
        else:
            rank = _cap(run.policy.rank, target, run.max_rank)
    result.rank, result.spectrum = rank, spectrum
    if rank == 0:
        result.err_sq = delta.delta_sq
        return result
    L = run.whitening(target)
    if L is None:
        B, A = _balanced_factors(run, M, rank, spectrum)
    else:  # --calibrate: truncate ΔW·L, then A = A_w·L⁻¹ (commands.extract.calibrate)
        import torch

        B, A_w = _balanced_factors(run, _whiten(M, L), rank, spectrum)
        A = torch.linalg.solve_triangular(L.to(M.device), A_w.to(torch.float64), upper=False, left=False)
        A = A.to(torch.float32)
    out_dtype = output_dtype(run.dtype, target.source_dtype)
    B, A = B.to(out_dtype), A.to(out_dtype)
    if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
        raise NonFiniteError(
            f"module {target.module}: the factors overflow {str(out_dtype).removeprefix('torch.')}; "
            f"choose --dtype bf16 or fp32"
        )
    residual = torch.addmm(M, B.to(torch.float32), A.to(torch.float32), alpha=-1)  # (d, n) ΔW − BA
    result.err_sq = _sq_norm(residual)
    if L is not None:
        result.data_err_sq, result.data_sq = _sq_norm(_whiten(residual, L)), _sq_norm(_whiten(M, L))
    del residual, M, delta
    result.A, result.B = A.cpu().contiguous(), B.cpu().contiguous()
    return result


def _spectrum_only(run: _Run, target: Target) -> _Factored:
    """Budget pass 1: ‖ΔW‖, ‖W‖ and all singular values; no factors."""
    delta = _read_delta(run, target)
    result = _Factored(target, delta.delta_sq, delta.base_sq, delta.nonfinite)
    _quantized_pair(run, target, result)
    if delta.delta_sq > 0:
        result.spectrum = _spectrum(run, target, delta.matrix)
    return result


def _measure(run: _Run, item: Measured) -> _MeasuredResult:
    """‖ΔW‖² and ‖W‖² of a module's tensors; the fine-tune's tensors when they are to be saved."""

    delta_sq = base_sq = 0.0
    tensors = {}
    for name in item.names:
        w_ft = run.read(run.ft, name)
        if not item.resized:
            w_base = run.read(run.base, name).float()
            base_sq += _sq_norm(w_base)
            # In place when nothing is saved: a second vocabulary-sized buffer is the slow part.
            delta = (
                w_ft.float() - w_base
                if item.save or not w_ft.is_floating_point()
                else w_base.neg_().add_(w_ft)
            )
            delta_sq += _sq_norm(delta)
            del w_base, delta
        if not (math.isfinite(delta_sq) and math.isfinite(base_sq)) and not run.allow_nonfinite:
            raise _nonfinite_error(run, item.module, item.names)
        if item.save:
            if run.dtype != "auto" and w_ft.is_floating_point():
                w_ft = w_ft.to(output_dtype(run.dtype, w_ft.dtype))
            tensors[item.adapter_keys[name]] = w_ft.contiguous()
    changed = item.resized or delta_sq != 0
    return _MeasuredResult(item, delta_sq, base_sq, tensors if item.save and changed else None)


# ------------------------------------------------------------------------------------- threads


def _early_reads(reads: list, limit: int) -> Prefetch:
    """The first tensors of the work order, read while torch is being imported.

    `import torch` takes 1–2 s of one core and nothing else needs the disk then; file reads release
    the GIL, so the tensors the workers start with are read meanwhile. A worker takes a tensor from
    here when it was read in time (`_take_early`), and reads it itself otherwise.
    """
    from lorasurgery.io.checkpoint import read_range

    def read(entry):
        checkpoint, name = entry
        info = checkpoint.tensors[name]
        # An anonymous mapping, not bytearray(n): that zero-fills every page while holding the GIL,
        # which stalled the very import this thread runs beside.
        buffer = mmap.mmap(-1, info.nbytes)
        read_range(info.file, info.start, buffer)
        return buffer

    # Up to the first pickled tensor (no byte range to read), skipping empty ones and those a
    # quantized checkpoint decodes from codes (read, dequantized, by the workers).
    entries = []
    for checkpoint, name in reads:
        info = checkpoint.tensors[name]
        if info.dequantized:
            continue
        if info.start < 0:
            break
        if info.nbytes:
            entries.append((checkpoint, name))
    return Prefetch(
        entries, read, cost=lambda entry: entry[0].tensors[entry[1]].nbytes, limit=limit, name="extract-early"
    )


def _take_early(early: Prefetch | None, checkpoint, name: str):
    buffer = early.take((checkpoint, name)) if early is not None else None
    if buffer is None:
        return None
    import torch

    info = checkpoint.tensors[name]
    return torch.frombuffer(buffer, dtype=torch.uint8).view(info.torch_dtype).reshape(info.shape)


def _worker_count(run: _Run) -> int:
    if run.device != "cpu":
        return 1  # one GPU stream; the CPU only feeds it
    if any(f.suffix == ".bin" for c in (run.base, run.ft) for f in c.files):
        return 1  # pytorch_model.bin: the checkpoint's unpickled-shard cache is not thread-safe
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def _run_all(items: list, work: Callable, workers: int, size_of: Callable, on_done: Callable) -> None:
    """work(item) for every item; on_done(result) in the calling thread as each finishes.

    Items of up to PARALLEL_MAX_BYTES run in `workers` threads with torch on one thread each;
    larger ones after them, one at a time, with torch's own threads. An error in any item stops
    the rest and is raised here; so is Ctrl-C, after the running items have finished."""
    small = [i for i in items if workers > 1 and size_of(i) <= PARALLEL_MAX_BYTES]
    large = [i for i in items if not (workers > 1 and size_of(i) <= PARALLEL_MAX_BYTES)]
    if small:
        # The items read their own tensors (through the early reader), so the pipeline's read
        # stage only hands them on; its queues keep one item waiting per worker.
        with torch_threads(1), one_blas_thread():
            with Pipeline(
                small, lambda item: None, lambda item, _: work(item), workers=workers, name="extract"
            ) as run:
                for _, result in run:
                    on_done(result)
    for item in large:
        on_done(work(item))


# ------------------------------------------------------------------------------------ extract


@dataclass(frozen=True)
class ExtractRequest:
    """What `extract` is asked: the pair, the output, the rank policy and every option (the CLI's)."""

    base: str | os.PathLike
    finetuned: str | os.PathLike
    out: str | os.PathLike
    policy: Policy
    max_rank: int | None = None
    include: str | None = None  # regex of the modules to factor (default: the transformer blocks)
    exclude: str | None = None
    embeddings: str = "skip"  # skip | lora | full
    save_1d: bool = False
    dtype: str = "auto"
    svd: str = "auto"
    device: str = "cpu"
    force: bool = False
    allow_nonfinite: bool = False
    calibrate: str | os.PathLike | None = None  # the --text of --calibrate
    calibrate_tokens: int | None = None
    calibrate_ridge: float | None = None
    calibrate_scaled_budget: bool = True
    config_file: str | os.PathLike | None = None  # layer kinds, layouts and ties when no config.json

    def validate(self) -> None:
        self.policy.validate()
        if self.max_rank is not None and self.max_rank < 1:
            raise OptionError(f"--max-rank must be at least 1, got {self.max_rank}")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise OptionError(f"--embeddings must be skip, lora or full, got {self.embeddings!r}")
        if self.dtype not in ("auto", *OUTPUT_DTYPES):
            raise OptionError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.svd not in SVD_CHOICES:
            raise OptionError(f"--svd must be exact, randomized or auto, got {self.svd!r}")


def extract_adapter(request: ExtractRequest, progress: ProgressCallback | None = None) -> ExtractReport:
    """Write a PEFT adapter approximating FINETUNED − BASE to `request.out`; return the error report.

    The steps: the pair opened and planned (no torch yet), every target's SVD (with a --budget, a
    spectra pass, the allocation, then the factors), the adapter assembled and written atomically."""
    started = time.perf_counter()
    progress = progress or no_progress
    tune_allocator()  # streamed tensor pairs must not pile up in glibc's heaps
    request.validate()
    base, finetuned, policy = request.base, request.finetuned, request.policy
    # Refuse an unusable OUT now, not after minutes of SVDs (atomic_output_dir checks again).
    check_output_path(request.out, [base, finetuned], request.force)
    base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    check_architectures(base_ckpt, ft_ckpt)
    include_re = compile_regex(request.include, "--include")
    exclude_re = compile_regex(request.exclude, "--exclude")
    plan = build_plan(
        base_ckpt, ft_ckpt, include_re, exclude_re, request.embeddings, request.save_1d, request.config_file
    )  # no torch yet
    if not plan.targets and not any(m.save for m in plan.measured):
        raise LoraSurgeryError(f"{finetuned}: no module to extract (check --include/--exclude)")

    def size_of(item) -> int:
        if isinstance(item, Measured):
            return 4 * item.numel(ft_ckpt)
        target = item if isinstance(item, Target) else item[0]
        return 4 * target.numel

    # Largest first: a vocabulary-sized item started last would leave the other workers idle.
    order = sorted([*plan.targets, *plan.measured], key=size_of, reverse=True)
    run = _start_run(request, base_ckpt, ft_ckpt, order)
    report = ExtractReport(str(base), str(finetuned), str(request.out), policy.describe())
    if request.calibrate is not None:
        _calibrate(run, request, plan, report, progress)
    _factor_all(run, request, plan, order, size_of, report, progress)
    tensors, config = _assemble(plan, run.factored, run.measured, report, base_ckpt, ft_ckpt, base)
    with atomic_output_dir(request.out, inputs=[base, finetuned], force=request.force) as folder:
        write_adapter_folder(folder, tensors, config)
    report.seconds = time.perf_counter() - started
    return report


def _start_run(request: ExtractRequest, base_ckpt, ft_ckpt, order) -> _Run:
    """The shared state of the workers, torch imported while the first tensors are read."""
    reads = [
        (checkpoint, name)
        for item in order
        for name in (item.names if isinstance(item, Measured) else [item.name])
        for checkpoint in (
            (ft_ckpt,) if isinstance(item, Measured) and item.resized else (base_ckpt, ft_ckpt)
        )
    ]
    largest = max((c.tensors[n].nbytes for c, n in reads), default=0)
    with _early_reads(reads, min(EARLY_READ_BYTES, EARLY_READ_TENSORS * largest)) as early:
        import torch  # noqa: F401  (1–2 s, while the early reader reads the first tensors)

        device = resolve_device(request.device)
    return _Run(
        base_ckpt,
        ft_ckpt,
        device,
        request.policy,
        request.max_rank,
        request.svd,
        request.dtype,
        request.allow_nonfinite,
        early,
        base_ckpt.raw,
        ft_ckpt.raw,
    )


def _calibrate(run: _Run, request: ExtractRequest, plan: Plan, report: ExtractReport, progress) -> None:
    """--calibrate: each linear target's input Gram on the text (commands.extract.calibrate)."""
    from lorasurgery.commands.extract.calibrate import RIDGE, collect_input_grams

    linear = [t.module for t in plan.targets if t.kind == "linear"]
    ridge = RIDGE if request.calibrate_ridge is None else request.calibrate_ridge
    run.calibration = collect_input_grams(
        request.finetuned, linear, request.calibrate, request.calibrate_tokens, run.device, progress, ridge
    )
    tokens = max((w.tokens for w in run.calibration.values()), default=0)
    report.policy += ", calibrated"
    report.notes.append(
        f"calibrated on {tokens} tokens of {request.calibrate}: {len(run.calibration)} modules minimise the "
        f"error on their inputs ‖(ΔW − BA)X‖ (data_relative_error); embeddings stay plain"
    )


def _factor_all(run: _Run, request: ExtractRequest, plan: Plan, order, size_of, report, progress) -> None:
    """Every work item through the workers into run.factored / run.measured: at the policy's rank
    in one pass, or (--budget) spectra first, the budget allocated, then the factors."""
    policy = run.policy
    workers = _worker_count(run)
    passes = 2 if policy.budget is not None else 1
    total = passes * len(plan.targets) + len(plan.measured)
    done = 0

    def collect(stage: str):
        def on_done(result) -> None:
            nonlocal done
            if result is None:
                return
            if isinstance(result, _MeasuredResult):
                run.measured.append(result)
                item = result.item.module
            else:
                run.factored[result.target.name] = result
                item = result.target.module
            done += 1
            progress(Progress(stage, done, total, item))

        return on_done

    def work(item):
        if isinstance(item, Measured):
            return _measure(run, item)
        if isinstance(item, Target):
            return _spectrum_only(run, item) if policy.budget is not None else _factor(run, item)
        target, k, spectrum = item
        return _factor(run, target, k, spectrum)

    _run_all(order, work, workers, size_of, collect("extract: spectra" if policy.budget else "extract"))
    if policy.budget is None:
        return
    scaled = request.calibrate_scaled_budget and request.calibrate is not None
    ranks = _allocate(plan, run.factored, run.measured, policy.budget, run.max_rank, report, scaled)
    second = [
        (t, ranks[t.name], run.factored[t.name].spectrum)
        for t in order
        if isinstance(t, Target) and ranks.get(t.name, 0) > 0
    ]
    for target in plan.targets:
        if ranks.get(target.name, 0) == 0:  # nothing kept: the spectrum pass said all there is
            run.factored[target.name].err_sq = run.factored[target.name].delta_sq
            done += 1
    _run_all(second, work, workers, size_of, collect("extract"))


def _allocate(
    plan: Plan, factored, measured, budget: int, max_rank, report: ExtractReport, scaled=False
) -> dict[str, int]:
    """--budget: ranks maximising the retained energy under Σ k·(d + n)·copies ≤ budget − saved."""
    from lorasurgery.linalg.policies import allocate_budget

    saved = sum(t.numel() for m in measured if m.tensors for t in m.tensors.values())
    for m in measured:  # a saved tied embedding is written twice (see _assemble)
        if m.tensors and m.item.module == plan.tied_embedding:
            saved += sum(t.numel() for t in m.tensors.values())
    available = budget - saved
    if available < 0:
        raise LoraSurgeryError(
            f"--budget {budget:,}: the tensors saved whole (--embeddings full / --save-1d) alone take "
            f"{saved:,} parameters"
        )
    if saved:
        report.notes.append(f"{saved:,} of the {budget:,} budgeted parameters went to tensors saved whole")
    names, spectra = [], []
    for target in plan.targets:
        S = factored[target.name].spectrum
        if S is None:  # unchanged
            continue
        S = S[S > _noise_floor(S, target)]  # no budget for rounding noise
        if scaled and float(S.square().sum()) > 0:
            # Whitened spectra in each module's ‖ΔW‖_F units: the data decides the shape of a
            # module's spectrum, not how much budget its input scale draws (docs/extract.md).
            S = S * math.sqrt(factored[target.name].delta_sq / float(S.square().sum()))
        d, n = target.shape
        names.append(target.name)
        # A tied lm_head carries a copy of the embedding's factors: each of its ranks costs twice.
        spectra.append((S, target.copies * d, target.copies * n))
    chosen = allocate_budget(spectra, available, max_rank=max_rank)
    return dict(zip(names, chosen))


@dataclass
class _Assembly:
    """The adapter being assembled from the finished work, and the sums its report needs."""

    tensors: dict = field(default_factory=dict)
    module_ranks: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    saved_biases: bool = False
    error_sq: float = 0.0  # Σ‖ΔW − BA‖² over the factored modules
    total_sq: float = 0.0  # Σ‖ΔW‖² over them
    data_error_sq: float = 0.0  # --calibrate: Σ over the calibrated modules
    data_total_sq: float = 0.0
    unchanged: int = 0
    codes_identical: int = 0  # quantized pairs: Σ identical codes over the compared targets
    codes_total: int = 0
    compared: int = 0  # targets whose codes were compared
    bit_for_bit: int = 0  # … of which codes and scales are all identical
    scales_changed: int = 0
    floored: int = 0  # --auto targets with the quantisation noise floor
    lowered: list = field(default_factory=list)  # (module, rank without the floor, rank with it)
    change_sq: dict[str, float] = field(default_factory=dict)  # every module's ‖ΔW‖², for the note
    skipped_sq: dict[str, float] = field(default_factory=dict)  # the changed modules left out


def _assemble(plan: Plan, factored, measured, report: ExtractReport, base_ckpt, ft_ckpt, base_path):
    """The adapter's tensors and config from the finished work; fills the report."""
    out = _Assembly()
    for target in sorted(plan.targets, key=lambda t: natural_key(t.module)):
        _add_factored(out, plan, target, factored[target.name], report)
    for m in sorted(measured, key=lambda r: natural_key(r.item.module)):
        _add_measured(out, m, report)
    if plan.tied_embedding in out.modules_to_save:
        # PEFT ties lm_head to the saved embedding (ensure_weight_tying) but still loads it from its
        # own key, and fails without it; its own save_pretrained writes both. So the matrix is
        # written twice here too — the one place PEFT's format needs a tied matrix twice.
        embedding = out.tensors[saved_key(f"{plan.tied_embedding}.weight")]
        out.tensors[saved_key(f"{plan.tied_head}.weight")] = embedding
        report.notes.append(
            f"{plan.tied_head} is tied to {plan.tied_embedding}: PEFT loads a saved tied embedding only "
            f"with a copy under {plan.tied_head}, so the file holds it twice (--embeddings lora does not)"
        )
    if not out.module_ranks:  # PEFT refuses a LoRA config that wraps no module (modules_to_save alone)
        floored = (
            f"; --auto found every change below the quantisation noise of the codes in {out.floored} modules "
            f'(docs/extract.md, "Quantized pairs"): choose --rank to extract it anyway'
            if out.floored
            else ""
        )
        raise LoraSurgeryError(
            f"{report.finetuned}: no selected module changed enough to keep (all unchanged or rank 0); "
            f"nothing to write{floored}"
        )
    report.totals = {
        "params": sum(t.numel() for t in out.tensors.values()),
        "bytes": sum(byte_size(dtype_code_of(t.dtype), tuple(t.shape)) for t in out.tensors.values()),
        "relative_error": math.sqrt(out.error_sq / out.total_sq) if out.total_sq else 0.0,
    }
    if out.data_total_sq:
        report.totals["data_relative_error"] = math.sqrt(out.data_error_sq / out.data_total_sq)
    _skipped_note(report, out.skipped_sq, out.change_sq)
    _quantized_notes(report, out, base_ckpt, ft_ckpt, plan)
    if out.unchanged:
        report.notes.append(
            f"{out.unchanged} selected modules are unchanged by the fine-tune and were left out"
        )
    all_modules = {module_of(n) for n in base_ckpt.tensors} | set(out.module_ranks)
    config = extracted_adapter_config(
        base_path, plan, out.module_ranks, out.modules_to_save, out.saved_biases, all_modules
    )
    return out.tensors, config


def _add_factored(out: _Assembly, plan: Plan, target: Target, f, report: ExtractReport) -> None:
    """One target's factors (and a tied lm_head's) into the adapter, its row into the report."""
    out.change_sq[target.module] = f.delta_sq
    if f.codes is not None:
        out.compared += 1
        out.codes_identical += f.codes.identical
        out.codes_total += f.codes.total
        out.bit_for_bit += f.codes.bit_for_bit
        out.scales_changed += not f.codes.scales_identical
    if f.plain_rank is not None:
        out.floored += 1
        if f.plain_rank != f.rank:
            out.lowered.append((target.module, f.plain_rank, f.rank))
    if f.nonfinite:
        report.notes.append(f"{target.module}: {f.nonfinite} NaN/Inf entries of ΔW were treated as 0")
    if f.delta_sq == 0:
        out.unchanged += 1
        return
    relative_norm = math.sqrt(f.delta_sq / f.base_sq) if f.base_sq else float("inf")
    out.error_sq += f.err_sq
    out.total_sq += f.delta_sq
    if f.rank == 0:
        reason = f"rank 0 under {report.policy}"
        if f.plain_rank:  # the quantisation noise floor took every direction
            reason += ": ΔW is below the quantisation noise of the codes"
        report.skipped.append(LeftOut(target.module, reason, relative_norm))
        return
    keys = lora_keys(target.module, target.kind)
    out.tensors[keys.A], out.tensors[keys.B] = f.A, f.B
    out.module_ranks[target.module] = f.rank
    result = ExtractedModule(
        name=target.module,
        shape=list(target.stored_shape),
        rank=f.rank,
        retained_energy=max(0.0, 1.0 - f.err_sq / f.delta_sq),
        relative_error=math.sqrt(f.err_sq / f.delta_sq),
        kind=target.kind,
        params=f.A.numel() + f.B.numel(),
        data_relative_error=math.sqrt(f.data_err_sq / f.data_sq) if f.data_sq else None,
        identical_codes=None if f.codes is None else f.codes.share,
        scales_changed=None if f.codes is None else not f.codes.scales_identical,
    )
    if f.data_sq:
        out.data_error_sq += f.data_err_sq
        out.data_total_sq += f.data_sq
    report.modules.append(result)
    if target.module == plan.tied_input and plan.tied_output:
        # PEFT applies an embedding LoRA to the input side only; the tied lm_head (vocab, dim)
        # needs ΔE = (B_e A_e)ᵀ = A_eᵀ B_eᵀ too: its Linear LoRA is B = A_eᵀ, A = B_eᵀ — the same
        # numbers PEFT's ensure_weight_tying shares. Counted once in the overall error.
        out_keys = lora_keys(plan.tied_output)
        out.tensors[out_keys.A] = f.B.T.contiguous()
        out.tensors[out_keys.B] = f.A.T.contiguous()
        out.module_ranks[plan.tied_output] = f.rank
        report.modules.append(
            ExtractedModule(
                plan.tied_output,
                list(target.stored_shape),
                f.rank,
                result.retained_energy,
                result.relative_error,
                kind="tied",
                params=result.params,
            )
        )
        report.notes.append(
            f"{plan.tied_output} is tied to {target.module}: it gets the same factors "
            f"(PEFT applies an embedding LoRA to the input side only)"
        )


def _add_measured(out: _Assembly, m, report: ExtractReport) -> None:
    """A measured module: saved whole (modules_to_save, or a bias), or reported as left out."""
    module = m.item.module
    out.change_sq[module] = out.change_sq.get(module, 0.0) + m.delta_sq
    if m.tensors:
        out.tensors.update(m.tensors)
        report.saved.append(module)
        if m.item.as_bias:
            out.saved_biases = True
        elif module not in out.modules_to_save:
            out.modules_to_save.append(module)
    elif m.delta_sq > 0:
        relative_norm = math.sqrt(m.delta_sq / m.base_sq) if m.base_sq else float("inf")
        report.skipped.append(LeftOut(module, m.item.reason, relative_norm))
        out.skipped_sq[module] = out.skipped_sq.get(module, 0.0) + m.delta_sq


def _quantized_notes(report: ExtractReport, out: _Assembly, base_ckpt, ft_ckpt, plan: Plan) -> None:
    """What a quantized side means for the report: the identical-code share (both sides in the
    same layout), why there is none, and what --auto's quantisation noise floor did."""
    base_q, ft_q = base_ckpt.quantization, ft_ckpt.quantization
    if base_q is None and ft_q is None:
        return
    if base_q is None or ft_q is None:
        side, q = ("base", base_q) if ft_q is None else ("fine-tune", ft_q)
        report.notes.append(
            f"only the {side} is stored quantized ({q.name}): ΔW is taken against its dequantized "
            f"weights; no share of identical codes (that needs both sides quantized alike)"
        )
        return
    quantized = [t for t in plan.targets if base_ckpt.tensors[t.name].dequantized]
    if out.compared < len(quantized):
        report.notes.append(
            f"{len(quantized) - out.compared} of the {len(quantized)} quantized modules are stored in "
            f"different formats or layouts in base ({base_q.name}) and fine-tune ({ft_q.name}): "
            f"no share of identical codes for them"
        )
    if out.compared:
        share = out.codes_identical / out.codes_total if out.codes_total else 1.0
        report.totals["identical_codes"] = share
        report.totals["bit_for_bit_modules"] = out.bit_for_bit
        report.notes.append(
            f"base and fine-tune are both stored as {base_q.name}: {100 * share:.2f}% of the codes of "
            f"the {out.compared} compared modules are identical; scales changed in {out.scales_changed} "
            f"modules; {out.bit_for_bit} modules are unchanged bit for bit (codes and scales)"
        )
    if out.floored:
        lowered = ", ".join(f"{m} {a}→{b}" for m, a, b in out.lowered[:4])
        more = f" and {len(out.lowered) - 4} more" if len(out.lowered) > 4 else ""
        report.notes.append(
            f"--auto: the quantisation noise of both sides (uniform rounding, step²/12 per code) is the "
            f"noise floor of {out.floored} modules; it lowered {len(out.lowered)} ranks"
            + (f" ({lowered}{more})" if lowered else "")
        )


def _skipped_note(report: ExtractReport, skipped_sq: dict[str, float], change_sq: dict[str, float]) -> None:
    """How much of the fine-tune's change the adapter leaves out, and what would bring it in."""
    total = sum(change_sq.values())
    if not skipped_sq or not total:
        return
    share = sum(skipped_sq.values()) / total
    largest = sorted(skipped_sq.items(), key=lambda kv: -kv[1])[:3]
    largest = [kv for kv in largest if kv[1] >= 5e-4 * total] or largest[:1]  # no "0.0%" entries
    parts = ", ".join(f"{name} {100 * sq / total:.1f}%" for name, sq in largest)
    advice = ""
    if any(s.reason.startswith("embedding") for s in report.skipped):
        advice = "; --embeddings lora extracts the embeddings and lm_head too"
    report.notes.append(
        f"modules left out of the adapter hold {100 * share:.1f}% of the fine-tune's squared change "
        f"Σ‖ΔW‖²_F (largest: {parts}){advice}"
    )


def write_extract_report(report: ExtractReport, path: str | os.PathLike) -> None:
    """Write the docs/design.md §4 JSON report to `path`, atomically."""
    write_text_atomically(path, json.dumps(report.to_json(), indent=2) + "\n")
