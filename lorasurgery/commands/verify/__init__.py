"""`verify`: did the adapters land in an artifact someone else made? (docs/design.md §14, docs/verify.md)

`verify_artifact(VerifyRequest(base, adapters, artifact))` binds the adapters to the base (lorasurgery.binding),
takes the very recipes merge writes (lorasurgery.recipes: each tensor's updates, saved tensors, ties)
and checks the artifact against them, one tensor pair at a time. The package is split by the kind
of artifact, so that the ones to come (an adapter exported for a runtime, GGUF, `--text`) are a
module each beside the first:

    adapter.py  an adapter (a PEFT folder for peft / vllm / sglang, a llama.cpp GGUF LoRA): the
                update each target computes from it by its own rules (lorasurgery.targets), in
                factored form where both sides are plain LoRA
    gguf_model.py  a merged GGUF model (convert_hf_to_gguf.py, llama-export-lora), read under the
                base's names for merged.py
    text.py     --text: the artifact's logits on a text against base + adapters through PEFT
    merged.py   a merged checkpoint (safetensors file or folder, sharded, or quantized: read
                dequantized by the checkpoint layer): ΔŴ = W_artifact − W_base per tensor, every
                untouched tensor unchanged
    config.py   the artifact's config.json against what the merge implies (ties, vocabulary,
                quantization_config)
    verdict.py  ΔŴ against ΔW: relative error, retention ρ, tolerance, the verdict's name

The report says per tensor what landed; `landed` is true only when everything did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import bind
from lorasurgery.commands.verify.adapter import (
    check_adapter_artifact,
    choose_target,
    gguf_kind,
    is_adapter,
    is_gguf,
    read_adapter_artifact,
)
from lorasurgery.commands.verify.config import check_config
from lorasurgery.commands.verify.gguf_model import GgufModel
from lorasurgery.commands.verify.merged import Changed, MergedCheck, TensorCheck, units
from lorasurgery.commands.verify.text import TextCheck, TextRun, artifact_dtype, check_text
from lorasurgery.concurrency import torch_threads
from lorasurgery.devices import resolve_device
from lorasurgery.errors import OptionError, UnsupportedError
from lorasurgery.io import open_checkpoint
from lorasurgery.model import structure_of
from lorasurgery.progress import ProgressCallback
from lorasurgery.recipes import Recipes, plan_recipes
from lorasurgery.targets import Target

__all__ = ["VerifyRequest", "VerifyReport", "verify_artifact", "DID_NOT_LAND"]

DID_NOT_LAND = 1  # the exit code of a completed check that found a failure, as docs/design.md §14 says


@dataclass
class VerifyReport:
    """What verify found; `--json` prints `to_dict()`."""

    base: str
    artifact: str
    artifact_kind: str  # "merged checkpoint" | "merged GGUF" | "adapter for <target>"
    adapters: list[str]
    weights: list[float]
    checks: list[TensorCheck] = field(default_factory=list)  # every touched tensor
    changed: list[Changed] = field(default_factory=list)  # untouched tensors the artifact changed
    config: list[str] = field(default_factory=list)  # config.json inconsistencies
    extra: list[str] = field(default_factory=list)  # artifact tensors the base does not have
    tensors_checked: int = 0
    seconds: float = 0.0
    target: str | None = None  # an adapter artifact: the target whose rules were applied
    target_rule: str = ""  # and why that target (--target, or what the artifact is)
    target_release: str | None = None  # vllm: the range of releases whose rules were applied
    releases: list = field(default_factory=list)  # vllm: other releases that read the artifact otherwise
    target_spec: object = field(default=None, repr=False)  # the targets.Target itself, for --text
    text: TextCheck | None = None  # --text: the logits comparison

    @property
    def landed(self) -> bool:
        return (
            all(c.verdict == "landed" for c in self.checks)
            and not self.changed
            and not self.config
            and not self.extra
            and (self.text is None or self.text.passed or bool(self.text.skipped))
        )

    def to_dict(self) -> dict:
        return {
            "base": self.base,
            "artifact": self.artifact,
            "artifact_kind": self.artifact_kind,
            "target": self.target,
            "target_rule": self.target_rule,
            "target_release": self.target_release,
            "other_releases": [d.to_json() for d in self.releases],
            "adapters": self.adapters,
            "weights": self.weights,
            "landed": self.landed,
            "tensors_checked": self.tensors_checked,
            "checks": [c.to_dict() for c in self.checks],
            "changed": [c.to_dict() for c in self.changed],
            "config": self.config,
            "extra": self.extra,
            "text": self.text.to_dict() if self.text is not None else None,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class VerifyRequest:
    """What `verify` is asked: the base, the adapters (each with its weight), the artifact and every
    option (the CLI's). `target` names the runtime whose rules an adapter artifact is checked by;
    `text` and `tokens` ask for `--text`'s logits comparison; `config_file` describes the base's
    structure when it has no config.json."""

    base: str | os.PathLike
    adapters: Sequence[str | os.PathLike]
    artifact: str | os.PathLike
    weights: Sequence[float] | None = None
    device: str = "cpu"
    config_file: str | os.PathLike | None = None
    target: str | Target | None = None  # `vllm`, `vllm==0.31`: vLLM's rules by release (targets.Target)
    text: str | os.PathLike | None = None
    tokens: int = 2048


def verify_artifact(request: VerifyRequest, progress: ProgressCallback | None = None) -> VerifyReport:
    """Check `request.artifact` against `request.base` + `request.adapters` (each with its weight);
    raises a LoraSurgeryError naming the input when something cannot be checked."""
    started = time.perf_counter()
    base, config_file, target = request.base, request.config_file, request.target
    adapters = [Path(a) for a in request.adapters]
    if not adapters:
        raise OptionError("verify needs at least one adapter")
    weights = [1.0] * len(adapters) if not request.weights else [float(w) for w in request.weights]
    if len(weights) != len(adapters):
        raise OptionError(
            f"{len(weights)} --weight values for {len(adapters)} adapters; give one --weight per adapter, in order"
        )
    device = resolve_device(request.device)
    artifact_path = Path(request.artifact)
    merged_gguf = is_gguf(artifact_path) and gguf_kind(artifact_path) != "adapter"
    as_adapter = is_adapter(artifact_path) or (is_gguf(artifact_path) and not merged_gguf)
    if target is not None and not as_adapter:
        raise UnsupportedError(
            f"{artifact_path}: --target applies to an adapter artifact (a PEFT folder or a GGUF LoRA); "
            f"this is a merged checkpoint: leave --target out"
        )
    bound = _Bound.of(base, adapters, config_file)
    report = VerifyReport(str(base), str(request.artifact), "", [str(a) for a in adapters], weights)
    if as_adapter:
        text_dtype = _verify_adapter(report, bound, artifact_path, weights, device, target)
    else:
        text_dtype = _verify_merged(
            report, bound, artifact_path, weights, device, config_file, merged_gguf, progress
        )
    if request.text is not None:
        report.text = check_text(
            TextRun(base, adapters, weights, artifact_path, request.text, request.tokens),
            kind="adapter" if as_adapter else report.artifact_kind,
            target=report.target_spec,
            device=device,
            dtype=text_dtype,
        )
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class _Bound:
    """The adapters bound to the base once, and the recipes merge would write: what every kind of
    artifact is checked against."""

    checkpoint: object
    structure: object
    bound: object
    recipes: Recipes

    @classmethod
    def of(cls, base, adapters, config_file) -> _Bound:
        checkpoint = open_checkpoint(base)
        structure = structure_of(checkpoint, config_file)
        bound = bind([load_adapter(p) for p in adapters], checkpoint, structure=structure)
        return cls(checkpoint, structure, bound, plan_recipes(bound))


def _verify_merged(report, bound: _Bound, artifact_path, weights, device, config_file, merged_gguf, progress):
    """A merged checkpoint (safetensors, quantized or not) or a merged GGUF (merged.py, gguf_model.py);
    returns the dtype `--text` compares the logits in."""
    checkpoint, structure, recipes = bound.checkpoint, bound.structure, bound.recipes
    if merged_gguf:
        target = GgufModel(artifact_path, checkpoint.config or {}, recipes.tensors)
        artifact_structure = target.tied_structure(structure)
    else:
        target = open_checkpoint(artifact_path)
        artifact_structure = structure_of(target, config_file if target.config is None else None)
    report.artifact_kind = "merged GGUF" if merged_gguf else "merged checkpoint"
    check = MergedCheck(bound.bound, weights, recipes, target, artifact_structure, device)
    work = units(recipes, checkpoint, target)
    with torch_threads(1):  # two workers, one thread each: the work is memory-bound
        report.checks, report.changed = check.run(work, progress)
    order = {name: i for i, name in enumerate(checkpoint.tensors)}
    report.checks.sort(
        key=lambda c: order.get(recipes.tensors[c.name].name, 0) if c.name in recipes.tensors else 0
    )
    report.changed.sort(key=lambda c: order.get(c.name, 0))
    model = set(recipes.tensors)
    report.extra = [n for n in target.tensors if n not in model and n not in checkpoint.tensors]
    if merged_gguf:
        report.extra += target.extra
    else:
        report.config = check_config(checkpoint, structure, target, artifact_structure, recipes)
    report.tensors_checked = sum(len(u.names) for u in work)
    return target.weights_dtype() if merged_gguf else artifact_dtype(target)


def _verify_adapter(report, bound: _Bound, artifact: Path, weights, device, target) -> str:
    """An adapter artifact: what its target computes from it against PEFT's ΔW (adapter.py); returns
    the dtype `--text` compares the logits in."""
    target, rule = choose_target(artifact, target)
    recipes = bound.recipes
    found = read_adapter_artifact(artifact, target, rule, bound.checkpoint, bound.structure, device)
    report.artifact_kind, report.target, report.target_rule = f"adapter for {target.name}", target.name, rule
    report.target_release, report.releases, report.target_spec = target.release_text, found.releases, target
    with torch_threads(1):
        report.checks, report.changed = check_adapter_artifact(found, bound.bound, weights, recipes, device)
    order = {name: i for i, name in enumerate(recipes.tensors)}
    report.checks.sort(key=lambda c: order.get(c.name, 0))
    report.extra = found.extra
    report.config = found.problems
    report.tensors_checked = len(report.checks) + len(report.changed)
    return "F32" if target.name == "llama.cpp" else artifact_dtype(found.adapter.checkpoint)
