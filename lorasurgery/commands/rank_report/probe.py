"""Functional rank: what a model loses when the matrices of one module type lose rank.

`rank-report --probe --text FILE` (docs/rank-report.md, "Functional rank"):
- model alone ("weight"): every W of type t replaced by its best rank-⌈f·min(d, n)⌉ approximation,
  all other matrices intact; the mean next-token loss L(f) against the intact model's L₀. The
  functional rank of t is the smallest probed f with (L(f) − L₀)/L₀ ≤ tolerance.
- base + fine-tune or adapter ("delta"): every ΔW of type t truncated to rank ⌈f·rank(ΔW)⌉ (r for
  an adapter, min(d, n) for a dense ΔW), W + ΔW elsewhere; the share of the fine-tune's effect
  kept, 1 − KL(ft‖truncated)/KL(ft‖base). Functional rank: the smallest f keeping ≥ 1 − tolerance.
Cost is forward passes: each matrix's SVD is computed once for all fractions, one module type at a
time (memory: one type's factors), and the fractions of a type are searched by bisection — the
loss is taken to fall (the kept effect to rise) with the rank, so ⌈log₂(#fractions + 1)⌉ passes
per type find the smallest passing fraction instead of one pass per fraction. The reference
passes (intact model, fine-tune, base) are run once and reused.

The model is loaded by `lorasurgery.causal_lm.load_causal_lm`, shared with `extract --calibrate`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import bind
from lorasurgery.causal_lm import load_causal_lm
from lorasurgery.commands.rank_report.targets import is_adapter, selected_weights
from lorasurgery.concurrency import ordered_map, torch_threads
from lorasurgery.errors import LoraSurgeryError
from lorasurgery.io import open_checkpoint
from lorasurgery.linalg.lowrank import lowrank_svd
from lorasurgery.linalg.update import dora_delta, factors, from_stored, to_stored
from lorasurgery.naming import module_type as type_of
from lorasurgery.progress import Progress, ProgressCallback, no_progress
from lorasurgery.textdata import DEFAULT_TOKENS, token_ids, token_windows

DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75)
DEFAULT_TOLERANCE = 0.01


class Forward:
    """Forward passes of one model over fixed token windows: mean next-token loss, log-probs, KL.

    On the CPU the windows run in parallel, one per core, each on one torch thread (the caller runs
    it inside lorasurgery.concurrency.torch_threads(1)): OpenMP threads splitting each matmul spin
    on a busy machine and make each pass several times slower (docs/rank-report.md). At most
    `workers` windows' logits are held at once.
    """

    def __init__(self, model, windows: list, device: str = "cpu", workers: int | None = None):
        self.model = model
        self.windows = [w.to(device) for w in windows]  # [(1, L) LongTensor]
        self.positions = sum(w.shape[1] - 1 for w in self.windows)
        self.passes = 0
        self.workers = workers or (max(1, os.cpu_count() or 1) if device == "cpu" else 1)

    def _run(self, window):

        with torch.inference_mode():  # thread-local: entered in the worker
            return window, self.model(window).logits[0, :-1].float()  # (L − 1, vocab)

    def _logits(self):

        self.passes += 1
        return ordered_map(self._run, self.windows, self.workers, name="probe")

    def loss(self) -> float:
        """Mean next-token cross-entropy in nats/token over every window."""
        total = 0.0
        for window, logits in self._logits():
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        return total / self.positions

    def log_probs(self) -> list:
        """[(L − 1, vocab) float32 on the CPU]: the reference distribution of a KL."""
        return [torch.log_softmax(logits, -1).cpu() for _, logits in self._logits()]

    def kl_from(self, reference: list) -> float:
        """Mean over positions of KL(reference ‖ this model), nats/token."""
        total = 0.0
        for (_, logits), ref in zip(self._logits(), reference):
            log_q = torch.log_softmax(logits, -1).cpu()
            total += float((ref.exp() * (ref - log_q)).sum(dtype=torch.float64))
        return total / self.positions


@dataclass
class _Matrix:
    """One parameter of the model whose matrix M (W or ΔW, (out, in)) is truncated."""

    name: str
    parameter: object  # the model's torch Parameter
    full: int  # rank at f = 1 (min(d, n) or r)
    lora: object  # the bound LoraModule whose layout M's (out, in) is (linalg.update), or None: M is
    # the parameter as stored, flattened to 2-D
    source: object  # callable () -> (M (out, in) float32, U, S, Vh) or None when low-rank exact


@dataclass
class TypeCurve:
    module_type: str
    matrices: int
    points: list[dict] = field(default_factory=list)  # {"fraction", "rank", "loss" | "kept_effect"}
    functional_rank: float = 1.0  # the smallest passing fraction; 1.0 when none of the probed passes

    def to_json(self) -> dict:
        return {
            "module_type": self.module_type,
            "matrices": self.matrices,
            "functional_rank": self.functional_rank,
            "points": sorted(self.points, key=lambda p: p["fraction"]),
        }


@dataclass
class ProbeResult:
    mode: str  # "weight" | "delta"
    text: str
    tokens: int
    fractions: list[float]
    tolerance: float
    reference: dict  # weight: {"loss"}; delta: {"loss_finetuned", "loss_base", "kl_finetuned_base"}
    curves: list[TypeCurve]
    passes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "text": self.text,
            "tokens": self.tokens,
            "fractions": self.fractions,
            "tolerance": self.tolerance,
            "reference": self.reference,
            "passes": self.passes,
            "seconds": self.seconds,
            "curves": [c.to_json() for c in self.curves],
        }

    def summary(self) -> dict:
        return {f"functional_rank_{c.module_type}": c.functional_rank for c in self.curves}


def _rank_at(fraction: float, full: int) -> int:
    return max(1, min(full, math.ceil(fraction * full - 1e-9)))


def _as_matrix(matrix: _Matrix, value):
    """A parameter's value as its matrix M ((out, in) of a LoRA module)."""
    return from_stored(matrix.lora, value) if matrix.lora is not None else value.reshape(value.shape[0], -1)


def _as_stored(matrix: _Matrix, M, shape):

    return to_stored(matrix.lora, M, shape) if matrix.lora is not None else M.reshape(shape)


class _Truncator:
    """Sets every matrix of one module type to offset + its rank-k approximation, and restores it."""

    def __init__(self, matrices: list[_Matrix]):

        self.items = []
        for matrix in matrices:
            original = matrix.parameter.detach().clone()
            M, U, S, Vh = matrix.source()
            offset = _as_matrix(matrix, original).reshape(M.shape) - M
            self.items.append(
                (matrix, original, offset, U.to(torch.float32), S.to(torch.float32), Vh.to(torch.float32))
            )

    def set_fraction(self, fraction: float) -> int:
        ranks = []
        for matrix, original, offset, U, S, Vh in self.items:
            k = _rank_at(fraction, matrix.full)
            head = offset + (U[:, :k] * S[:k]) @ Vh[:k]  # (out, in)
            matrix.parameter.data.copy_(_as_stored(matrix, head, original.shape))
            ranks.append(k)
        return round(sum(ranks) / len(ranks))

    def restore(self) -> None:
        for matrix, original, *_ in self.items:
            matrix.parameter.data.copy_(original)


def bisect_fractions(fractions: list[float], passes, exhaustive: bool = False) -> tuple[float, list]:
    """The smallest fraction f in ascending `fractions` with passes(f), assuming monotonicity; 1.0
    when none passes. Calls passes() ⌈log₂(len + 1)⌉ times at most (every fraction if exhaustive)."""
    if exhaustive:
        results = [passes(f) for f in fractions]
        first = next((f for f, ok in zip(fractions, results) if ok), 1.0)
        return first, results
    low, high = 0, len(fractions)  # the answer's index lies in [low, high]; len means "none"
    while low < high:
        middle = (low + high) // 2
        if passes(fractions[middle]):
            high = middle
        else:
            low = middle + 1
    return (fractions[low] if low < len(fractions) else 1.0), []


@dataclass(frozen=True)
class ProbeRequest:
    """What `rank-report --probe` was asked: TARGET (a model, or an adapter), --text, --base …"""

    target: str | os.PathLike
    text: str | os.PathLike
    base: str | os.PathLike | None = None
    tokens: int | None = None
    fractions: tuple = DEFAULT_FRACTIONS
    tolerance: float = DEFAULT_TOLERANCE
    include: object = None
    device: str = "cpu"
    exhaustive: bool = False


def run_probe(
    forward: Forward,
    groups: dict[str, list[_Matrix]],
    request: ProbeRequest,
    *,
    mode: str,
    reference: dict,
    ft_log_probs=None,
    progress: ProgressCallback = no_progress,
    started: float | None = None,
) -> ProbeResult:
    """Bisect each module type's fractions on the model in `forward` (already the intact/fine-tuned one),
    as `request` asks (its fractions, tolerance, exhaustive)."""
    fractions = sorted({float(f) for f in request.fractions})
    tolerance, exhaustive = request.tolerance, request.exhaustive
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise LoraSurgeryError(f"--probe-fractions must lie in (0, 1], got {fractions}")
    started = time.perf_counter() if started is None else started
    per_type = len(fractions) if exhaustive else math.ceil(math.log2(len(fractions) + 1))
    total = forward.passes + per_type * len(groups)
    curves = []
    for module_type, matrices in groups.items():
        curve = TypeCurve(module_type, len(matrices))
        truncator = _Truncator(matrices)
        try:

            def passes(fraction: float, curve=curve, truncator=truncator, module_type=module_type) -> bool:
                rank = truncator.set_fraction(fraction)
                if mode == "weight":
                    loss = forward.loss()
                    rise = (loss - reference["loss"]) / reference["loss"]
                    curve.points.append({"fraction": fraction, "rank": rank, "loss": loss, "loss_rise": rise})
                    ok = rise <= tolerance
                else:
                    kept = 1 - forward.kl_from(ft_log_probs) / reference["kl_finetuned_base"]
                    curve.points.append({"fraction": fraction, "rank": rank, "kept_effect": kept})
                    ok = kept >= 1 - tolerance
                progress(Progress("probe", forward.passes, total, f"{module_type} f={fraction:g}"))
                return ok

            curve.functional_rank, _ = bisect_fractions(fractions, passes, exhaustive)
        finally:
            truncator.restore()
        curves.append(curve)
    tokens = forward.positions + len(forward.windows)
    return ProbeResult(
        mode,
        str(request.text),
        tokens,
        fractions,
        tolerance,
        reference,
        curves,
        forward.passes,
        time.perf_counter() - started,
    )


# -------------------------------------------------------------------------------------------------
# the three rank-report modes


def functional_rank(request: ProbeRequest, progress: ProgressCallback = no_progress) -> ProbeResult:
    """The probe of `rank-report --probe`: TARGET a model (alone, or with --base) or an adapter (with --base)."""
    started = time.perf_counter()
    base = None if request.base is None else Path(request.base)
    request = replace(request, target=Path(request.target), base=base, fractions=tuple(request.fractions))
    device = request.device
    # One window per core instead of torch's threads splitting each matmul (Forward).
    with torch_threads(1 if device == "cpu" else None):
        return _functional_rank(request, progress, started)


def _functional_rank(request: ProbeRequest, progress, started) -> ProbeResult:
    target, base, device = request.target, request.base, request.device
    adapter_mode = is_adapter(target)
    if adapter_mode and base is None:
        raise LoraSurgeryError(f"{target}: --probe of an adapter needs --base (the model it applies to)")
    model_folder = base if adapter_mode else target
    if not (model_folder / "config.json").is_file():
        raise LoraSurgeryError(
            f"{model_folder}: --probe needs a transformers model folder (config.json and weights)"
        )
    # Every model read is opened (headers only) before the tokenizer and transformers start: a
    # quantized or malformed checkpoint is refused by name first (docs/design.md §13).
    for model_path in ([] if adapter_mode else [target]) + ([] if base is None else [base]):
        open_checkpoint(model_path)
    ids = token_ids(base if base is not None else target, request.text, request.tokens or DEFAULT_TOKENS)
    model = load_causal_lm(model_folder, device)
    windows = token_windows(ids, getattr(model.config, "max_position_embeddings", None))
    forward = Forward(model, windows, device)
    notes: list[str] = []

    if base is None:  # W itself
        groups = _weight_groups(request, model)
        reference, ft_log_probs, mode = {"loss": forward.loss()}, None, "weight"
        progress(Progress("probe", forward.passes, 0, "intact model"))
    elif not adapter_mode:  # ΔW = W_target − W_base, dense
        groups = _delta_groups(request, model)
        ft_log_probs, reference = _fine_tune_references(forward, base, windows, device)
        mode = "delta"
    else:  # adapter: W + s·B@A applied here, so that the fine-tune is base + exactly the adapter's ΔW
        groups, ft_log_probs, reference = _adapter_groups(
            target, base, request.include, model, forward, device, notes
        )
        mode = "delta"
    if not groups:
        raise LoraSurgeryError(f"{target}: no matrix selected for --probe")
    if mode == "delta":
        if reference["kl_finetuned_base"] <= 0:
            raise LoraSurgeryError(
                f"{target}: the fine-tune's output equals the base's on --text: nothing to keep"
            )
        progress(Progress("probe", forward.passes, 0, "references"))
    result = run_probe(
        forward,
        groups,
        request,
        mode=mode,
        reference=reference,
        ft_log_probs=ft_log_probs,
        progress=progress,
        started=started,
    )
    result.notes = notes
    return result


def _parameter(model, name: str, where: Path):
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise LoraSurgeryError(f"{where}: tensor {name!r} is not a parameter of the loaded model") from None


def _dense_source(parameter, offset):
    """The SVD source of a dense matrix: the parameter (2-D view) less `offset()` (0, or W_base)."""

    def source():
        M = parameter.detach().to(torch.float32)
        M = M.reshape(M.shape[0], -1) - offset()
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return M, U, S, Vh

    return source


def _weight_groups(request: ProbeRequest, model) -> dict[str, list[_Matrix]]:
    """The selected weights W of the target model, by module type."""
    groups: dict[str, list[_Matrix]] = {}
    checkpoint = open_checkpoint(request.target)
    for name in selected_weights(checkpoint, request.include):
        p = _parameter(model, name, request.target)
        matrix = _Matrix(name, p, min(p.shape[0], p[0].numel()), None, _dense_source(p, lambda: 0.0))
        groups.setdefault(type_of(name[: -len(".weight")]), []).append(matrix)
    return groups


def _delta_groups(request: ProbeRequest, model) -> dict[str, list[_Matrix]]:
    """ΔW = W_target − W_base of every selected weight the base also has, by module type."""
    groups: dict[str, list[_Matrix]] = {}
    checkpoint, base_ckpt = open_checkpoint(request.target), open_checkpoint(request.base)
    for name in selected_weights(checkpoint, request.include):
        if name not in base_ckpt.tensors:
            continue
        p = _parameter(model, name, request.target)

        def base_weight(name=name, p=p):
            return base_ckpt.read(name, request.device).to(torch.float32).reshape(p.shape[0], -1)

        matrix = _Matrix(name, p, min(p.shape[0], p[0].numel()), None, _dense_source(p, base_weight))
        groups.setdefault(type_of(name[: -len(".weight")]), []).append(matrix)
    return groups


def _fine_tune_references(forward: Forward, base: Path, windows, device: str):
    """The fine-tune's log-probs, and its loss, the base's loss and their KL: what truncating keeps."""
    ft_log_probs = forward.log_probs()
    loss_ft = _loss_from(ft_log_probs, windows)
    base_forward = Forward(load_causal_lm(base, device), windows, device)
    kl = base_forward.kl_from(ft_log_probs)
    loss_base = base_forward.loss()
    forward.passes += base_forward.passes
    del base_forward
    return ft_log_probs, {"loss_finetuned": loss_ft, "loss_base": loss_base, "kl_finetuned_base": kl}


def _loss_from(log_probs: list, windows: list) -> float:
    total = sum(-float(lp.gather(1, w[0, 1:, None].cpu()).sum()) for lp, w in zip(log_probs, windows))
    return total / sum(w.shape[1] - 1 for w in windows)


def _adapter_groups(target, base, include, model, forward, device, notes):
    """Matrices of an adapter's modules on the base model, the fine-tune's log-probs and the references."""
    (bound,) = bind([load_adapter(target)], open_checkpoint(base))
    notes += [a.message() for a in bound.assumptions]
    loss_base = forward.loss()
    groups, changed = tune(model, bound, include, device)
    if any(module.lora.dora for module in bound.modules.values()):
        notes.append(
            "DoRA modules: the effective ΔW = W' − W is truncated (a dense matrix, fraction of min(d, n))"
        )
    if bound.saved or bound.tokens or any(m.lora.lora_bias for m in bound.modules.values()):
        notes.append(
            "the adapter's saved tensors (modules_to_save, biases), trainable tokens and lora_B biases are "
            "applied as in the fine-tune and kept whole; only the LoRA modules' ΔW is truncated"
        )
    ft_log_probs = forward.log_probs()
    loss_ft = _loss_from(ft_log_probs, forward.windows)
    # KL(ft‖base): the base's pass, with every parameter the adapter changed set back for it.
    for parameter_, base_value, _ in changed:
        parameter_.data.copy_(base_value)
    kl = forward.kl_from(ft_log_probs)
    for parameter_, _, tuned_value in changed:
        parameter_.data.copy_(tuned_value)
    reference = {"loss_finetuned": loss_ft, "loss_base": loss_base, "kl_finetuned_base": kl}
    return groups, ft_log_probs, reference


def tune(model, bound, include=None, device: str = "cpu"):
    """Make `model` (the base, as transformers loaded it) the fine-tune that `bound` (a BoundAdapter,
    lorasurgery.binding) describes, as PEFT's model computes it: saved tensors replace the base's
    (modules_to_save copies untied from a tie, saved base layers shared with it), every LoRA module
    adds its ΔW in the layout the base stores the weight (DoRA: its effective W' − W), lora_B biases
    add s·b, trainable tokens overwrite their rows. Returns ({module type: [_Matrix]} of the LoRA
    modules whose label matches `include`, [(parameter, base value, tuned value)] of what changed)."""
    parameters = _Parameters(model, bound)
    _apply_saved(bound, parameters)
    groups: dict[str, list[_Matrix]] = {}
    for key, module in bound.modules.items():
        matrix = _apply_lora(bound, key, module, parameters, device)
        if include is None or include.search(module.lora.label):
            groups.setdefault(type_of(module.lora.label), []).append(matrix)
    _apply_tokens(bound, parameters)
    return groups, parameters.changed()


class _Parameters:
    """The model's parameters as `tune` changes them: each remembered with its base value; with
    `own`, one side of a tie untied first (PEFT's forward changes that side only)."""

    def __init__(self, model, bound):
        self.model, self.bound = model, bound
        self.shared: dict[int, int] = {}  # id(parameter) -> how many names it has
        for _, p in model.named_parameters(remove_duplicate=False):
            self.shared[id(p)] = self.shared.get(id(p), 0) + 1
        self.originals: dict[int, tuple] = {}

    def get(self, name: str, own: bool = False):
        """The model's parameter `name`, remembered as changed; `own`: untied from a tie first."""
        try:
            p = self.model.get_parameter(name)
        except AttributeError:
            raise LoraSurgeryError(
                f"{self.bound.checkpoint.path}: tensor {name!r} is not a parameter of the loaded model"
            ) from None
        if own and self.shared.get(id(p), 1) > 1:
            path, _, leaf = name.rpartition(".")
            p = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            setattr(self.model.get_submodule(path), leaf, p)
        self.originals.setdefault(id(p), (p, p.detach().clone()))
        return p

    def changed(self) -> list[tuple]:
        """[(parameter, base value, tuned value)] of every parameter changed."""
        return [(p, base_value, p.detach().clone()) for p, base_value in self.originals.values()]


def _apply_saved(bound, parameters: _Parameters) -> None:
    """The adapter's saved tensors replace the base's (modules_to_save copies untied from a tie, saved
    base layers shared with it)."""
    for saved in bound.saved:
        if saved.name is None:
            raise LoraSurgeryError(
                f"{bound.path}: saved tensor {saved.relative} has no counterpart in the base; --probe cannot "
                f"add it to the model"
            )
        p = parameters.get(saved.name, own=not saved.base_layer)
        value = bound.adapter.read(saved.key)
        if tuple(value.shape) != tuple(p.shape):
            raise LoraSurgeryError(
                f"{bound.path}: saved tensor {saved.relative} has shape {list(value.shape)} but the base's "
                f"{saved.name} has {list(p.shape)}; --probe does not resize the model (merge it instead)"
            )
        p.data.copy_(value.to(p.dtype))


def _apply_lora(bound, key: str, module, parameters: _Parameters, device: str) -> _Matrix:
    """Add LoRA module `key`'s ΔW to its base weight in the layout the base stores it (DoRA: its
    effective W' − W) and its lora_B bias s·b; returns the module as a _Matrix with ΔW's SVD."""
    adapter, lora = bound.adapter, module.lora
    if lora.kind == "parameter" and lora.experts:
        raise LoraSurgeryError(
            f"{bound.path}: module {key}: --probe does not handle LoRA on expert parameters yet"
        )
    # a per-expert module: its slice of the fused parameter the loaded model has (model/experts.py),
    # bound to it, or stored as a tensor of its own that transformers fuses when loading
    slot = lora.slot or bound.structure.expert_slice(module.name)
    p = parameters.get(slot.parameter if slot is not None else module.name, own=True)
    if slot is not None:
        p = slot.view(p.data)  # a view: writing it writes the model's parameter
    f = factors(adapter, lora, device)
    W = from_stored(lora, p.detach()).to(torch.float32)  # (out, in), like ΔW = s·B@A
    if lora.dora:
        delta = dora_delta(bound, key, p.detach(), device).to(torch.float32)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        full = min(delta.shape)
    else:
        svd = lowrank_svd(f.A.to(torch.float32), f.B.to(torch.float32), lora.scale)
        U, S, Vh = (t.to(torch.float32) for t in (svd.U, svd.S, svd.Vh))
        delta = (U * S) @ Vh
        full = len(S)
    p.data.copy_(to_stored(lora, W + delta, p.shape))
    if lora.lora_bias:
        bias = parameters.get(module.name[: -len("weight")] + "bias", own=True)
        bias.data.add_(adapter.read_lora_bias(lora, device).to(bias.dtype), alpha=lora.scale)

    def source(delta=delta, U=U, S=S, Vh=Vh):
        return delta, U, S, Vh

    return _Matrix(module.name, p, full, lora, source)


def _apply_tokens(bound, parameters: _Parameters) -> None:
    """Trainable tokens overwrite their rows."""
    for tokens in bound.tokens.values():
        p = parameters.get(tokens.name)
        rows = torch.tensor(tokens.rows.indices, dtype=torch.long)
        p.data[rows] = bound.adapter.read(tokens.rows.key).to(device=p.device, dtype=p.dtype)
