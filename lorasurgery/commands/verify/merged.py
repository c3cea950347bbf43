"""verify of a merged checkpoint: every base tensor against the artifact's, one pair at a time.

The expected value of each tensor comes from the recipes merge writes (lorasurgery.recipes): for a
LoRA update ΔW = Σ wᵢ·sᵢ·BᵢAᵢ in the stored layout (linalg.delta.delta_weight, float32, never
W + ΔW − W, which would cancel), DoRA by the merge kernel in float64 (its ΔW depends on W), a saved
tensor, a lora_bias term or trainable-token rows as merge computes them. The artifact is read as
transformers would load it: a quantized one dequantized by the checkpoint layer, and a tie group the
artifact's config keeps tied read from the member it keeps (the input embedding).

Each unit of work — an untouched tensor, a touched one, a touched tie group — is read (base and
artifact), compared and dropped through concurrency.Pipeline, so memory holds a few tensor pairs.

A tensor updated by plain 2-D LoRA only (the usual case) is checked fused, without a ΔW buffer:
ΔŴ is formed in the artifact's float32 copy, ⟨ΔŴ, ΔW⟩ = Σ (ΔŴ·Aᵀ) ∘ sB (a d × r product), ‖ΔW‖
from r × r QR cores (verdict.factored_norm), and ΔŴ − ΔW by subtracting s·B@A from ΔŴ in place
(addmm): every d × k buffer a tensor costs is a fresh mapping, paid in page faults (memory.py), so
the fewer the faster (docs/verify.md "Performance").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasurgery.commands.verify.verdict import (
    Comparison,
    Rounding,
    compare,
    factored_norm,
    half_ulp_bound,
    half_ulp_norm,
    inner,
    judge,
    judge_quantized,
    norm,
)
from lorasurgery.concurrency import Pipeline
from lorasurgery.linalg.delta import merge_bias, overwrite_rows
from lorasurgery.linalg.update import delta_into, factors, from_stored, kernel_update, merge_into
from lorasurgery.recipes import BASE, Recipe, Recipes

F32_NOISE = 1e-5  # relative: float32 summation order between two tools computing the same ΔW


@dataclass
class Unit:
    """What one step reads and checks: one untouched tensor, or touched tensors (a tie group whole)."""

    names: tuple[str, ...]
    touched: bool
    bytes: int = 0


@dataclass
class TensorCheck:
    """One touched tensor: ΔŴ against ΔW."""

    name: str
    kind: str  # lora | dora | replaced | bias | tokens
    modules: list[str]  # the adapter modules (or saved tensors) behind it
    comparison: Comparison | None
    verdict: str
    detail: str = ""

    def to_dict(self) -> dict:
        c = self.comparison
        return {
            "tensor": self.name,
            "kind": self.kind,
            "modules": self.modules,
            "verdict": self.verdict,
            "relative_error": c.relative_error if c else None,
            "retention": c.retention if c else None,
            "retention_uncertainty": c.uncertainty if c else None,
            "retention_on_grid": c.on_grid if c else None,
            "scale": c.scale if c else None,
            "expected_norm": c.expected_norm if c else None,
            "tolerance": c.tolerance if c else None,
            "detail": self.detail,
        }


def shape_differs(name: str, kind: str, modules: list[str], found, expected) -> TensorCheck:
    """The check of a tensor the artifact holds in another shape than the expected one: `differs`,
    naming both shapes (a merged tensor, or the product of an adapter artifact's factors)."""
    return TensorCheck(
        name, kind, modules, None, "differs", f"shape {list(found)}, expected {list(expected)}"
    )


@dataclass
class Changed:
    """A tensor the adapters do not touch that the artifact changed (or lacks)."""

    name: str
    detail: str

    def to_dict(self) -> dict:
        return {"tensor": self.name, "detail": self.detail}


def units(recipes: Recipes, base, artifact) -> list[Unit]:
    """Every tensor of the model, once, in the base's file order (a tied member the base stores once
    too: the artifact may store it apart); tie groups something touches whole."""
    groups = {n: outcome.group for outcome in recipes.ties for n in outcome.group}
    seen: set[str] = set()
    found = []
    for name in recipes.tensors:
        if name in seen:
            continue
        names = groups.get(name, (name,))
        seen.update(names)
        touched = any(recipes.touched(n) for n in names) or name in groups
        found.append(Unit(tuple(names), touched, sum(recipes.tensors[n].nbytes for n in names)))
    return found


class MergedCheck:
    """The comparison of one merged checkpoint `artifact` with `base` + the bound adapters."""

    def __init__(self, bound, weights, recipes: Recipes, artifact, artifact_structure, device="cpu"):
        self.bound, self.weights, self.recipes = bound, weights, recipes
        self.base = bound[0].checkpoint
        self.structure = bound[0].structure
        self.artifact, self.device = artifact, device
        self.kept = _kept_members(artifact, artifact_structure)
        self.rounding: dict[str, float] = {}  # per tensor: ‖½ ulp‖ of the artifact's values
        self.stepped: set[str] = set()  # tensors whose rounding is read from their block scales

    # ---------------------------------------------------------------------------------- reading

    def artifact_name(self, name: str) -> str | None:
        """The artifact tensor transformers loads for base tensor `name` (a kept tie's member)."""
        if name in self.kept:
            return self.kept[name]
        return name if name in self.artifact.tensors else None

    def read(self, unit: Unit):
        base, artifact = {}, {}
        for name in unit.names:
            base[name] = self.base.read(self.recipes.tensors[name].name, self.device)
            stored = self.artifact_name(name)
            artifact[name] = self.artifact.read(stored, self.device) if stored is not None else None
        return base, artifact

    # ---------------------------------------------------------------------------------- checking

    def check(self, unit: Unit, tensors):
        base, artifact = tensors
        if not unit.touched:
            name = unit.names[0]
            return [], _untouched(
                name,
                base[name],
                artifact[name],
                self.recipes.tensors[name],
                self._info(name),
                self.measured_rounding(name),
            )
        if len(unit.names) == 1:
            name = unit.names[0]
            recipe = self.recipes.recipes.get(name)
            if recipe is not None and self.plain(recipe):
                return [self._check_fused(name, recipe, base[name], artifact[name])], []
        checks, changed, surplus = [], [], {}
        expected = {n: self.expected(n, base[n]) for n in unit.names}
        for name in unit.names:
            recipe, delta = expected[name]
            H = None
            if artifact[name] is not None:
                A = artifact[name]
                H = A.to(torch.float32, copy=True)
                self.rounding[name] = self.artifact_rounding(name, H)  # before H becomes ΔŴ in place
                if H.shape == base[name].shape:
                    H.sub_(base[name])
            if len(unit.names) > 1 and H is not None and H.shape == delta.shape:
                surplus[name] = H - delta  # what landed on this member beyond what it should carry
            if recipe is None or recipe.untouched:
                found = _untouched(
                    name,
                    base[name],
                    artifact[name],
                    self.recipes.tensors.get(name),
                    self._info(name),
                    self.measured_rounding(name),
                )
                changed.extend(found)
                continue
            checks.append(self._check_one(name, recipe, delta, base[name], artifact[name], H))
        if len(unit.names) > 1:
            _tie_sides(checks, surplus, expected, self, base)
        return checks, changed

    def _info(self, name: str):
        stored = self.artifact_name(name)
        return self.artifact.tensors[stored] if stored is not None else None

    def _check_one(self, name, recipe: Recipe, delta, W, A, H) -> TensorCheck:
        kind, modules = self.describe(recipe)
        if A is None:
            return TensorCheck(name, kind, modules, None, "absent", "the artifact has no such tensor")
        if tuple(A.shape) != tuple(delta.shape):
            return shape_differs(name, kind, modules, A.shape, delta.shape)
        size = norm(delta)
        rounding = None
        if self.quantized(name):
            rounding = Rounding(delta.numel(), _gain(H, W), self.on_grid(name, W, delta))
        comparison = compare(H, delta, self.tolerance(name, delta, size), size, rounding=rounding)
        return TensorCheck(name, kind, modules, comparison, comparison.label)

    def plain(self, recipe: Recipe) -> bool:
        """A recipe that is a sum of plain 2-D LoRA products s·B@A on the base's own whole tensor."""
        if recipe.start is not BASE or recipe.bias_terms or recipe.token_rows or not recipe.updates:
            return False
        for index, key in recipe.updates:
            lora = self.bound[index].targets[key].lora
            # a per-expert module bound to a slice of a fused parameter (its `slot`) is not B@A on
            # the whole tensor: expected() places its ΔW in the slice (linalg.update.delta_into)
            if lora.dora or lora.kind not in ("linear", "embedding") or lora.experts or lora.slot is not None:
                return False
        return True

    def terms(self, recipe: Recipe) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(w·s·B (out, r), A (r, in))] of a plain recipe, float32, ΔW's (out, in) orientation."""
        found = []
        for index, key in recipe.updates:
            f = factors(self.bound[index].adapter, self.bound[index].targets[key].lora, self.device)
            found.append(((f.B.float() * (f.scale * self.weights[index])), f.A.float()))
        return found

    def _check_fused(self, name, recipe: Recipe, W, A) -> TensorCheck:
        """`_check_one` of a plain-LoRA tensor without forming ΔW (see the module docstring)."""
        kind, modules = self.describe(recipe)
        if A is None:
            return TensorCheck(name, kind, modules, None, "absent", "the artifact has no such tensor")
        if tuple(A.shape) != tuple(W.shape):
            return shape_differs(name, kind, modules, A.shape, W.shape)
        lora = self.bound[recipe.updates[0][0]].targets[recipe.updates[0][1]].lora
        H = A.to(torch.float32, copy=True).contiguous()
        measured = self.measured_rounding(name)
        if measured is None:
            code, factor = self._grid(name)
            self.rounding[name] = half_ulp_norm(H, code, factor, in_place=True)  # H holds powers of two now
            H.copy_(A)  # refilled: no second d × k buffer
        else:
            self.rounding[name] = measured
        H.sub_(W)
        M = from_stored(lora, H)  # ΔŴ as (out, in): H itself or its transposed view
        terms = self.terms(recipe)
        Bs = torch.cat([B for B, _ in terms], dim=1)
        As = torch.cat([a for _, a in terms], dim=0)
        rounding = self._fused_rounding(name, lora, W, H, Bs, As)
        n = factored_norm(Bs.double(), As.double())
        tolerance = self.tolerance(name, None, n)
        if n:
            rho = float(((M @ As.T).double() * Bs.double()).sum()) / (n * n)
        else:
            rho = 1.0 if norm(H) <= tolerance else 0.0
        M.addmm_(Bs, As, alpha=-1.0)  # ΔŴ − ΔW in ΔŴ's own buffer
        error = norm(H)
        restored = []

        def landed_value() -> torch.Tensor:
            if not restored:
                M.addmm_(Bs, As)
                restored.append(True)
            return H

        square = M.shape[0] == M.shape[1]
        lazy = {
            "h": lambda: norm(landed_value()),
            "transposed_error": (lambda: norm(landed_value() - from_stored(lora, (Bs @ As).T)))
            if square
            else None,
            "is_zero": lambda: not landed_value().any(),
        }
        if rounding is not None:
            comparison = judge_quantized(n, rho, error, tolerance, rounding=rounding, **lazy)
        else:
            comparison = judge(n, rho, error, tolerance, H.numel(), **lazy)
        return TensorCheck(name, kind, modules, comparison, comparison.label)

    def _fused_rounding(self, name, lora, W, H, Bs, As) -> Rounding | None:
        """The fused path's `Rounding` of a quantized artifact's `name` (H = ΔŴ, stored layout), with
        ΔW = Bs·As formed densely only where the artifact gives its grid; None for float artifacts."""
        if not self.quantized(name):
            return None
        expected = None
        if getattr(self.artifact, "round_on_grid", None) is not None:
            delta = torch.zeros_like(H)
            from_stored(lora, delta).addmm_(Bs, As)
            expected = self.on_grid(name, W, delta)
        return Rounding(H.numel(), _gain(H, W), expected)

    def artifact_rounding(self, name: str, values: torch.Tensor) -> float:
        """‖½ ulp‖ of the artifact's values of `name` (float32) in the dtype it stores them in, or
        ‖½ step‖ where its block scales give the step (`measured_rounding`)."""
        measured = self.measured_rounding(name)
        if measured is not None:
            return measured
        code, factor = self._grid(name)
        return half_ulp_norm(values, code, factor)

    def measured_rounding(self, name: str) -> float | None:
        """‖½ step‖ of the artifact's `name` from its own block scales where the artifact gives it (a
        block-quantized GGUF tensor, docs/verify.md "Quantized GGUF"), else None."""
        stored = self.artifact_name(name)
        rounding = getattr(self.artifact, "rounding", None)
        found = None if stored is None or rounding is None else rounding(stored)
        if found is not None:
            self.stepped.add(name)
        return found

    def on_grid(self, name: str, W: torch.Tensor, delta: torch.Tensor) -> tuple[float, float] | None:
        """(ρ*, ρ₀): the retention W + ΔW and W alone show once rounded to the nearest point of the
        artifact's own grid (its block scales), where the artifact gives that grid (a block-quantized
        GGUF tensor), else None: what a correct quantized merge and a base-only file should show even
        when the rounding is not independent of ΔW (a base already on a grid, docs/verify.md)."""
        stored = self.artifact_name(name)
        rounder = getattr(self.artifact, "round_on_grid", None)
        size = inner(delta, delta)
        if stored is None or rounder is None or size == 0:
            return None
        W = W.float()
        landed = rounder(stored, W + delta)
        if landed is None:
            return None
        alone = rounder(stored, W)
        return inner(landed.sub_(W), delta) / size, inner(alone.sub_(W), delta) / size

    def quantized(self, name: str) -> bool:
        """Whether the artifact stores `name` as block codes: judged by ρ against its rounding noise."""
        info = self._info(name)
        return info is not None and info.dequantized

    def _grid(self, name: str) -> tuple[str, float]:
        """The dtype whose rounding the artifact's `name` went through, and a factor: a quantized
        tensor's codes (e4m3 …), doubled since a block scale need not be a power of two."""
        info = self._info(name)
        if info.dequantized and info.codes is not None:
            return info.codes.dtype, 2.0
        return info.dtype, 1.0

    def tolerance(self, name: str, delta: torch.Tensor, size: float | None = None) -> float:
        """τ of docs/verify.md: the artifact's rounding of W + ΔW (measured on its values), a
        tool's rounding of ΔW (bounded), float32 summation noise."""
        size = norm(delta) if size is None else size
        if name in self.stepped:  # the step bounds the one rounding of W + ΔW; ΔW is not rounded apart
            return self.rounding[name] + F32_NOISE * size
        code, factor = self._grid(name)
        return self.rounding[name] + half_ulp_bound(size, code, factor) + F32_NOISE * size

    def describe(self, recipe: Recipe) -> tuple[str, list[str]]:
        """(kind, the adapter modules and saved tensors behind it): LoRA updates name the kind even
        on a saved start (a tied member's saved base layer)."""
        modules = [self.bound[i].targets[key].lora.key for i, key in recipe.updates]
        saved = [recipe.start[1]] if recipe.start is not BASE else []
        if recipe.updates:
            dora = any(self.bound[i].targets[key].lora.dora for i, key in recipe.updates)
            return ("dora" if dora else "lora"), saved + modules
        if saved:
            return "replaced", saved
        if recipe.bias_terms:
            return "bias", [key for _, key in recipe.bias_terms]
        return "tokens", [module for _, module in recipe.token_rows]

    def expected(self, name: str, W: torch.Tensor):
        """(recipe, expected ΔW in the stored layout, float32) of base tensor `name` read as `W`."""
        recipe = self.recipes.recipes.get(name)
        if recipe is None and name in self.recipes.tensors:  # a tie kept: the stored member's recipe
            stored = self.recipes.tensors[name].name
            recipe = self.recipes.recipes.get(stored)
        if recipe is None or recipe.untouched:
            return recipe, torch.zeros_like(W, dtype=torch.float32)
        W = W.float()
        start = W
        if recipe.start is not BASE:
            index, key = recipe.start
            start = self.bound[index].adapter.read(key, self.device).float()
        updates = [
            kernel_update(self.bound[i].adapter, self.bound[i].targets[k].lora, weight=self.weights[i])
            for i, k in recipe.updates
        ]
        if any(u.magnitude is not None for u in updates):  # DoRA depends on W: the kernel, in float64
            merged = merge_into(
                start.double(), updates, out_dtype=torch.float64, precise=True, device=self.device, name=name
            )
            value = merged
        elif updates:
            delta = delta_into(updates[0], tuple(start.shape))
            if updates[0].weight != 1:
                delta.mul_(updates[0].weight)
            for u in updates[1:]:
                delta.add_(delta_into(u, tuple(start.shape)), alpha=u.weight)
            if start is W and not recipe.bias_terms and not recipe.token_rows:
                return recipe, delta  # ΔW itself: W + ΔW − W would cancel digits
            value = start + delta
        else:
            value = start
        if recipe.bias_terms:
            terms = []
            for index, key in recipe.bias_terms:
                lora = self.bound[index].targets[key].lora
                terms.append(
                    (self.bound[index].adapter.read_lora_bias(lora), self.weights[index] * lora.scale)
                )
            value = merge_bias(value.double(), terms, out_dtype=torch.float64, precise=True, name=name)
        value = self._rows(recipe, W, value)
        if tuple(value.shape) != tuple(W.shape):
            return recipe, value.float()  # a resized saved tensor: its value is what is compared
        return recipe, (value.double() - W.double()).float()

    def _rows(self, recipe: Recipe, W, value):
        if not recipe.token_rows:
            return value
        rows = []
        for index, module in recipe.token_rows:
            tokens = self.bound[index].tokens[module].rows
            rows.append((tokens.indices, self.bound[index].adapter.read(tokens.key)))
        return overwrite_rows(value.double(), rows, out_dtype=torch.float64)

    def run(self, work: list[Unit], progress=None):
        """(checks, changed) over every unit, in order of completion."""
        checks, changed = [], []
        limit = 2 * max((u.bytes for u in work), default=0) * 3
        pipeline = Pipeline(
            work, self.read, self.check, workers=2, cost=lambda u: 3 * u.bytes, limit=limit, name="verify"
        )
        with pipeline:
            for done, (unit, (found, moved)) in enumerate(pipeline, 1):
                checks.extend(found)
                changed.extend(moved)
                if progress is not None:
                    progress(done, len(work), unit.names[0])
        return checks, changed


def _untouched(name: str, W, A, base_info, artifact_info, rounding: float | None = None) -> list[Changed]:
    """[] when the artifact keeps `name` as the base has it: byte-equal in the same dtype, else equal
    after rounding the base to the artifact's dtype (a quantized artifact: within its codes' rounding,
    `rounding` its ‖½ step‖ where its block scales give it)."""
    if A is None:
        return [Changed(name, "absent from the artifact")]
    if tuple(A.shape) != tuple(W.shape):
        return [Changed(name, f"shape {list(A.shape)}, the base's {list(W.shape)}")]
    if (
        base_info is not None
        and artifact_info is not None
        and not artifact_info.dequantized
        and not base_info.dequantized
        and artifact_info.dtype == base_info.dtype
    ):
        if torch.equal(A, W):
            return []
        return [Changed(name, f"differs (largest |Δ| {float((A.float() - W.float()).abs().max()):.3g})")]
    if not W.is_floating_point():
        return [] if torch.equal(A.to(W.dtype), W) else [Changed(name, "differs")]
    if artifact_info is not None and not artifact_info.dequantized:
        if torch.equal(W.to(A.dtype), A):
            return []
        return [Changed(name, f"differs after rounding to {artifact_info.dtype}")]
    H = A.float() - W.float()
    if rounding is not None:
        if norm(H) <= rounding + F32_NOISE * norm(W.float()):
            return []
        return [
            Changed(
                name,
                f"differs beyond its {artifact_info.dtype} rounding (‖Δ‖ {norm(H):.3g}, ‖½ step‖ {rounding:.3g})",
            )
        ]
    code, factor = (artifact_info.codes.dtype, 2.0) if artifact_info.codes is not None else ("F32", 1.0)
    if norm(H) <= half_ulp_norm(W.float(), code, factor) + half_ulp_norm(A.float(), code, factor):
        return []
    return [Changed(name, f"differs beyond {code} rounding (‖Δ‖ {norm(H):.3g})")]


def _gain(H: torch.Tensor, W: torch.Tensor) -> float:
    """δ = |⟨ΔŴ, W⟩| / ‖W‖²: how far a quantized artifact's codes scale the whole tensor (a scale
    search shrinks or stretches the grid; ρ moves by about as much, verdict.judge_quantized)."""
    size = inner(W, W)
    return abs(inner(H, W)) / size if size > 0 else 0.0


def _kept_members(artifact, structure) -> dict[str, str]:
    """{member: the artifact tensor transformers loads for it} of every tie group the artifact's own
    config keeps: the input embedding's stored tensor when it has one, else the first stored member."""
    kept = {}
    for group in structure.tied:
        stored = [n for n in group if n in artifact.tensors]
        if not stored:
            continue
        embedding = f"{structure.input_embedding}.weight" if structure.input_embedding else None
        keeper = embedding if embedding in stored else stored[0]
        for name in group:
            kept[name] = keeper
    return kept


def _tie_sides(checks: list[TensorCheck], surplus: dict, expected: dict, check, base):
    """A tie group's update on the wrong member: another member carries this member's ΔW on top of
    its own expected value (PEFT's merge_and_unload writes a tied lm_head's update into the tensor it
    shares with embed_tokens), or this member lacks it because the artifact's config keeps a tie the
    adapters broke, so transformers loads another member in its place."""
    by_name = {c.name: c for c in checks}
    for c in checks:
        if c.comparison is None or c.kind not in ("lora", "dora"):
            continue
        delta = expected[c.name][1]
        for other, extra in surplus.items():
            if other == c.name or extra.shape != delta.shape:
                continue
            tolerance = check.tolerance(other, delta)
            if norm(extra) > tolerance and norm(extra - delta) <= tolerance:
                c.verdict = "wrong side of a tie"
                c.detail = f"its update also landed on {other}, which the tie rule keeps without it"
                if other in by_name:
                    by_name[other].verdict = "wrong side of a tie"
                    by_name[other].detail = f"it carries the update of {c.name}, its tied member"
        stored_as = check.kept.get(c.name)
        if c.verdict == "missing" and stored_as not in (None, c.name) and c.name in check.artifact.tensors:
            c.verdict = "wrong side of a tie"
            c.detail = (
                f"the artifact stores {c.name} with the update, but its config ties it to {stored_as}, "
                f"which transformers loads in its place"
            )
