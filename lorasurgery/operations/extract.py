"""`extract`: a PEFT LoRA adapter from a full fine-tune, by truncated SVD of ΔW = W_ft − W_base.

Per selected module ΔW ≈ U_k S_k V_kᵀ and the factors are balanced, B = U√S and A = √S Vᵀ, with
lora_alpha = r so that every scale is exactly 1 (rank_pattern/alpha_pattern when ranks differ).
Tensor pairs are streamed one at a time. Fixed-rank, energy, ratio and Gavish–Donoho policies decide
module by module in one pass; a global parameter budget needs every spectrum first, so it takes a
pass of singular values only, then a pass for the factors. The report's errors are measured after
the factors are cast to the output dtype: they are what the written adapter does.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.adapter.config import pattern_key
from lorasurgery.devices import resolve_device
from lorasurgery.errors import LoraSurgeryError, MismatchError, NonFiniteError, UnsupportedError
from lorasurgery.io import atomic_output_dir, open_checkpoint, save_tensors
from lorasurgery.io.safetensors_format import byte_size, dtype_code_of
from lorasurgery.memory import tune_allocator
from lorasurgery.progress import Progress, ProgressCallback, no_progress

PEFT_PREFIX = "base_model.model."
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
_BLOCK = re.compile(r"\.\d+\.")  # a numbered layer: inside the transformer blocks
_CONV1D_MODEL_TYPES = {"gpt2"}  # checkpoints storing Linear-like weights as Conv1D (in, out)


@dataclass
class Policy:
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    auto: bool = False
    budget: int | None = None
    max_rank: int | None = None

    @property
    def needs_spectrum(self) -> bool:
        return self.rank is None

    def validate(self) -> None:
        chosen = [
            self.rank is not None,
            self.energy is not None,
            self.ratio is not None,
            self.auto,
            self.budget is not None,
        ]
        if sum(chosen) != 1:
            raise LoraSurgeryError(
                "choose exactly one rank policy: --rank, --energy, --ratio, --auto or --budget"
            )
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LoraSurgeryError(f"--energy must be in (0, 1], got {self.energy}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise LoraSurgeryError(f"--ratio must be in (0, 1], got {self.ratio}")
        for name, value in (("--rank", self.rank), ("--max-rank", self.max_rank), ("--budget", self.budget)):
            if value is not None and value < 1:
                raise LoraSurgeryError(f"{name} must be at least 1, got {value}")

    def describe(self) -> str:
        for name in ("rank", "energy", "ratio", "budget"):
            if getattr(self, name) is not None:
                return f"{name} {getattr(self, name)}"
        return "auto (Gavish–Donoho)"


@dataclass
class ModuleResult:
    name: str
    shape: list[int]
    rank: int
    retained_energy: float
    relative_error: float
    kind: str = "linear"  # linear | embedding
    params: int = 0


@dataclass
class Skipped:
    name: str
    reason: str
    relative_norm: float


@dataclass
class ExtractReport:
    base: str
    finetuned: str
    output: str
    policy: str
    modules: list[ModuleResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules_to_save / base_layer biases written
    totals: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "modules": [
                {
                    "name": m.name,
                    "shape": m.shape,
                    "rank": m.rank,
                    "retained_energy": m.retained_energy,
                    "relative_error": m.relative_error,
                }
                for m in self.modules
            ],
            "skipped": [
                {"name": s.name, "reason": s.reason, "relative_norm": s.relative_norm} for s in self.skipped
            ],
            "totals": self.totals,
        }


@dataclass
class _Target:
    """One weight to extract: its module, kind, and how ΔW maps to PEFT's factors."""

    name: str  # tensor name in the checkpoints
    module: str
    kind: str  # "linear" | "embedding"
    transpose: bool  # SVD the transpose of the stored tensor (Conv1D stores (in, out))
    tied_with: str | None = None  # lm_head tied to this input embedding


def _module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _policy_rank(policy: Policy, S, shape, source_dtype) -> int:
    from lorasurgery.linalg.policies import rank_energy, rank_gavish_donoho, rank_ratio
    from lorasurgery.linalg.svd import numerical_rank_tolerance

    if policy.energy is not None:
        k = rank_energy(S, policy.energy)
    elif policy.ratio is not None:
        k = rank_ratio(S, policy.ratio)
    else:  # rounding noise in an exactly low-rank ΔW is not white: cap at the numerical rank
        k = rank_gavish_donoho(
            S, shape, floor=float(S[0]) * numerical_rank_tolerance(shape, source_dtype) if len(S) else 0.0
        )
    return k


def _cap(k: int, policy: Policy, shape) -> int:
    k = min(k, min(shape))
    return min(k, policy.max_rank) if policy.max_rank else k


def extract_adapter(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    auto: bool = False,
    budget: int | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    save_1d: bool = False,
    dtype: str = "auto",
    svd: str = "auto",
    device: str = "cpu",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressCallback = no_progress,
) -> ExtractReport:
    """Write a PEFT adapter approximating FINETUNED − BASE to `out`; return the error report."""
    import torch

    started = time.perf_counter()
    tune_allocator()  # streamed tensor pairs must not pile up in glibc's heaps
    policy = Policy(rank, energy, ratio, auto, budget, max_rank)
    policy.validate()
    if embeddings not in ("skip", "lora", "full"):
        raise LoraSurgeryError(f"--embeddings must be skip, lora or full, got {embeddings!r}")
    if dtype not in ("auto", *_DTYPES):
        raise LoraSurgeryError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    device = resolve_device(device)
    include_re = _compile(include, "--include")
    exclude_re = _compile(exclude, "--exclude")

    base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    _check_architectures(base_ckpt, ft_ckpt)
    plan = _plan(base_ckpt, ft_ckpt, include_re, exclude_re, embeddings, save_1d)
    if not plan.targets and not plan.saved_tensors:
        raise LoraSurgeryError(f"{finetuned}: no module to extract (check --include/--exclude)")
    report = ExtractReport(str(base), str(finetuned), str(out), policy.describe())
    report.skipped += plan.skipped

    def delta_of(target: _Target):
        w_base = base_ckpt.read(target.name).to(device=device, dtype=torch.float32)
        w_ft = ft_ckpt.read(target.name).to(device=device, dtype=torch.float32)
        delta = w_ft - w_base  # stored layout
        if not allow_nonfinite and not bool(torch.isfinite(delta).all()):
            raise NonFiniteError(
                f"{finetuned}: module {target.module}: NaN/Inf in the weights or their difference; "
                f"pass --allow-nonfinite to go on"
            )
        base_norm = float(torch.linalg.vector_norm(w_base))
        del w_base, w_ft
        # SVD layout: PEFT's ΔW = s·B@A is (out, in) for Linear, (dim, vocab) for embeddings.
        return (delta.T if target.transpose else delta), base_norm

    total = len(plan.targets) * (2 if policy.budget is not None else 1)
    done = 0
    ranks: dict[str, int] = {}
    spectra: dict[str, object] = {}
    if policy.budget is not None:  # pass 1: spectra only
        from lorasurgery.linalg.policies import allocate_budget
        from lorasurgery.linalg.svd import numerical_rank_tolerance, singular_values

        for target in plan.targets:
            delta, _ = delta_of(target)
            source_dtype = ft_ckpt.tensors[target.name].torch_dtype
            S = singular_values(delta, source_dtype=source_dtype)
            # σ below the numerical-rank threshold are rounding noise: no budget is spent on them
            if len(S):
                S = S[S > float(S[0]) * numerical_rank_tolerance(tuple(delta.shape), source_dtype)]
            spectra[target.name] = (S, delta.shape)
            done += 1
            progress(Progress("extract: spectra", done, total, target.module))
        names = list(spectra)
        # A tied lm_head gets a copy of the input embedding's factors: each rank costs twice.
        copies = {
            n: 2 if plan.tied_output is not None and plan.tied_output.tied_with == n else 1 for n in names
        }
        chosen = allocate_budget(
            [(spectra[n][0], copies[n] * spectra[n][1][0], copies[n] * spectra[n][1][1]) for n in names],
            policy.budget,
            max_rank=policy.max_rank,
        )
        ranks = dict(zip(names, chosen))

    tensors: dict[str, torch.Tensor] = {}
    out_dtypes: dict[str, object] = {}
    error_sq = total_sq = 0.0
    unchanged = 0
    for target in plan.targets:
        delta, base_norm = delta_of(target)
        delta_sq = float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        shape = tuple(delta.shape)
        if delta_sq == 0:  # nothing to extract, nothing lost: counted in a note, not listed
            unchanged += 1
            done += 1
            continue
        if policy.rank is not None:
            k = _cap(policy.rank, policy, shape)
        elif policy.budget is not None:
            k = ranks[target.name]
        else:
            from lorasurgery.linalg.svd import singular_values

            source_dtype = ft_ckpt.tensors[target.name].torch_dtype
            S = singular_values(delta, source_dtype=source_dtype)
            k = _cap(_policy_rank(policy, S, shape, source_dtype), policy, shape)
        relative_norm = math.sqrt(delta_sq) / base_norm if base_norm else float("inf")
        if k == 0:
            report.skipped.append(
                Skipped(target.module, f"the {policy.describe()} policy kept rank 0", relative_norm)
            )
            error_sq += delta_sq
            total_sq += delta_sq
            done += 1
            continue
        B, A = _balanced_factors(delta, k, svd)
        out_dtype = _output_dtype(dtype, ft_ckpt.tensors[target.name].torch_dtype)
        B, A = B.to(out_dtype), A.to(out_dtype)
        residual = delta - B.to(torch.float32) @ A.to(torch.float32)
        err_sq = float(torch.linalg.vector_norm(residual, dtype=torch.float64) ** 2)
        del residual, delta
        error_sq += err_sq
        total_sq += delta_sq
        prefix = PEFT_PREFIX + target.module
        if target.kind == "embedding":
            tensors[f"{prefix}.lora_embedding_A"] = A.cpu().contiguous()
            tensors[f"{prefix}.lora_embedding_B"] = B.cpu().contiguous()
        else:
            tensors[f"{prefix}.lora_A.weight"] = A.cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B.cpu().contiguous()
        out_dtypes[target.module] = out_dtype
        ranks[target.name] = k
        report.modules.append(
            ModuleResult(
                name=target.module,
                shape=list(ft_ckpt.tensors[target.name].shape),
                rank=k,
                retained_energy=max(0.0, 1.0 - err_sq / delta_sq),  # Eckart–Young: 1 − err²/‖ΔW‖²
                relative_error=math.sqrt(err_sq / delta_sq),
                kind=target.kind,
                params=A.numel() + B.numel(),
            )
        )
        done += 1
        progress(Progress("extract", done, total, target.module))

    # A tied lm_head gets the input embedding's factors (PEFT applies an embedding LoRA to inputs only).
    if plan.tied_output is not None:
        embed_module = _module_of(plan.tied_output.tied_with)
        a_key = f"{PEFT_PREFIX}{embed_module}.lora_embedding_A"
        if a_key in tensors:
            A_emb, B_emb = tensors[a_key], tensors[f"{PEFT_PREFIX}{embed_module}.lora_embedding_B"]
            # ΔE (vocab, dim) = (B_emb @ A_emb)ᵀ = A_embᵀ @ B_embᵀ: lm_head's Linear LoRA is B = A_embᵀ, A = B_embᵀ.
            tensors[f"{PEFT_PREFIX}{plan.tied_output.module}.lora_A.weight"] = B_emb.T.contiguous()
            tensors[f"{PEFT_PREFIX}{plan.tied_output.module}.lora_B.weight"] = A_emb.T.contiguous()
            report.notes.append(
                f"{plan.tied_output.module} is tied to {embed_module}: it gets the same factors "
                f"(PEFT applies an embedding LoRA to the input side only)"
            )

    for tensor_name, key in plan.saved_tensors.items():
        tensor = ft_ckpt.read(tensor_name)
        if dtype != "auto" and tensor.is_floating_point():
            tensor = tensor.to(_output_dtype(dtype, tensor.dtype))
        tensors[key] = tensor.contiguous()
    report.saved = sorted(plan.saved_tensors)

    report.totals = {
        "params": sum(t.numel() for t in tensors.values()),
        "bytes": sum(byte_size(dtype_code_of(t.dtype), tuple(t.shape)) for t in tensors.values()),
        "relative_error": math.sqrt(error_sq / total_sq) if total_sq else 0.0,
    }
    if embeddings == "skip" and any(s.reason.startswith("embedding") for s in plan.skipped):
        report.notes.append(
            "embeddings were skipped although the fine-tune changed them (see 'skipped'); "
            "--embeddings lora extracts them too"
        )
    if unchanged:
        report.notes.append(f"{unchanged} selected modules are unchanged by the fine-tune and were left out")
    if not tensors:
        raise LoraSurgeryError(f"{finetuned}: every selected module was skipped; nothing to write")

    config = _adapter_config(base, plan, report)
    with atomic_output_dir(out, inputs=[base, finetuned], force=force) as folder:
        save_tensors(folder, tensors, stem="adapter_model")
        with open(folder / "adapter_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    report.seconds = time.perf_counter() - started
    return report


def _compile(pattern: str | None, option: str):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise LoraSurgeryError(f"{option} {pattern!r} is not a valid regular expression ({error})") from None


def _output_dtype(dtype: str, source):
    import torch

    if dtype == "auto":
        return (
            source
            if source in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            else torch.float32
        )
    return getattr(torch, _DTYPES[dtype])


def _balanced_factors(delta, k: int, method: str):
    """B = U_k √S_k (d, k), A = √S_k V_kᵀ (k, n) of the best rank-k approximation of delta (d, n)."""
    import torch

    from lorasurgery.linalg.svd import truncated_svd

    U, S, Vh = truncated_svd(delta, k, method=method)
    root = torch.sqrt(S[:k].to(torch.float32))
    return U[:, :k].to(torch.float32) * root, root[:, None] * Vh[:k].to(torch.float32)


def _check_architectures(base, ft) -> None:
    kinds = [(c or {}).get("model_type") for c in (base.config, ft.config)]
    if all(kinds) and kinds[0] != kinds[1]:
        raise MismatchError(
            f"{ft.path}: a {kinds[1]} model cannot be a fine-tune of the {kinds[0]} model {base.path}"
        )


@dataclass
class _Plan:
    targets: list[_Target]
    skipped: list[Skipped]
    saved_tensors: dict[str, str]  # checkpoint tensor name -> adapter key
    modules_to_save: list[str]
    saved_biases: bool
    tied_output: _Target | None
    fan_in_fan_out: bool
    task_type: str | None


def _relative_change(base, ft, name: str) -> float:
    import torch

    w_base = base.read(name).double()
    difference = float(torch.linalg.vector_norm(ft.read(name).double() - w_base))
    norm = float(torch.linalg.vector_norm(w_base))
    return difference / norm if norm else (0.0 if difference == 0 else float("inf"))


def _plan(base, ft, include_re, exclude_re, embeddings: str, save_1d: bool) -> _Plan:
    config = ft.config or base.config or {}
    fan_in_fan_out = config.get("model_type") in _CONV1D_MODEL_TYPES
    tied = bool(config.get("tie_word_embeddings", False))
    missing = [n for n in base.tensors if n not in ft.tensors]
    if missing:
        raise MismatchError(
            f"{ft.path}: tensors of the base are missing from the fine-tune: {', '.join(missing[:8])}"
        )
    extra = [n for n in ft.tensors if n not in base.tensors]
    if extra:
        raise MismatchError(f"{ft.path}: tensors not in the base {base.path}: {', '.join(extra[:8])}")

    def selected(module: str) -> bool:
        if include_re is not None and not include_re.search(module):
            return False
        return exclude_re is None or not exclude_re.search(module)

    targets: list[_Target] = []
    skipped: list[Skipped] = []
    saved: dict[str, str] = {}
    modules_to_save: list[str] = []
    lora_modules: set[str] = set()
    input_embedding = None
    output_names = []
    one_d: list[str] = []
    for name, info in base.tensors.items():
        ft_info = ft.tensors[name]
        module = _module_of(name)
        leaf = _leaf(module)
        is_embedding = leaf in _INPUT_EMBEDDINGS or leaf.endswith("position_embeddings") or leaf == "wpe"
        is_output = leaf in _OUTPUT_EMBEDDINGS
        if tuple(ft_info.shape) != tuple(info.shape):
            if (is_embedding or is_output) and embeddings == "full":
                saved[name] = f"{PEFT_PREFIX}{name}"
                modules_to_save.append(module)
                continue
            kind = "vocabulary sizes differ" if is_embedding or is_output else "shapes differ"
            raise MismatchError(
                f"{ft.path}: module {module}: {kind} ({list(info.shape)} in the base, {list(ft_info.shape)} in the "
                f"fine-tune)"
                + ("; --embeddings full saves the resized matrices" if kind.startswith("vocab") else "")
            )
        if len(info.shape) == 1:
            one_d.append(name)
            continue
        if len(info.shape) != 2 or not name.endswith(".weight"):
            continue
        if is_embedding or is_output:
            if is_output:
                output_names.append(name)
            elif leaf in _INPUT_EMBEDDINGS:
                input_embedding = name
            if embeddings == "skip" or (exclude_re is not None and exclude_re.search(module)):
                rel = _relative_change(base, ft, name)
                if rel:
                    skipped.append(
                        Skipped(module, "embedding or lm_head (use --embeddings lora or full)", rel)
                    )
                continue
            if embeddings == "full":
                if _relative_change(base, ft, name):
                    saved[name] = f"{PEFT_PREFIX}{name}"
                    modules_to_save.append(module)
                continue
            targets.append(
                _Target(name, module, "linear" if is_output else "embedding", transpose=not is_output)
            )
            lora_modules.add(module)
            continue
        in_blocks = bool(_BLOCK.search(name))
        if (include_re is None and not in_blocks) or not selected(module):
            rel = _relative_change(base, ft, name)
            if rel:
                skipped.append(
                    Skipped(
                        module, "not selected (outside the transformer blocks, or --include/--exclude)", rel
                    )
                )
            continue
        targets.append(_Target(name, module, "linear", transpose=fan_in_fan_out))
        lora_modules.add(module)

    tied_output = None
    if tied and input_embedding and embeddings == "lora" and not output_names:
        # The checkpoint stores the tied lm_head only as the input embedding.
        tied_output = _Target("lm_head.weight", "lm_head", "linear", False, tied_with=input_embedding)

    saved_biases = False
    for name in one_d:
        rel = _relative_change(base, ft, name)
        if not rel:
            continue
        module = _module_of(name)
        if not save_1d:
            skipped.append(Skipped(name, "1-D tensor (norm or bias; --save-1d saves it)", rel))
        elif module in lora_modules:
            saved[name] = f"{PEFT_PREFIX}{module}.base_layer.{name.rsplit('.', 1)[1]}"
            saved_biases = True
        else:
            for sibling in (n for n in base.tensors if _module_of(n) == module):
                saved[sibling] = f"{PEFT_PREFIX}{sibling}"
            if module not in modules_to_save:
                modules_to_save.append(module)
    architectures = config.get("architectures") or []
    task_type = "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in architectures) else None
    return _Plan(
        targets, skipped, saved, modules_to_save, saved_biases, tied_output, fan_in_fan_out, task_type
    )


def _adapter_config(base, plan: _Plan, report: ExtractReport) -> dict:
    modules = [m.name for m in report.modules]
    module_ranks = {m.name: m.rank for m in report.modules}
    if plan.tied_output is not None and _module_of(plan.tied_output.tied_with) in module_ranks:
        module_ranks[plan.tied_output.module] = module_ranks[_module_of(plan.tied_output.tied_with)]
        modules.append(plan.tied_output.module)
    counts: dict[int, int] = {}
    for k in module_ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    rank_pattern = {m: k for m, k in module_ranks.items() if k != r}
    # Keys are full module paths; check PEFT's rule picks exactly each module's own key.
    for m in module_ranks:
        key = pattern_key(rank_pattern, m)
        if (m in rank_pattern and key != m) or (m not in rank_pattern and key is not None):
            raise UnsupportedError(f"internal error: rank_pattern key for {m} is ambiguous")
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(set(modules)),
        "lora_dropout": 0.0,
        "bias": "lora_only" if plan.saved_biases else "none",
        "fan_in_fan_out": plan.fan_in_fan_out,
        "modules_to_save": plan.modules_to_save or None,
        # PEFT ties lm_head's adapter to the embedding's (and stops warning) only when asked to
        "ensure_weight_tying": plan.tied_output is not None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": plan.task_type,
    }
    return config


def write_report(report: ExtractReport, path: str | os.PathLike) -> None:
    """Write the SPEC §4 JSON report to `path` (atomically: temp file, then rename)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")
    os.replace(temp, path)
