"""What each serving stack can load, as rules checked against an adapter (`inspect --for`, `export`,
`verify` of an adapter artifact: the scale each target applies).

Every rule states one requirement of a target's loader, read from its source (cited in docs/export.md,
"Rules"), and is checked per module: `pass` (loadable as is), `fixed` (export rewrites the adapter so
that the target's own formula gives PEFT's ΔW exactly, or with the error reported), or `impossible`
(the target cannot carry it; the rule names the exact alternative). Nothing here reads a tensor.

Targets:
- vllm     one global scale α/r (α/√r with use_rslora), patterns ignored by older releases; no DoRA,
           no modules_to_save, no bias / lora_bias; every module's rank ≤ --max-lora-rank.
- sglang   one global scale α/r, use_rslora ignored; q/k/v and gate/up stacked into one buffer of
           one rank; target_modules reduced to leaf names; no DoRA, no saved modules, no bias.
- llama.cpp a GGUF file: per tensor scale α/rank(tensor), one α; only lora_a/lora_b pairs (no saved
           modules, no bias); architectures whose tensor names and permutations export implements.
- peft     a normalised PEFT folder: what PEFT itself loads (every feature except DoRA's dependence on
           a base, which stays as is), scales folded, patterns resolved, stale keys dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def target_scale(target: str, config, r: int) -> float:
    """The scale the target applies to a module of rank r, from the adapter's global config."""
    alpha = config.lora_alpha
    if target == "vllm":
        return alpha / math.sqrt(config.r) if config.use_rslora else alpha / config.r
    if target == "sglang":
        return alpha / config.r
    if target == "llama.cpp":
        return alpha / r
    raise ValueError(f"no global scale formula for target {target!r}")


def _listed(names: list[str]) -> list[str]:
    return sorted(names)


# What each target's loader does, per rule (read from its source; docs/export.md "Rules").
_SCALE_RULE = {
    "vllm": "vLLM applies one scale lora_alpha/r (lora_alpha/√r with use_rslora) to every module "
    "(releases before per-module patterns ignore rank_pattern/alpha_pattern)",
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
    target: str,
    *,
    base_config: dict | None = None,
    have_base_weights: bool = False,
    max_rank: int | None = None,
    drop_saved: bool = False,
    structure=None,
) -> list[Rule]:
    """Every rule of `target` checked against `adapter` (an Adapter). `base_config` is the base's
    config.json (llama.cpp needs it, with `structure`, the base's model.Structure, for its
    ties); `have_base_weights` says whether DoRA can be converted."""
    rules = [_scale_rule(adapter, target)]
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


def _scale_rule(adapter, target: str) -> Rule:
    """Does the target's formula give each module's true scale?"""
    config, modules = adapter.config, adapter.modules
    if target == "peft":
        folded = config.rank_pattern or config.alpha_pattern or config.use_rslora
        wrong = list(modules) if folded else []
        action = "scales folded into lora_B, lora_alpha = r, no rsLoRA or patterns left to interpret"
    else:
        wrong = [
            m
            for m, lo in modules.items()
            if not math.isclose(target_scale(target, config, lo.r), lo.scale, rel_tol=1e-12)
        ]
        action = "each module's true scale folded into lora_B so the target's formula is exact"
    return Rule(
        "scale", _SCALE_RULE[target], FIXED if wrong else PASS, _listed(wrong), action if wrong else ""
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
