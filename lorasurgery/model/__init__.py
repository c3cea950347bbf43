"""The model's structure (docs/architecture.md, layer 3): what each module is, how each weight is
stored, what is tied — from a weightless skeleton of config.json, never guessed from a flag or a shape.

- structure.py  `structure_of`: a checkpoint's Structure (kinds, layouts, ties, split-stored experts)
- skeleton.py   the meta-device skeleton, built in a child process and cached
- layouts.py    `linear_layouts`: each LoRA target's layout, and the assumptions stated where nothing decides
- experts.py    `ExpertSlice`: which slice of a fused 3-D expert parameter a per-expert module is
"""

from lorasurgery.model.experts import ExpertSlice
from lorasurgery.model.layouts import Layout, LinearTarget, fan_in_fan_out_matcher, linear_layouts
from lorasurgery.model.skeleton import prefetch
from lorasurgery.model.structure import (
    Module,
    Structure,
    in_block,
    leaf,
    model_tensors,
    read_config,
    structure_of,
)

__all__ = [
    "ExpertSlice",
    "Layout",
    "LinearTarget",
    "Module",
    "Structure",
    "fan_in_fan_out_matcher",
    "in_block",
    "leaf",
    "linear_layouts",
    "model_tensors",
    "prefetch",
    "read_config",
    "structure_of",
]
