"""`rank-report`: the intrinsic rank of ΔW and of W, with the LoRA paper's analyses (Hu et al. §7).

Three modes (docs/design.md §5):
- TARGET is an adapter: ΔW = s·B@A per module, its spectrum exact from the QR factors of B and Aᵀ
  (an r × r SVD, never d × k). With --base, W's metrics too, ‖ΔW‖/‖W‖ and the amplification factor.
  A DoRA module's update depends on W: its effective ΔW = W' − W needs --base.
- TARGET is a model with --base: ΔW = W_target − W_base, dense, singular values only unless vectors
  are needed (amplification, subspace similarity).
- TARGET is a model alone: W's metrics — the paper's open question, is W itself rank-deficient?
Matrices are streamed one at a time. With a base, each ΔW's entry also counts the intruder
dimensions of W + ΔW (linalg.intruders); --probe adds the functional rank (probe.py).

torch and the torch-based kernels are imported inside the functions that use them: rank-report of W
alone runs on numpy (linalg.gram) and never imports torch, 1.5–2 s of a run that takes a few seconds
(docs/architecture.md, "Lazy imports").
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import bind
from lorasurgery.commands.rank_report.targets import expert_parameters, is_adapter, selected_weights
from lorasurgery.concurrency import Pipeline, one_blas_thread, torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import LoraSurgeryError, MismatchError
from lorasurgery.io import open_checkpoint
from lorasurgery.linalg.gram import DTYPE_EPS, gram_singular_values, read_matrix
from lorasurgery.linalg.intruders import intruder_dimensions
from lorasurgery.linalg.spectra import mle_dimension, spectrum_metrics
from lorasurgery.naming import module_type
from lorasurgery.progress import Progress, ProgressCallback, no_progress

DEFAULT_AMP_RANK = 16
DEFAULT_INTRUDERS_K = 10  # Shuttleworth et al. 2024's k and ε (docs/rank-report.md)
DEFAULT_INTRUDERS_EPS = 0.5


@dataclass
class ModuleEntry:
    name: str
    kind: str  # "delta" | "weight"
    shape: list[int]
    metrics: dict
    spectrum: list[float] = field(default_factory=list, repr=False)  # for plots, not in JSON

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": self.shape, "metrics": self.metrics}


@dataclass
class RankReport:
    target: str
    base: str | None
    mode: str  # "adapter" | "delta" | "weight"
    modules: list[ModuleEntry] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    probe: object | None = None  # probe.ProbeResult with --probe
    assumptions: list = field(default_factory=list)  # binding.Assumption: layouts resting on a flag

    def to_json(self) -> dict:
        data = {
            "target": self.target,
            "base": self.base,
            "modules": [m.to_json() for m in self.modules],
            "summary": self.summary,
        }
        if self.probe is not None:
            data["probe"] = self.probe.to_json()
        if self.assumptions:
            data["assumptions"] = [a.to_dict() for a in self.assumptions]
        return data


def _padded(S, shape) -> object:
    """A low-rank spectrum padded with zeros to min(d, k): metrics need the full spectrum."""
    import torch

    full = torch.zeros(min(shape), dtype=torch.float64)
    full[: len(S)] = S.to(torch.float64)[: min(shape)]
    return full


def _metrics(S, shape, source_dtype) -> dict:

    return spectrum_metrics(_padded(S, shape), tuple(shape), source_dtype)


@dataclass(frozen=True)
class RankReportRequest:
    """What `rank-report` is asked: TARGET, --base, --compare and every option (the CLI's).

    With a base, layouts and embeddings come from its structure (lorasurgery.model;
    `config_file`/`fan_in_fan_out` as for merge); `probe_text` adds the functional rank (probe.py)."""

    target: str | os.PathLike
    base: str | os.PathLike | None = None
    compare: str | os.PathLike | None = None
    amp_rank: int | None = None
    include: str | None = None  # regex of the modules analysed
    mle: bool = False
    device: str = "cpu"
    intruders_k: int = DEFAULT_INTRUDERS_K
    intruders_eps: float = DEFAULT_INTRUDERS_EPS
    probe_text: str | os.PathLike | None = None
    probe_tokens: int | None = None
    probe_fractions: Sequence[float] | None = None
    probe_tolerance: float | None = None
    probe_all: bool = False
    config_file: str | os.PathLike | None = None
    fan_in_fan_out: str | None = None


@dataclass
class _Checked:
    """A RankReportRequest checked and resolved, for the adapter or the model path."""

    target: Path
    base: str | os.PathLike | None
    compare: str | os.PathLike | None
    amp_rank: int | None
    include_re: re.Pattern | None
    mle: bool
    device: str
    progress: ProgressCallback
    config_file: str | os.PathLike | None
    fan_in_fan_out: str | None
    intruders: tuple[int, float]  # (k, ε)


def rank_report(request: RankReportRequest, progress: ProgressCallback = no_progress) -> RankReport:
    """The rank report of `request.target` (see the module docstring)."""
    checked = _check(request, progress)
    if is_adapter(checked.target):
        with torch_threads(1 if checked.device == "cpu" else None):  # W's spectra collapse under contention
            report = _adapter_report(checked)
    else:
        report = _model_report(checked)
    report.summary = summarize(report)
    if request.probe_text is not None:
        _add_probe(report, request, checked)
    return report


def _check(request: RankReportRequest, progress: ProgressCallback) -> _Checked:
    """The request's target, --include and --intruders-* checked, its device resolved."""
    target = Path(request.target)
    if not target.exists():
        raise LoraSurgeryError(f"{target}: no such file or folder")
    include = request.include
    try:
        include_re = re.compile(include) if include else None
    except re.error as error:
        raise LoraSurgeryError(f"--include {include!r} is not a valid regular expression ({error})") from None
    device = resolve_device(request.device)
    k, eps = request.intruders_k, request.intruders_eps
    if k < 0 or not 0 < eps <= 1:
        raise LoraSurgeryError(f"--intruders-k must be ≥ 0 and --intruders-eps in (0, 1], got {k} and {eps}")
    return _Checked(
        target,
        request.base,
        request.compare,
        request.amp_rank,
        include_re,
        request.mle,
        device,
        progress,
        request.config_file,
        request.fan_in_fan_out,
        (k, eps),
    )


def _add_probe(report: RankReport, request: RankReportRequest, checked: _Checked) -> None:
    """Functional rank (probe.py): forward passes on the user's text. Imported here: the probe
    needs torch, which rank-report of W never imports (docs/architecture.md, "Lazy imports")."""
    from lorasurgery.commands.rank_report.probe import (
        DEFAULT_FRACTIONS,
        DEFAULT_TOLERANCE,
        ProbeRequest,
        functional_rank,
    )

    probe = ProbeRequest(
        checked.target,
        request.probe_text,
        base=request.base,
        tokens=request.probe_tokens,
        fractions=request.probe_fractions or DEFAULT_FRACTIONS,
        tolerance=DEFAULT_TOLERANCE if request.probe_tolerance is None else request.probe_tolerance,
        include=checked.include_re,
        device=checked.device,
        exhaustive=request.probe_all,
    )
    report.probe = functional_rank(probe, checked.progress)
    report.summary.update(report.probe.summary())
    report.notes.extend(report.probe.notes)


# -------------------------------------------------------------------------------------------------
# adapter TARGET


def _adapter_report(request: _Checked) -> RankReport:
    """The spectra of each module's ΔW (and, with --base, of its W), module by module."""
    adapter = load_adapter(request.target)
    report = RankReport(str(request.target), None if request.base is None else str(request.base), "adapter")
    bound = None
    if request.base is not None:  # each module laid out as the base stores its weight
        (bound,) = bind(
            [adapter],
            open_checkpoint(request.base),
            config_file=request.config_file,
            fan_in_fan_out=request.fan_in_fan_out,
        )
        report.assumptions = list(bound.assumptions)
        report.notes += [a.message() for a in bound.assumptions]
    compare = request.compare
    other = load_adapter(compare) if compare is not None and is_adapter(Path(compare)) else None
    if compare is not None and other is None:
        raise LoraSurgeryError(f"{compare}: --compare with an adapter TARGET needs another adapter folder")
    modules = _selected_modules(request, adapter, bound)
    if any(m.dora for m in modules):
        report.notes.append("DoRA modules: ΔW is the effective update W' − W of the merged weight (dense)")
    for done, module in enumerate(modules, start=1):
        if adapter.expert_factors(module) is not None:  # a 3-D expert parameter: one entry per expert
            W3 = bound.read_base(module.key, request.device) if bound is not None else None
            report.modules += _expert_entries(
                adapter, module, W3, request.amp_rank, request.mle, request.device
            )
        else:
            report.modules += _module_entries(request, adapter, bound, other, module)
        request.progress(Progress("rank-report", done, len(modules), module.name))
    return report


def _selected_modules(request: _Checked, adapter, bound) -> list:
    """The modules --include selects (every one without it); DoRA ones need the base."""
    loras = bound.loras if bound is not None else adapter.modules
    include_re = request.include_re
    modules = [m for m in loras.values() if include_re is None or include_re.search(m.label)]
    if not modules:
        raise LoraSurgeryError(
            f"{request.target}: no module matches --include {include_re.pattern!r}"
            if include_re
            else f"{request.target}: no LoRA modules"
        )
    dora = [m.name for m in modules if m.dora]
    if dora and bound is None:
        raise LoraSurgeryError(
            f"{request.target}: module {dora[0]} is DoRA, whose effective ΔW = W' − W depends on W; pass --base"
        )
    return modules


def _module_entries(request: _Checked, adapter, bound, other, module) -> list[ModuleEntry]:
    """ΔW's entry of one 2-D module, and W's with a base: spectra, amplification, intruders, φ."""
    import torch

    from lorasurgery.linalg.analyses import amplification
    from lorasurgery.linalg.lowrank import lowrank_svd
    from lorasurgery.linalg.svd import singular_values, truncated_svd
    from lorasurgery.linalg.update import dora_delta, factors, from_stored

    device = request.device
    f = factors(adapter, module, device)
    A2, B2 = f.A, f.B  # (r, in), (out, r)
    shape = [B2.shape[0], A2.shape[1]]  # ΔW as (out, in)
    source_dtype = A2.dtype
    W = stored = None
    if bound is not None:
        stored = bound.read_base(module.key, device)
        W = from_stored(module, stored).to(torch.float32)  # (out, in), like PEFT's ΔW = s·B@A
    # r of the amplification factor: the adapter's rank, or --amp-rank when smaller.
    r = min(module.r, request.amp_rank or module.r, *shape)
    if module.dora:
        delta = dora_delta(bound, module.key, stored, device).to(torch.float32)
        S = singular_values(delta, source_dtype=source_dtype)
        delta_fro = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        # W' − W is dense (the magnitude rescales W's rows too): its top-r vectors by SVD.
        U, _, Vh = truncated_svd(delta, r, spectrum=S, dtype=torch.float64) if delta_fro else (None,) * 3
    else:
        delta = None
        svd = lowrank_svd(A2, B2, module.scale)
        S, U, Vh = svd.S, svd.U[:, :r], svd.Vh[:r]
        delta_fro = float(torch.linalg.vector_norm(S))
    metrics = _metrics(S, shape, source_dtype)
    if request.mle:
        metrics["mle_dimension"] = _mle(B2 @ A2 * module.scale if not module.dora else delta)
    entries = [ModuleEntry(module.label, "delta", shape, metrics, S.tolist())]
    if W is not None:
        w_dtype = bound.base_dtype(module.key)
        S_W = singular_values(W, source_dtype=w_dtype)
        w_fro = float(torch.linalg.vector_norm(S_W))
        metrics["relative_norm"] = delta_fro / w_fro if w_fro else None
        if U is not None:
            metrics.update(amplification(U, Vh, delta_fro, W.to(torch.float64), S_W))
        w_metrics = _metrics(S_W, shape, w_dtype)
        # Intruders of W' = W + ΔW: a low-rank Gram update for LoRA, W' itself for DoRA.
        update = (
            {"tuned": _cpu(W + delta)} if module.dora else {"factors": (_cpu(A2), _cpu(B2), module.scale)}
        )
        metrics.update(_intruders(_cpu(W), update, request.intruders))
        if request.mle:
            w_metrics["mle_dimension"] = _mle(W)
        entries.append(ModuleEntry(module.label, "weight", shape, w_metrics, S_W.tolist()))
    if other is not None and module.key in other.modules:
        metrics.update(_compare_metrics(request, module, A2, B2, other, other.modules[module.key], shape))
    return entries


def _compare_metrics(request: _Checked, module, A2, B2, other, other_module, shape) -> dict:
    """φ and φ_delta of --compare: this module's subspaces against the other adapter's."""
    from lorasurgery.linalg.analyses import right_singular_rows, subspace_similarity
    from lorasurgery.linalg.lowrank import lowrank_svd
    from lorasurgery.linalg.update import factors

    # A DoRA module's direction part is B@A too: its φ uses A and s·B@A like LoRA's.
    f_o = factors(other, other_module, request.device)
    A_o, B_o = f_o.A, f_o.B
    if A_o.shape[1] != shape[1] or B_o.shape[0] != shape[0]:
        raise MismatchError(
            f"{request.compare}: module {module.name}: ΔW shape {[B_o.shape[0], A_o.shape[1]]} differs from "
            f"the target's {shape}"
        )
    # The paper's φ: right singular vectors of A₁ and A₂ themselves (what §7.2 and its Fig. 3/4
    # compute); φ_delta: those of ΔW₁ = s₁B₁A₁ and ΔW₂, which the B/A gauge (A → GA, B → BG⁻¹)
    # leaves unchanged. They differ for i, j < r.
    metrics = subspace_similarity(right_singular_rows(A2), right_singular_rows(A_o))
    Vh_self = lowrank_svd(A2, B2, module.scale).Vh
    Vh_other = lowrank_svd(A_o, B_o, other_module.scale).Vh
    metrics.update(subspace_similarity(Vh_self, Vh_other, name="subspace_similarity_delta"))
    return metrics


def _cpu(tensor):
    return tensor.detach().to("cpu").numpy()


def _intruders(W, update: dict, intruders: tuple[int, float]) -> dict:
    """{"intruder_dimensions", "intruder_max_cosine"} of W' against W (linalg.intruders)."""
    k, eps = intruders
    with one_blas_thread():  # one matrix per core already (see _model_report)
        return intruder_dimensions(W, k=k, eps=eps, **update).to_metrics()


def _expert_entries(adapter, module, W3, amp_rank, mle, device) -> list[ModuleEntry]:
    """A LoRA on a 3-D expert parameter: ΔW_e = s·B_e@A_e per expert (adapter/parameters.py), each
    with its own spectrum and, with the base, its expert's W_e (in (out, in))."""
    import torch

    from lorasurgery.linalg.analyses import amplification
    from lorasurgery.linalg.lowrank import lowrank_svd
    from lorasurgery.linalg.svd import singular_values
    from lorasurgery.linalg.update import from_stored

    entries = []
    label = module.label
    for e, (A, B) in enumerate(adapter.expert_factors(module, device)):
        shape = [B.shape[0], A.shape[1]]
        svd = lowrank_svd(A, B, module.scale)
        metrics = _metrics(svd.S, shape, A.dtype)
        if mle:
            metrics["mle_dimension"] = _mle(B @ A * module.scale)
        entries.append(ModuleEntry(f"{label}[{e}]", "delta", shape, metrics, svd.S.tolist()))
        if W3 is None:
            continue
        W = from_stored(module, W3)[e].to(torch.float32)  # (out, in)
        S_W = singular_values(W, source_dtype=W3.dtype)
        delta_fro = float(torch.linalg.vector_norm(svd.S))
        w_fro = float(torch.linalg.vector_norm(S_W))
        metrics["relative_norm"] = delta_fro / w_fro if w_fro else None
        r = min(module.r, amp_rank or module.r, *shape)
        metrics.update(amplification(svd.U[:, :r], svd.Vh[:r], delta_fro, W.to(torch.float64), S_W))
        w_metrics = _metrics(S_W, shape, W3.dtype)
        if mle:
            w_metrics["mle_dimension"] = _mle(W)
        entries.append(ModuleEntry(f"{label}[{e}]", "weight", shape, w_metrics, S_W.tolist()))
    return entries


def _mle(M) -> int:
    import torch

    return int(mle_dimension(M.detach().to("cpu", torch.float64)))


# -------------------------------------------------------------------------------------------------
# model TARGET (with or without a base)


def _model_report(request: _Checked) -> RankReport:
    """W's spectra of a model TARGET, or ΔW = TARGET − BASE's, one matrix per worker."""
    target, base, compare = request.target, request.base, request.compare
    checkpoint = open_checkpoint(target)
    base_ckpt = open_checkpoint(base) if base is not None else None
    other = open_checkpoint(compare) if compare is not None else None
    if other is not None and base_ckpt is None:
        raise LoraSurgeryError("--compare with a model TARGET needs --base (φ compares the two ΔW)")
    report = RankReport(str(target), None if base is None else str(base), "delta" if base_ckpt else "weight")
    names = selected_weights(checkpoint, request.include_re, request.config_file)
    experts = expert_parameters(checkpoint, request.include_re, request.config_file)  # expert by expert
    names += list(experts)
    if not names:
        raise LoraSurgeryError(
            f"{target}: no 2-D weight selected"
            + (f" by --include {request.include_re.pattern!r}" if request.include_re else "")
        )
    if base_ckpt is not None:  # every check before the first (slow) matrix: bad input fails at once
        _check_model_shapes(request, names, checkpoint, base_ckpt, other)
    entries = _model_matrices(request, names, experts, checkpoint, base_ckpt, other)
    for name in names:  # the report keeps the checkpoint's order
        report.modules.extend(entries[name])
    return report


def _check_model_shapes(request: _Checked, names, checkpoint, base_ckpt, other) -> None:
    """Each selected weight in the base (and --compare) with the target's shape."""
    for name in names:
        shape = list(checkpoint.tensors[name].shape)
        if name not in base_ckpt.tensors:
            raise MismatchError(f"{request.base}: no tensor {name!r}, which {request.target} has")
        if list(base_ckpt.tensors[name].shape) != shape:
            raise MismatchError(
                f"{request.target}: module {name[: -len('.weight')]}: shape {shape} differs from the base's "
                f"{list(base_ckpt.tensors[name].shape)}"
            )
        if other is not None and name in other.tensors and list(other.tensors[name].shape) != shape:
            raise MismatchError(
                f"{request.compare}: module {name[: -len('.weight')]}: shape {list(other.tensors[name].shape)} "
                f"differs from the target's {shape}"
            )


def _model_matrices(
    request: _Checked, names, experts, checkpoint, base_ckpt, other
) -> dict[str, list[ModuleEntry]]:
    """{weight name: its entries}, through the pipeline: numpy alone for W's singular values on the
    CPU, torch otherwise; `experts` {3-D expert parameter: stored (E, in, out)} one entry per expert."""
    device, mle = request.device, request.mle
    if (
        base_ckpt is None
        and not mle
        and device == "cpu"
        and not experts
        and all(_numpy_readable(checkpoint, n) for n in names)
    ):
        # W's metrics need singular values only: numpy alone (linalg.gram), without the 1.5–2 s
        # of importing torch in a run that otherwise takes a few seconds.

        def read(name: str):
            return read_matrix(checkpoint, name)

        def compute(name: str, X) -> list[ModuleEntry]:
            return _weight_entry(name, X, checkpoint.tensors[name])

        workers, one_torch = max(1, os.cpu_count() or 1), False  # torch is never imported here
    else:
        r = request.amp_rank or DEFAULT_AMP_RANK

        def read(name: str) -> dict:
            # One reader thread, in order: sequential I/O, and the .bin reader's shard cache is
            # not thread-safe.
            tensors = {"target": checkpoint.read(name, device)}
            if base_ckpt is not None:
                tensors["base"] = base_ckpt.read(name, device)
                if other is not None and name in other.tensors:
                    tensors["other"] = other.read(name, device)
            return tensors

        def compute(name: str, tensors: dict) -> list[ModuleEntry]:
            if name in experts:  # each expert's (out, in) matrix, an entry of its own
                entries = []
                for e in range(tensors["target"].shape[0]):
                    matrices = {k: (v[e].T if experts[name] else v[e]) for k, v in tensors.items()}
                    label = f"{name}[{e}]"
                    entries += _model_entries(
                        name, matrices, checkpoint, base_ckpt, r, mle, request.intruders, label
                    )
                return entries
            return _model_entries(name, tensors, checkpoint, base_ckpt, r, mle, request.intruders)

        workers, one_torch = _worker_count(device), device == "cpu"

    # One matrix per core, each on one BLAS/torch thread (docs/rank-report.md: the dense spectra are
    # LAPACK calls that parallelise poorly, and spinning OpenMP workers collapse on a busy machine);
    # one matrix waits for a free worker, so memory stays a few matrices whatever the model.
    entries: dict[str, list[ModuleEntry]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(one_blas_thread())
        if one_torch:
            stack.enter_context(torch_threads(1))
        pipeline = Pipeline(names, read, compute, workers=workers, depth=1, name="rank-report")
        stack.enter_context(pipeline)
        for done, (name, result) in enumerate(pipeline, 1):
            entries[name] = result
            request.progress(Progress("rank-report", done, len(names), name.removesuffix(".weight")))
    return entries


def _worker_count(device: str) -> int:
    """One worker per core on the CPU; on CUDA the GPU is the parallel part: one host thread."""
    import torch

    if device != "cpu":
        return 1

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _numpy_readable(checkpoint, name: str) -> bool:

    info = checkpoint.tensors[name]
    return info.start >= 0 and info.dtype in DTYPE_EPS


def _weight_entry(name: str, X, info) -> list[ModuleEntry]:
    """The "weight" entry of W from a numpy array (see linalg.gram)."""
    S = gram_singular_values(X)  # (min(d, n),) float64, descending
    metrics = spectrum_metrics(S, tuple(info.shape), info.dtype)
    return [ModuleEntry(name[: -len(".weight")], "weight", list(info.shape), metrics, S.tolist())]


def _model_entries(
    name,
    tensors,
    checkpoint,
    base_ckpt,
    r,
    mle,
    intruders=(DEFAULT_INTRUDERS_K, DEFAULT_INTRUDERS_EPS),
    label=None,
):
    """The "weight" entry of W, or the "delta" and "weight" entries of ΔW = target − base and W;
    `label`: an expert's (`<parameter>[e]`, its (out, in) matrix in `tensors`)."""
    import torch

    from lorasurgery.linalg.analyses import amplification, subspace_similarity
    from lorasurgery.linalg.svd import singular_values, truncated_svd

    module = label or name[: -len(".weight")]
    info = checkpoint.tensors[name]
    shape = list(tensors["target"].shape)
    if base_ckpt is None:
        W = tensors["target"].to(torch.float32)
        S = singular_values(W, source_dtype=info.torch_dtype)
        metrics = _metrics(S, shape, info.torch_dtype)
        if mle:
            metrics["mle_dimension"] = _mle(W)
        return [ModuleEntry(module, "weight", shape, metrics, S.tolist())]
    W = tensors["base"].to(torch.float32)
    delta = tensors["target"].to(torch.float32) - W
    S = singular_values(delta, source_dtype=info.torch_dtype)
    S_W = singular_values(W, source_dtype=base_ckpt.tensors[name].torch_dtype)
    metrics = _metrics(S, shape, info.torch_dtype)
    delta_fro, w_fro = float(torch.linalg.vector_norm(S)), float(torch.linalg.vector_norm(S_W))
    metrics["relative_norm"] = delta_fro / w_fro if w_fro else None
    k = min(r, min(shape))
    if delta_fro > 0:
        U, _, Vh = truncated_svd(delta, k, spectrum=S)
        metrics.update(amplification(U[:, :k].double(), Vh[:k].double(), delta_fro, W.double(), S_W))
        if "other" in tensors:
            delta_o = tensors["other"].to(torch.float32) - W
            if float(torch.linalg.vector_norm(delta_o)) > 0:
                _, _, Vh_o = truncated_svd(delta_o, k)
                # A dense ΔW has no A: both definitions use ΔW's right singular vectors.
                similarity = subspace_similarity(Vh[:k].double(), Vh_o[:k].double())
                metrics.update(similarity)
                metrics.update(
                    {key.replace("similarity", "similarity_delta"): v for key, v in similarity.items()}
                )
    metrics.update(_intruders(_cpu(W), {"tuned": _cpu(tensors["target"].to(torch.float32))}, intruders))
    if mle:
        metrics["mle_dimension"] = _mle(delta)
    w_metrics = _metrics(S_W, shape, base_ckpt.tensors[name].torch_dtype)
    return [
        ModuleEntry(module, "delta", shape, metrics, S.tolist()),
        ModuleEntry(module, "weight", shape, w_metrics, S_W.tolist()),
    ]


# -------------------------------------------------------------------------------------------------
# summary

SUMMARY_METRICS = (
    "stable_rank",
    "effective_rank",
    "energy_rank_90",
    "energy_rank_99",
    "optimal_rank",
    "numerical_rank",
    "relative_norm",
    "amplification",
    "subspace_similarity_1_1",
    "subspace_similarity_delta_1_1",
    "intruder_dimensions",
)


def summarize(report: RankReport) -> dict:
    """Mean/min/max of the key metrics per (module type, kind): the table's rows."""
    groups: dict[str, dict] = {}
    for entry in report.modules:
        key = f"{module_type(entry.name)}:{entry.kind}"
        group = groups.setdefault(
            key, {"module_type": module_type(entry.name), "kind": entry.kind, "count": 0, "metrics": {}}
        )
        group["count"] += 1
        for metric in SUMMARY_METRICS:
            value = entry.metrics.get(metric)
            if isinstance(value, (int, float)):
                group["metrics"].setdefault(metric, []).append(float(value))
    for group in groups.values():
        intruders = group["metrics"].get("intruder_dimensions")
        group["metrics"] = {
            m: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for m, v in group["metrics"].items()
        }
        if intruders is not None:  # the table's count per module type
            group["metrics"]["intruder_dimensions"]["total"] = int(sum(intruders))
    return {
        "mode": report.mode,
        "modules": len({e.name for e in report.modules}),
        "by_type": list(groups.values()),
        "notes": report.notes,
    }
