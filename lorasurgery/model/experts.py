"""Per-expert modules of fused expert parameters: which slice of which 3-D parameter a 2-D module is.

transformers 5 fuses an MoE block's experts into 3-D parameters (`…experts.gate_up_proj` (E, d1, d2),
`…experts.down_proj`); transformers 4.x and most trainers kept one nn.Linear per expert and projection
(`…experts.{e}.gate_proj`, Mixtral's `…block_sparse_moe.experts.{e}.w1`), and their LoRA adapters
name those. A per-expert module is expert e's part k of n of the fused parameter:

    fused parameter            stored as              part k of n of expert e
    Qwen3-MoE / Mixtral        (E, out, in)           rows k·out/n … (k+1)·out/n of W[e]   (concatenated)
    gpt-oss (is_transposed)    (E, in, out)           columns k, k+n, k+2n … of W[e]       (interleaved)

Which names are parts of which parameter comes from the model, never from a shape: for Qwen3-MoE and
Mixtral from transformers' own conversion mapping (the sources it fuses, in order: gate before up,
w1 before w3; model/skeleton.py reads it into `Structure.stored`); gpt-oss checkpoints were always
fused, so its per-expert names are the trainers' (below: `{e}.gate_proj`/`{e}.up_proj`/`{e}.down_proj`,
gate taking the even columns of gate_up_proj and up the odd ones as GptOssExperts' forward does, and
Unsloth's `gate_up_projs.{e}`/`down_projs.{e}`, whole experts). lorasurgery.binding binds such a module
to its slice (docs/design.md §12); `ExpertSlice.view` is the one place the slice is taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Fused parameters whose per-expert names transformers' conversion mapping does not give (the checkpoints
# were never split): {experts class: {parameter: [(part names under the experts module, interleaved)]}}.
TRAINER_NAMES = {
    "GptOssExperts": {
        "gate_up_proj": [(("{e}.gate_proj", "{e}.up_proj"), True), (("gate_up_projs.{e}",), False)],
        "down_proj": [(("{e}.down_proj",), False), (("down_projs.{e}",), False)],
    },
}


@dataclass(frozen=True)
class ExpertSlice:
    """Expert `expert`'s part `part` of `parts` of the fused parameter `parameter` (E, d1, d2)."""

    parameter: str  # the fused parameter's name (the checkpoint's)
    expert: int
    experts: int
    part: int
    parts: int
    interleaved: bool  # parts alternate (gpt-oss gate/up), else they are concatenated
    transposed: bool  # the fused parameter is stored (E, in, out): the slice is stored (in, out)
    shape: tuple[int, int]  # the slice's stored shape

    @property
    def label(self) -> str:
        part = f", part {self.part + 1} of {self.parts}" if self.parts > 1 else ""
        return f"{self.parameter}[expert {self.expert}{part}]"

    def within(self, shape) -> tuple[int, ...] | None:
        """The slice's shape inside a fused parameter of stored `shape`; None when it has no expert
        `expert` or is not 3-D."""
        if len(shape) != 3 or self.expert >= shape[0]:
            return None
        experts, d1, d2 = shape
        size = (d2 if self.transposed else d1) // self.parts
        return (d1, size) if self.transposed else (size, d2)

    def view(self, W):
        """The slice of `W` (the fused parameter as stored, (E, d1, d2)): a view, in W's layout."""
        w = W[self.expert]
        size = w.shape[1 if self.transposed else 0] // self.parts
        index = (
            slice(self.part, None, self.parts)
            if self.interleaved
            else slice(self.part * size, (self.part + 1) * size)
        )
        return w[:, index] if self.transposed else w[index]


def expert_slices(structure) -> dict[str, ExpertSlice]:
    """{per-expert weight name (`…experts.3.gate_proj.weight`, every spelling): its ExpertSlice} of
    every fused expert parameter of `structure` (a model.Structure)."""
    found: dict[str, ExpertSlice] = {}
    if not structure.known:
        return found
    for name, stored in structure.stored.items():
        module = structure.module(name.rpartition(".")[0])
        if module is None:
            continue
        shape = module.parameters[name.rpartition(".")[2]]
        parts = len(stored.sources) if stored.concatenated else 1
        for part, spellings in enumerate(stored.sources[:parts]):
            for spelling in spellings:
                _add(found, spelling, name, shape, part, parts, False, module.transposed)
    for module in structure.modules.values():
        for parameter, layouts in TRAINER_NAMES.get(module.cls, {}).items():
            if parameter not in module.parameters:
                continue
            name = f"{module.name}.{parameter}"
            for names, interleaved in layouts:
                for part, pattern in enumerate(names):
                    spelling = f"{module.name}.{pattern}.weight"
                    shape = module.parameters[parameter]
                    _add(found, spelling, name, shape, part, len(names), interleaved, module.transposed)
    return found


def _add(found, spelling, name, shape, part, parts, interleaved, transposed) -> None:
    experts, d1, d2 = shape
    size = (d2 if transposed else d1) // parts
    sliced = (d1, size) if transposed else (size, d2)
    for e in range(experts):
        found[spelling.format(e=e)] = ExpertSlice(
            name, e, experts, part, parts, interleaved, transposed, sliced
        )


_EXPERT_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def grouped_label(name: str) -> str:
    """A per-expert module's name with its expert index taken out (`…experts.gate_proj`), so that
    reports show a module's experts as one module (the last number in the name is the expert's)."""
    matches = list(_EXPERT_INDEX.finditer(name))
    if not matches:
        return name
    last = matches[-1]
    return name[: last.start()] + name[last.end() :]
