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

The forward-pass machinery (`load_causal_lm`, `Forward`) is shared with `extract --calibrate`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import LoraSurgeryError
from lorasurgery.progress import Progress, ProgressCallback, no_progress

DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75)
DEFAULT_TOLERANCE = 0.01


def load_causal_lm(folder: str | os.PathLike, device: str = "cpu"):
    """The checkpoint in `folder` as a float32 transformers causal LM in eval mode, local files only.

    A quantized checkpoint is read as every command reads it (docs/design.md §13): dequantized by
    lorasurgery's reader (io.pretrained), or refused by name, not left to transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lorasurgery.io.pretrained import from_pretrained

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no "Loading weights" chatter: the core never prints
    hf_logging.disable_progress_bar()
    try:
        model = from_pretrained(AutoModelForCausalLM, folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise LoraSurgeryError(f"{folder}: transformers cannot load it as a causal LM ({error})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return model.to(device).eval()


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
        import torch

        with torch.inference_mode():  # thread-local: entered in the worker
            return window, self.model(window).logits[0, :-1].float()  # (L − 1, vocab)

    def _logits(self):
        from lorasurgery.concurrency import ordered_map

        self.passes += 1
        return ordered_map(self._run, self.windows, self.workers, name="probe")

    def loss(self) -> float:
        """Mean next-token cross-entropy in nats/token over every window."""
        import torch

        total = 0.0
        for window, logits in self._logits():
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        return total / self.positions

    def log_probs(self) -> list:
        """[(L − 1, vocab) float32 on the CPU]: the reference distribution of a KL."""
        import torch

        return [torch.log_softmax(logits, -1).cpu() for _, logits in self._logits()]

    def kl_from(self, reference: list) -> float:
        """Mean over positions of KL(reference ‖ this model), nats/token."""
        import torch

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
    transpose: bool  # the parameter is stored (in, out) (GPT-2 Conv1D, embeddings)
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


class _Truncator:
    """Sets every matrix of one module type to offset + its rank-k approximation, and restores it."""

    def __init__(self, matrices: list[_Matrix]):
        import torch

        self.items = []
        for matrix in matrices:
            original = matrix.parameter.detach().clone()
            M, U, S, Vh = matrix.source()
            offset = (original if not matrix.transpose else original.T).reshape(M.shape) - M
            self.items.append(
                (matrix, original, offset, U.to(torch.float32), S.to(torch.float32), Vh.to(torch.float32))
            )

    def set_fraction(self, fraction: float) -> int:
        ranks = []
        for matrix, original, offset, U, S, Vh in self.items:
            k = _rank_at(fraction, matrix.full)
            head = offset + (U[:, :k] * S[:k]) @ Vh[:k]  # (out, in)
            value = head.T if matrix.transpose else head
            matrix.parameter.data.copy_(value.reshape(original.shape))
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


def run_probe(
    forward: Forward,
    groups: dict[str, list[_Matrix]],
    *,
    mode: str,
    text: str,
    fractions=DEFAULT_FRACTIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: dict,
    ft_log_probs=None,
    progress: ProgressCallback = no_progress,
    started: float | None = None,
    exhaustive: bool = False,
) -> ProbeResult:
    """Bisect each module type's fractions on the model in `forward` (already the intact/fine-tuned one)."""
    fractions = sorted({float(f) for f in fractions})
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
        text,
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


def functional_rank(
    target: str | os.PathLike,
    *,
    text: str | os.PathLike,
    base: str | os.PathLike | None = None,
    tokens: int | None = None,
    fractions=DEFAULT_FRACTIONS,
    tolerance: float = DEFAULT_TOLERANCE,
    include=None,
    device: str = "cpu",
    exhaustive: bool = False,
    progress: ProgressCallback = no_progress,
) -> ProbeResult:
    """The probe of `rank-report --probe`: TARGET a model (alone, or with --base) or an adapter (with --base)."""
    from lorasurgery.concurrency import torch_threads

    started = time.perf_counter()
    # One window per core instead of torch's threads splitting each matmul (Forward).
    with torch_threads(1 if device == "cpu" else None):
        return _functional_rank(
            target, text, base, tokens, fractions, tolerance, include, device, exhaustive, progress, started
        )


def _functional_rank(
    target, text, base, tokens, fractions, tolerance, include, device, exhaustive, progress, started
):
    import torch

    from lorasurgery.io import open_checkpoint
    from lorasurgery.operations.rank_report import _is_adapter, _selected_weights, module_type
    from lorasurgery.textdata import DEFAULT_TOKENS, token_ids, token_windows

    target = Path(target)
    adapter_mode = _is_adapter(target)
    if adapter_mode and base is None:
        raise LoraSurgeryError(f"{target}: --probe of an adapter needs --base (the model it applies to)")
    model_folder = Path(base) if adapter_mode else target
    if not (model_folder / "config.json").is_file():
        raise LoraSurgeryError(
            f"{model_folder}: --probe needs a transformers model folder (config.json and weights)"
        )
    # Every model read is opened (headers only) before the tokenizer and transformers start: a
    # quantized or malformed checkpoint is refused by name first (docs/design.md §13).
    for model_path in ([] if adapter_mode else [target]) + ([] if base is None else [base]):
        open_checkpoint(model_path)
    ids = token_ids(Path(base) if base is not None else target, text, tokens or DEFAULT_TOKENS)
    model = load_causal_lm(model_folder, device)
    windows = token_windows(ids, getattr(model.config, "max_position_embeddings", None))
    forward = Forward(model, windows, device)
    notes: list[str] = []
    ft_log_probs = None

    def parameter(name: str, where: Path):
        try:
            return model.get_parameter(name)
        except AttributeError:
            raise LoraSurgeryError(
                f"{where}: tensor {name!r} is not a parameter of the loaded model"
            ) from None

    def dense_source(parameter_, offset_fn):
        def source():
            M = parameter_.detach().to(torch.float32)
            M = M.reshape(M.shape[0], -1) - offset_fn()
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            return M, U, S, Vh

        return source

    groups: dict[str, list[_Matrix]] = {}
    if base is None:  # W itself
        checkpoint = open_checkpoint(target)
        for name in _selected_weights(checkpoint, include):
            p = parameter(name, target)
            matrix = _Matrix(name, p, min(p.shape[0], p[0].numel()), False, dense_source(p, lambda: 0.0))
            groups.setdefault(module_type(name[: -len(".weight")]), []).append(matrix)
        reference = {"loss": forward.loss()}
        progress(Progress("probe", forward.passes, 0, "intact model"))
        mode = "weight"
    elif not adapter_mode:  # ΔW = W_target − W_base, dense
        checkpoint, base_ckpt = open_checkpoint(target), open_checkpoint(base)
        for name in _selected_weights(checkpoint, include):
            if name not in base_ckpt.tensors:
                continue
            p = parameter(name, target)

            def base_weight(name=name, p=p):
                return base_ckpt.read(name, device).to(torch.float32).reshape(p.shape[0], -1)

            matrix = _Matrix(name, p, min(p.shape[0], p[0].numel()), False, dense_source(p, base_weight))
            groups.setdefault(module_type(name[: -len(".weight")]), []).append(matrix)
        ft_log_probs = forward.log_probs()
        loss_ft = _loss_from(ft_log_probs, windows)
        base_forward = Forward(load_causal_lm(base, device), windows, device)
        kl = base_forward.kl_from(ft_log_probs)
        loss_base = base_forward.loss()
        forward.passes += base_forward.passes
        del base_forward
        reference = {"loss_finetuned": loss_ft, "loss_base": loss_base, "kl_finetuned_base": kl}
        mode = "delta"
    else:  # adapter: W + s·B@A applied here, so that the fine-tune is base + exactly the adapter's ΔW
        groups, ft_log_probs, reference = _adapter_groups(
            target, base, include, model, forward, device, notes
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
        mode=mode,
        text=str(text),
        fractions=fractions,
        tolerance=tolerance,
        reference=reference,
        ft_log_probs=ft_log_probs if mode == "delta" else None,
        progress=progress,
        started=started,
        exhaustive=exhaustive,
    )
    result.notes = notes
    return result


def _loss_from(log_probs: list, windows: list) -> float:
    total = sum(-float(lp.gather(1, w[0, 1:, None].cpu()).sum()) for lp, w in zip(log_probs, windows))
    return total / sum(w.shape[1] - 1 for w in windows)


def _adapter_groups(target, base, include, model, forward, device, notes):
    """Matrices of an adapter's modules on the base model, the fine-tune's log-probs and the references."""
    import torch

    from lorasurgery.adapter import load_adapter, resolve_base_names
    from lorasurgery.io import open_checkpoint
    from lorasurgery.linalg.lowrank import lowrank_svd
    from lorasurgery.operations.rank_report import _dora_effective_delta, module_type

    adapter = load_adapter(target)
    checkpoint = open_checkpoint(base)
    mapping = resolve_base_names(adapter, checkpoint)
    modules = [m for m in adapter.modules.values() if include is None or include.search(m.name)]
    loss_base = forward.loss()
    groups: dict[str, list[_Matrix]] = {}
    for module in modules:
        name = mapping[module.name]
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise LoraSurgeryError(
                f"{base}: tensor {name!r} is not a parameter of the loaded model"
            ) from None
        transpose = bool(module.fan_in_fan_out or module.kind == "embedding")
        A, B = adapter.read_factors(module.name, device)
        A2, B2 = A.reshape(A.shape[0], -1).to(torch.float32), B.reshape(B.shape[0], -1).to(torch.float32)
        W = (p.detach().T if transpose else p.detach()).reshape(B2.shape[0], -1).to(torch.float32)
        if module.dora:
            delta = _dora_effective_delta(adapter, module, W, device)
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            full = min(delta.shape)
        else:
            svd = lowrank_svd(A2, B2, module.scale)
            U, S, Vh = (t.to(torch.float32) for t in (svd.U, svd.S, svd.Vh))
            delta = (U * S) @ Vh
            full = len(S)
        tuned = W + delta
        p.data.copy_((tuned.T if transpose else tuned).reshape(p.shape))

        def source(delta=delta, U=U, S=S, Vh=Vh):
            return delta, U, S, Vh

        groups.setdefault(module_type(module.name), []).append(_Matrix(name, p, full, transpose, source))
    if any(m.dora for m in modules):
        notes.append(
            "DoRA modules: the effective ΔW = W' − W is truncated (a dense matrix, fraction of min(d, n))"
        )
    if adapter.config.modules_to_save:
        notes.append("modules_to_save are not applied: the fine-tune here is the base plus the adapter's ΔW")
    ft_log_probs = forward.log_probs()
    loss_ft = _loss_from(ft_log_probs, forward.windows)
    # KL(ft‖base): the base's pass, with the adapter's matrices set back to W for it.
    saved = [(m.parameter, m.parameter.detach().clone()) for ms in groups.values() for m in ms]
    for ms in groups.values():
        for m in ms:
            delta, *_ = m.source()
            value = m.parameter.detach()
            current = (value.T if m.transpose else value).reshape(delta.shape) - delta
            m.parameter.data.copy_((current.T if m.transpose else current).reshape(value.shape))
    kl = forward.kl_from(ft_log_probs)
    for parameter_, value in saved:
        parameter_.data.copy_(value)
    reference = {"loss_finetuned": loss_ft, "loss_base": loss_base, "kl_finetuned_base": kl}
    return groups, ft_log_probs, reference
