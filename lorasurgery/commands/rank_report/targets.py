"""What `rank-report` and its `--probe` analyse of a TARGET: an adapter folder or a model's weights
(its 2-D `.weight` tensors; rank-report also each expert of its fused 3-D expert parameters).

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


def expert_parameters(checkpoint, include_re, config_file=None) -> dict[str, bool]:
    """{name: stored (E, in, out)} of the fused 3-D expert parameters a model report analyses expert
    by expert (`…experts.gate_up_proj`): the model's structure says which 3-D tensors are parameters
    of a module and how they are stored (transformers' is_transposed); --include matches their module."""
    if not any(len(info.shape) == 3 for info in checkpoint.tensors.values()):
        return {}
    structure = structure_of(checkpoint, config_file)
    found = {}
    for name, info in checkpoint.tensors.items():
        module = structure.module_of_tensor(name) if structure.known and len(info.shape) == 3 else None
        if module is None or len(module.parameters[name.rpartition(".")[2]]) != 3:
            continue
        if include_re.search(module.name) if include_re is not None else in_block(name):
            found[name] = module.transposed
    return found
