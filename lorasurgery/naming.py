"""Names of modules as every command sorts and groups them (shared, so no command imports another).

- `natural_key`: model.layers.2 before model.layers.10 (extract, resize, combine write in this order);
- `module_type`: the last path component, what rank-report groups by and its plots are titled with;
- `layer_index`: the first `.N.` of a name, the x axis of rank-report's per-layer plots.
"""

from __future__ import annotations

import re

from lorasurgery.model import leaf


def natural_key(name: str):
    """model.layers.2 before model.layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def module_type(name: str) -> str:
    """The last path component; an expert's entry (`…gate_up_proj[3]`) counts as its parameter's."""
    return re.sub(r"\[\d+\]$", "", leaf(name))


def layer_index(name: str) -> int | None:
    """The block index of `name` (`model.layers.3.mlp` → 3), None outside a numbered block."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None
