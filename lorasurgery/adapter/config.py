"""adapter_config.json: the fields that change what an adapter means, validated.

Anything PEFT would merge differently from plain LoRA (other PEFT types, LoRA variants, adapters
whose base PEFT modified at initialisation) is refused with UnsupportedError rather than handled
wrongly. Per-module rank and alpha follow PEFT's `get_pattern_key`: key K matches module N when
`re.match(rf"(.*\\.)?({K})$", N)`, and the first matching key in dict order wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import AdapterError, UnsupportedError

# Config fields that, when set, make the adapter something other than W + s·B@A.
_VARIANT_FIELDS = {
    "alora_invocation_tokens": "aLoRA",
    "velora_config": "VeLoRA",
    "arrow_config": "Arrow",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer_replication",
}
# init_lora_weights values whose adapters belong to a base PEFT modified at initialisation.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_key(pattern_keys, module_name: str) -> str | None:
    """PEFT's get_pattern_key: the first key K with re.match(rf"(.*\\.)?({K})$", name), else None."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class AdapterConfig:
    path: Path  # the adapter_config.json file
    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: object = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    target_parameters: list[str] = field(default_factory=list)  # "<module>.<parameter>" entries
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    raw: dict = field(default_factory=dict)

    def targeted_parameters(self, module_name: str) -> list[str]:
        """Leaf names of the nn.Parameters of `module_name` that target_parameters targets (PEFT: the
        entry equals "<module>.<parameter>" or is a dotted suffix of it)."""
        found = []
        for entry in sorted(set(self.target_parameters)):
            module, _, parameter = entry.rpartition(".")
            key = f"{module_name}.{parameter}"
            if module and (key == entry or key.endswith("." + entry)) and parameter not in found:
                found.append(parameter)
        return found

    def token_indices(self, module_name: str, only: bool) -> list[int] | None:
        """The rows trainable_token_indices overwrites in `module_name`: a list applies to the input
        embedding (`only`: the adapter's one trainable-token module), a dict by module name/suffix."""
        indices = self.trainable_token_indices
        if isinstance(indices, dict):
            for key, rows in indices.items():
                if module_name == key or module_name.endswith("." + key):
                    return list(rows)
            return None
        return list(indices) if indices is not None and only else None

    def rank_of(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_of(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_of(self, module_name: str, r: int) -> float:
        """PEFT's LoraLayer.scaling: α/r, or α/√r with rsLoRA."""
        alpha = self.alpha_of(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern(raw: dict, name: str, path: Path, integer: bool) -> dict:
    pattern = raw.get(name) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{path}: malformed {name} (must map module patterns to numbers)")
    for key, value in pattern.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as error:
            raise AdapterError(f"{path}: malformed {name} key {key!r} ({error})") from None
        if not _number(value) or (integer and (not isinstance(value, int) or value < 1)):
            kind = "a positive integer" if integer else "a number"
            raise AdapterError(f"{path}: {name}[{key!r}] must be {kind}, got {value!r}")
    return dict(pattern)


def _token_indices(value, path: Path):
    """trainable_token_indices: a list of token ids, or {embedding module: list of token ids}."""
    if value is None:
        return None

    def rows(items) -> bool:
        return isinstance(items, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        )

    if rows(value) or (
        isinstance(value, dict) and all(isinstance(k, str) and rows(v) for k, v in value.items())
    ):
        return value
    raise AdapterError(
        f"{path}: trainable_token_indices must be a list of token ids or map module names to lists of token ids"
    )


def parse_adapter_config(raw: dict, path: Path) -> AdapterConfig:
    """Validate a loaded adapter_config.json; refuse what lorasurgery would merge wrongly."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for name, label in _VARIANT_FIELDS.items():
        if raw.get(name):
            raise UnsupportedError(f"{path}: {label} adapters are not supported ({name} is set)")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise UnsupportedError(
            f"{path}: init_lora_weights={init!r}: this adapter belongs to a base that PEFT modified at "
            f"initialisation, not to the original base; merging it into the original would be wrong"
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if not _number(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    bias = raw.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise AdapterError(f"{path}: bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    modules_to_save = raw.get("modules_to_save")
    if modules_to_save is not None and (
        not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save)
    ):
        raise AdapterError(f"{path}: modules_to_save must be a list of module names")
    target_parameters = raw.get("target_parameters") or []
    if not isinstance(target_parameters, list) or not all(isinstance(t, str) for t in target_parameters):
        raise AdapterError(f"{path}: target_parameters must be a list of parameter names")
    return AdapterConfig(
        path=path,
        peft_type=peft_type,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        bias=bias,
        lora_bias=bool(raw.get("lora_bias", False)),
        rank_pattern=_pattern(raw, "rank_pattern", path, integer=True),
        alpha_pattern=_pattern(raw, "alpha_pattern", path, integer=False),
        target_modules=raw.get("target_modules"),
        modules_to_save=modules_to_save,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        task_type=raw.get("task_type"),
        target_parameters=target_parameters,
        trainable_token_indices=_token_indices(raw.get("trainable_token_indices"), path),
        raw=dict(raw),
    )
