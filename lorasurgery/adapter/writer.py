"""Writing a PEFT LoRA adapter folder with per-module ranks, so that `PeftModel.from_pretrained` reloads it.

Every module gets α = r (scale 1). The most common rank is the config's `r`; the others go into
`rank_pattern` and `alpha_pattern` keyed by full module paths, checked against PEFT's own matching
rules (`get_pattern_key`: key K applies to module N when re.match(rf"(.*\\.)?({K})$", N), first key
wins; a target T wraps N when N == T or N ends with "." + T; a modules_to_save entry S wraps N when N
ends with S). Used by extract, resize and combine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from lorasurgery.adapter.config import pattern_key
from lorasurgery.errors import LoraSurgeryError


def rank_patterns(module_ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r, rank_pattern): r the most common rank (the larger on a tie), the others by full module path.

    Raises when PEFT would resolve some module to another module's key (an internal error: full
    paths never should)."""
    counts: dict[int, int] = {}
    for k in module_ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    pattern = {m: k for m, k in module_ranks.items() if k != r}
    for m in module_ranks:
        key = pattern_key(pattern, m)
        if (m in pattern and key != m) or (m not in pattern and key is not None):
            raise LoraSurgeryError(f"internal error: rank_pattern key for module {m} is ambiguous")
    return r, pattern


def check_module_keys(targets: Iterable[str], modules_to_save: Iterable[str], all_modules: set[str]) -> None:
    """Full module paths as targets / modules_to_save must wrap no other module of `all_modules`."""
    for target in targets:
        clash = [n for n in all_modules if n != target and n.endswith("." + target)]
        if clash:
            raise LoraSurgeryError(f"internal error: target {target} would also wrap {clash[0]}")
    for saved in modules_to_save:
        clash = [n for n in all_modules if n != saved and n.endswith(saved)]
        if clash:
            raise LoraSurgeryError(f"internal error: modules_to_save {saved} would also wrap {clash[0]}")


def lora_rank_fields(module_ranks: dict[str, int], natural_key=None) -> dict:
    """The adapter_config.json fields that give every module its rank at scale 1."""
    r, pattern = rank_patterns(module_ranks)
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(module_ranks, key=natural_key),
        "use_rslora": False,
        "use_dora": False,
    }


def write_adapter_folder(folder: str | os.PathLike, tensors: dict, config: dict) -> None:
    """adapter_model.safetensors and adapter_config.json into `folder` (an atomic_output_dir's temp)."""
    from lorasurgery.io import save_tensors

    folder = Path(folder)
    save_tensors(folder, tensors, stem="adapter_model")
    with open(folder / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
