"""verify of an adapter artifact: the update a serving target computes from it, by its own rules.

ARTIFACT is an adapter folder or file (an `export --for vllm|sglang|peft` output, PEFT's own
save_pretrained, another tool's conversion) or a llama.cpp GGUF LoRA file. Per base tensor, the
update the target applies (docs/design.md §14, docs/verify.md "Adapter artifacts"):

- peft      each module's own scale α_m/r_m (α_m/√r_m with rsLoRA), rank_pattern / alpha_pattern
            read, DoRA, lora_bias and saved tensors applied (what lorasurgery.adapter reads);
- vllm      by release (lorasurgery.targets.VLLM_RULES; `vllm` the newest known, `vllm==0.31` an
            older one): 0.32 each module's own scale as PEFT; 0.7.0 – 0.31 one scale lora_alpha/r of
            the config (lora_alpha/√r with use_rslora), patterns ignored; 0.6.5 – 0.6.6 refuses
            use_rslora (every tensor `refused`); 0.6.4 reads lora_alpha/r. The other releases that
            would compute something else from the artifact are listed (targets.other_releases);
- sglang    one scale lora_alpha/r, use_rslora not read;
- llama.cpp a GGUF file: `blk.N.attn_q.weight.lora_a` / `.lora_b` read with the `gguf` package,
            per tensor adapter.lora.alpha / rank(lora_b) (alpha 0: scale 1), token_embd's lora_a
            stored transposed, Llama's q/k rows of lora_b permuted (undone, lorasurgery.llamacpp).

What the target refuses or misreads (DoRA, saved tensors, lora_bias for vLLM …: the rules of
lorasurgery.targets) is listed as a problem: the check fails. The expected update is PEFT's ΔW of
the original adapters (the recipes merge writes). Where both sides are plain LoRA the comparison is
factored (verdict.compare_factored: r × r matrices, no d × k product); otherwise (DoRA, saved
tensors, lora_bias, trainable tokens, expert parameters) both sides are formed densely by the merge
kernel, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import bind
from lorasurgery.commands.verify.gguf_model import gguf_field, open_gguf
from lorasurgery.commands.verify.merged import F32_NOISE, Changed, MergedCheck, TensorCheck, shape_differs
from lorasurgery.commands.verify.verdict import MANTISSA_BITS, compare, compare_factored, factored_norm, norm
from lorasurgery.errors import OptionError, UnsupportedError
from lorasurgery.linalg.update import factors, to_stored
from lorasurgery.llamacpp import gguf_architecture, gguf_names, llama_unpermute, permuted_heads
from lorasurgery.recipes import Recipes, plan_recipes
from lorasurgery.targets import PASS, ReleaseDifference, Target, check_rules, other_releases, parse_target

GGUF_MAGIC = b"GGUF"
# A GGUF tensor type's rounding as (safetensors float code, factor): a block-quantized type's step is
# its int codes' (Q8_0: 7 bits of magnitude), doubled since its block scale need not be a power of two.
GGUF_GRID = {"F32": ("F32", 1.0), "F16": ("F16", 1.0), "BF16": ("BF16", 1.0), "Q8_0": ("BF16", 2.0)}
COARSE = ("F8_E4M3", 2.0)  # other quantized types: a 4-bit-like grid, at most
# Rules of lorasurgery.targets that verify measures itself (the scale) or that do not change what
# the target computes (PEFT's saved copies of a targeted embedding, which vLLM skips).
MEASURED_RULES = {"scale", "embedding_copies"}


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def gguf_kind(path: Path) -> str:
    """A GGUF file's general.type: 'adapter' (a LoRA) or 'model' (the default when unset)."""
    import gguf

    return gguf_field(open_gguf(path), gguf.Keys.General.TYPE) or "model"


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (
        path.is_file() and path.name.startswith("adapter_model") and not is_gguf(path)
    )


@dataclass
class Term:
    """One low-rank term of an update, float64, PEFT's (out, in) orientation: ΔW += B @ A (scale in B)."""

    B: torch.Tensor
    A: torch.Tensor


@dataclass
class Landed:
    """What the target computes for one base tensor from the artifact."""

    terms: list[Term] = field(default_factory=list)  # plain LoRA terms
    dense: bool = False  # not plain LoRA: formed by the merge kernel (a PEFT folder's recipe)
    rounding: float = 0.0  # ‖the factors' storage rounding‖ propagated to ΔŴ (a bound)
    refused: str = ""  # the target refuses this tensor: why


@dataclass
class AdapterArtifact:
    """An adapter artifact read by one target's rules: per base tensor what lands, and problems."""

    target: Target
    rule: str  # how the target was chosen
    landed: dict[str, Landed] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what the target refuses or misreads
    extra: list[str] = field(default_factory=list)  # artifact tensors no base tensor answers to
    check: MergedCheck | None = None  # a PEFT folder's own recipes, for the dense path
    releases: list[ReleaseDifference] = field(default_factory=list)  # vLLM: other releases' reading
    adapter: object = None  # a PEFT folder: the artifact as lorasurgery.adapter loaded it


def choose_target(path: Path, target) -> tuple[Target, str]:
    """(target, the rule that chose it) for artifact `path`; `target` a Target, its text (`vllm==0.31`,
    lorasurgery.targets.parse_target) or None."""
    gguf_file = is_gguf(path)
    spec = None
    if target is not None:
        try:
            spec = parse_target(target)
        except OptionError as error:
            raise OptionError(f"--target: {error}") from None
    name = spec.name if spec else None
    if gguf_file:
        if name not in (None, "llama.cpp"):
            raise UnsupportedError(
                f"{path}: is a GGUF file, which only llama.cpp loads; --target {spec} reads PEFT folders "
                f"(pass --target llama.cpp or leave it out)"
            )
        return parse_target("llama.cpp"), "--target llama.cpp" if spec else "a GGUF file: llama.cpp's format"
    if name == "llama.cpp":
        raise UnsupportedError(
            f"{path}: --target llama.cpp reads a GGUF LoRA file (export --for llama.cpp, "
            f"convert_lora_to_gguf.py); this is a PEFT adapter: pass its GGUF, or --target vllm|sglang|peft"
        )
    if spec is not None:
        return spec, f"--target {spec}" + (f": the rules of {spec.description}" if spec.releases else "")
    return (
        parse_target("peft"),
        "an adapter folder without --target: PEFT's rules (pass --target vllm|sglang for a server's)",
    )


def read_adapter_artifact(
    path: Path, target: Target, rule: str, checkpoint, structure, device
) -> AdapterArtifact:
    if target.name == "llama.cpp":
        return _read_gguf_lora(path, rule, checkpoint, structure)
    return _read_peft(path, target, rule, checkpoint, structure, device)


def _read_peft(path, target, rule, checkpoint, structure, device) -> AdapterArtifact:
    adapter = load_adapter(path)
    found = AdapterArtifact(target, rule, adapter=adapter)
    refused = target.refusals(adapter.config)  # the whole adapter: vLLM 0.6.5 – 0.6.6 and use_rslora
    if target.name != "peft":
        found.problems.extend(refused)
        for r in check_rules(adapter, target, base_config=checkpoint.config, structure=structure):
            if r.status != PASS and r.id not in MEASURED_RULES:
                listed = ", ".join(r.modules[:4]) + (
                    f" and {len(r.modules) - 4} more" if len(r.modules) > 4 else ""
                )
                found.problems.append(f"{target}: {r.requirement}" + (f" ({listed})" if listed else ""))
        found.releases = other_releases(adapter, target)
    (bound,) = bind([adapter], checkpoint, structure=structure)
    if target.name != "peft":  # the server's scale, and no DoRA magnitude (refused above)
        bound = _rescaled(bound, lambda lo: target.scale(adapter.config, lo.name, lo.r))
    recipes = plan_recipes([bound])
    found.check = MergedCheck([bound], [1.0], recipes, checkpoint, structure, device)
    for name, recipe in recipes.recipes.items():
        if recipe.untouched:
            continue
        if refused:
            why = "; ".join(r.does for r in target.refused(adapter.config))
            found.landed[name] = Landed(refused=f"{target.description} does not load the adapter: {why}")
            continue
        landed = Landed(rounding=0.0)
        plain = found.check.plain(recipe)
        for _, key in recipe.updates:
            lora = bound.targets[key].lora
            f = factors(adapter, lora, device)
            bits = MANTISSA_BITS.get(adapter.checkpoint.tensors[lora.b_key].dtype, 23)
            B, A = f.B.double() * f.scale, f.A.double()
            landed.rounding += _factor_rounding(B, A, bits, 1.0)
            if plain:
                landed.terms.append(Term(B, A))
        landed.dense = not plain
        found.landed[name] = landed
    return found


def _rescaled(bound, scale_of):
    """`bound` with every module's scale replaced by the target's and DoRA dropped."""

    def fix(module):
        lora = dataclasses.replace(module.lora, scale=scale_of(module.lora), dora=False, magnitude_key=None)
        return dataclasses.replace(module, lora=lora)

    return dataclasses.replace(
        bound,
        modules={k: fix(m) for k, m in bound.modules.items()},
        targets={k: fix(m) for k, m in bound.targets.items()},
    )


def _factor_rounding(B: torch.Tensor, A: torch.Tensor, bits: int, factor: float) -> float:
    """A bound of ‖ΔW's change‖ when each element of B and A moved by half an ulp of `bits`
    mantissa bits: ‖δB·A‖ + ‖B·δA‖ ≤ 2^-(bits+1)·2·‖B‖·‖A‖ (Frobenius norms)."""
    return factor * math.ldexp(2 * float(B.norm()) * float(A.norm()), -(bits + 1))


def _read_gguf_lora(path: Path, rule: str, checkpoint, structure) -> AdapterArtifact:
    """A llama.cpp GGUF LoRA, as llama-adapter.cpp loads it (docs/verify.md, "Adapter artifacts")."""
    import gguf

    reader = open_gguf(path)
    found = AdapterArtifact(parse_target("llama.cpp"), rule)
    if gguf_field(reader, gguf.Keys.Adapter.TYPE) != "lora":
        found.problems.append(
            f"adapter.type is {gguf_field(reader, gguf.Keys.Adapter.TYPE)!r}: llama.cpp loads 'lora'"
        )
    config = checkpoint.config or {}
    try:
        _, arch = gguf_architecture(config)
    except UnsupportedError as error:
        raise UnsupportedError(f"{path}: {error}; verify maps GGUF names only for these") from error
    if gguf_field(reader, gguf.Keys.General.ARCHITECTURE) != arch:
        found.problems.append(
            f"general.architecture is {gguf_field(reader, gguf.Keys.General.ARCHITECTURE)!r}, the base's is "
            f"{arch!r}: llama.cpp refuses the adapter ('model arch and LoRA arch mismatch')"
        )
    alpha = float(gguf_field(reader, gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
    names = gguf_names(checkpoint.tensors, config)
    pairs: dict[str, dict[str, object]] = {}
    for tensor in reader.tensors:
        stem, _, part = tensor.name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(stem, {})[part] = tensor
        else:
            found.extra.append(tensor.name)
    for stem, pair in pairs.items():
        name = names.get(stem)
        if name is None:
            found.extra.extend(f"{stem}.{p}" for p in pair)
            continue
        if len(pair) < 2:
            lacking = "lora_b" if "lora_a" in pair else "lora_a"
            found.landed[name] = Landed(refused=f"{stem}.{lacking} is missing: llama.cpp refuses the adapter")
            continue
        found.landed[name] = _gguf_pair(stem, name, pair, alpha, checkpoint, config)
    return found


def _gguf_pair(stem, name, pair, alpha, checkpoint, config) -> Landed:
    a, b = (_gguf_array(pair[p]) for p in ("lora_a", "lora_b"))
    grid = max(
        (_gguf_grid(pair[p]) for p in ("lora_a", "lora_b")), key=lambda g: (-MANTISSA_BITS[g[0]], g[1])
    )
    embedding = stem.startswith("token_embd")
    info = checkpoint.tensors[name]
    rows, cols = (info.shape[1], info.shape[0]) if embedding else (info.shape[0], math.prod(info.shape[1:]))
    A = a.T if embedding else a  # token_embd's lora_a is Aᵀ (vocab, r): the input path gathers its rows
    # llama-adapter.cpp's checks, in PEFT's orientation: A (r, in), B (out, r), ranks equal
    if A.dim() != 2 or b.dim() != 2 or A.shape[1] != cols or b.shape[0] != rows or A.shape[0] != b.shape[1]:
        return Landed(
            refused=f"lora_a {list(a.shape)} and lora_b {list(b.shape)} do not fit {stem} ({rows} × {cols}): "
            f"llama.cpp refuses the adapter ('tensor has incorrect shape' / 'lora_a tensor is not transposed')"
        )
    rank = b.shape[1]
    scale = alpha / rank if alpha else 1.0  # llama-adapter.cpp: alpha ? alpha / rank : 1
    heads = permuted_heads(name, config)
    if heads is not None:  # convert_lora_to_gguf.py permuted lora_b's rows for llama.cpp's rotary layout
        b = llama_unpermute(b, *heads)
    B = b * scale
    return Landed(terms=[Term(B, A)], rounding=_factor_rounding(B, A, MANTISSA_BITS[grid[0]], grid[1]))


def _gguf_array(tensor) -> torch.Tensor:
    import gguf
    import numpy as np

    data = tensor.data
    if tensor.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F64):
        data = gguf.quants.dequantize(data, tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64))


def _gguf_grid(tensor) -> tuple[str, float]:
    return GGUF_GRID.get(tensor.tensor_type.name, COARSE)


# ------------------------------------------------------------------------------------ the check


def check_adapter_artifact(
    found: AdapterArtifact, bound, weights, recipes: Recipes, device
) -> tuple[list, list]:
    """(checks, changed): every tensor the adapters touch against what the target lands on it, and
    every tensor the artifact updates that the adapters leave alone."""
    expected = MergedCheck(bound, weights, recipes, bound[0].checkpoint, bound[0].structure, device)
    checks, changed = [], []
    for name, recipe in recipes.recipes.items():
        if recipe.untouched:
            continue
        kind, modules = expected.describe(recipe)
        landed = found.landed.get(name, Landed())
        if landed.refused:
            checks.append(TensorCheck(name, kind, modules, None, "refused", landed.refused))
            continue
        checks.append(_compare(name, recipe, kind, modules, landed, found, expected))
    for name, landed in found.landed.items():
        if name in recipes.recipes and not recipes.recipes[name].untouched:
            continue
        size = _landed_norm(name, landed, found, expected)
        if landed.refused:
            changed.append(Changed(name, f"is in the artifact but refused: {landed.refused}"))
        elif size > landed.rounding:
            changed.append(
                Changed(name, f"gets an update from the artifact (‖ΔŴ‖ {size:.3g}) the adapters do not make")
            )
    return checks, changed


def _expected_terms(recipe, expected: MergedCheck) -> list[Term]:
    """PEFT's terms w·s·B, A of a plain recipe, float64, from the check's bound adapters and weights."""
    terms = []
    for index, key in recipe.updates:
        bound = expected.bound[index]
        f = factors(bound.adapter, bound.targets[key].lora, expected.device)
        terms.append(Term(f.B.double() * (f.scale * expected.weights[index]), f.A.double()))
    return terms


def _stack(terms: list[Term], rows: int, cols: int, dtype=torch.float64):
    if not terms:
        return torch.zeros(rows, 0, dtype=dtype), torch.zeros(0, cols, dtype=dtype)
    return torch.cat([t.B for t in terms], dim=1), torch.cat([t.A for t in terms], dim=0)


def _compare(name, recipe, kind, modules, landed: Landed, found, expected: MergedCheck) -> TensorCheck:
    """ΔŴ the target lands on `name` against PEFT's ΔW (`expected` holds the bound adapters, their
    weights and the device): factored where both are plain LoRA, else dense."""
    plain = expected.plain(recipe) and not landed.dense
    if plain:
        Db, Da = _stack(_expected_terms(recipe, expected), 0, 0)
        Hb, Ha = _stack(landed.terms, Db.shape[0], Da.shape[1])
        if (Hb.shape[0], Ha.shape[1]) != (Db.shape[0], Da.shape[1]):
            found_shape, expected_shape = (Hb.shape[0], Ha.shape[1]), (Db.shape[0], Da.shape[1])
            return shape_differs(name, kind, modules, found_shape, expected_shape)
        n = factored_norm(Db, Da)
        tolerance = landed.rounding + F32_NOISE * n
        comparison = compare_factored(Hb, Ha, Db, Da, tolerance)
        return TensorCheck(name, kind, modules, comparison, comparison.label)
    W = expected.base.read(expected.recipes.tensors[name].name, expected.device)
    _, D = expected.expected(name, W)
    H = _dense_landed(name, landed, found, W, recipe, expected.bound)
    n = norm(D)
    comparison = compare(H, D, landed.rounding + F32_NOISE * n, n)
    return TensorCheck(name, kind, modules, comparison, comparison.label)


def _dense_landed(name, landed: Landed, found: AdapterArtifact, W, recipe=None, bound=None) -> torch.Tensor:
    """ΔŴ of `name` in the base's stored layout, float32."""
    if found.check is not None and name in found.check.recipes.recipes:
        return found.check.expected(name, W)[1].float()
    H = torch.zeros_like(W, dtype=torch.float32)
    if not landed.terms:
        return H
    Hb, Ha = _stack(landed.terms, 0, 0)
    product = (Hb @ Ha).float()
    lora = None
    if recipe is not None and recipe.updates:
        index, key = recipe.updates[0]
        lora = bound[index].targets[key].lora
    return to_stored(lora, product, W.shape) if lora is not None else product.reshape(W.shape)


def _landed_norm(name, landed: Landed, found: AdapterArtifact, expected: MergedCheck) -> float:
    if landed.refused:
        return 0.0
    if landed.terms and not landed.dense:
        Hb, Ha = _stack(landed.terms, 0, 0)
        return factored_norm(Hb, Ha)
    W = expected.base.read(expected.recipes.tensors[name].name, expected.device)
    return norm(_dense_landed(name, landed, found, W))
