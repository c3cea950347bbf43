"""What `rank-report` and its `--probe` analyse of a TARGET: an adapter folder or a model's weights.

Shared by rank_report.py and probe.py (probe imports it, not rank_report: no import cycle).
"""

from __future__ import annotations

from pathlib import Path

from lorasurgery.model import in_block, structure_of


def is_adapter(path: Path) -> bool:
    """A folder holding an adapter_config.json is an adapter; anything else is a model."""
    return path.is_dir() and (path / "adapter_config.json").is_file()


def selected_weights(checkpoint, include_re, config_file=None) -> list[str]:
    """The 2-D `.weight` tensors a model report analyses: those --include matches, else every one in a
    transformer block that is not an embedding (the structure says which)."""
    structure = structure_of(checkpoint, config_file) if include_re is None else None
    names = []
    for name, info in checkpoint.tensors.items():
        if len(info.shape) != 2 or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if include_re is not None:
            if include_re.search(module):
                names.append(name)
        elif in_block(name) and not structure.is_embedding(module):
            names.append(name)
    return names
