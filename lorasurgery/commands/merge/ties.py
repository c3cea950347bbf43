"""Tied tensors in a merge, in one rule.

A tie group is a set of tensor names that are one parameter of the model (lm_head ↔ embed_tokens),
known from the model's structure (lorasurgery.model), never from equal shapes. Each member's
output is a recipe: where its value starts, and the LoRA updates added to it.

- start: the member's own saved copy (modules_to_save, a saved `<m>.weight`) if an adapter has one;
  else a saved `base_layer` of any member, which is the shared parameter itself; else the base's
  stored tensor. PEFT behaves so: a modules_to_save wrapper holds a copy for its side only, while
  the other side keeps pointing at the (possibly replaced) shared parameter.
- trainable tokens (rows overwritten) belong to the shared parameter: every member gets them and
  the group stays tied, as PEFT's tied TrainableTokensLayer does in its forward and its merge.
- updates: a LoRA applies to the side it targets only, as PEFT's forward does. (PEFT's
  merge_and_unload writes it into the shared tensor and so changes the other side too, against its
  own forward; its warning advises untying first, which is what this rule does.)

When every member ends with the same recipe (nothing changed, or one saved base layer replaced the
shared tensor, or equal saved copies), the group stays tied and only the tensors the base stores
are written. Otherwise every member is written and the group is untied (config.json gets
tie_word_embeddings: false for the word embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

BASE = None  # a recipe's start when it is the base's own tensor


@dataclass
class Recipe:
    """How one output tensor is made: a start and what is added to it."""

    start: tuple[int, str] | None = BASE  # (adapter index, adapter tensor name), or the base's tensor
    updates: list[tuple[int, str]] = field(default_factory=list)  # (adapter index, module)
    bias_terms: list[tuple[int, str]] = field(default_factory=list)  # lora_bias: (adapter index, module)
    token_rows: list[tuple[int, str]] = field(
        default_factory=list
    )  # trainable tokens: (adapter index, module)

    @property
    def untouched(self) -> bool:
        return self.start is BASE and not self.updates and not self.bias_terms and not self.token_rows


@dataclass(frozen=True)
class TieOutcome:
    group: tuple[str, ...]  # every member, in the structure's order
    written: tuple[str, ...]  # the members the output stores
    changed: tuple[str, ...]  # the members whose value the merge changes
    untied: bool


def tied_recipes(
    group: tuple[str, ...],
    own: dict[str, tuple[int, str]],
    shared: dict[str, tuple[int, str]],
    updates: dict[str, Recipe],
) -> dict[str, Recipe]:
    """Each member's recipe: its own saved copy, else the shared saved base layer, plus its own updates.

    `shared` holds at most one value per group (the caller refuses saved base layers that differ)."""
    shared_start = next((shared[n] for n in group if n in shared), BASE)
    # Trainable tokens overwrite rows of the shared parameter itself: every member gets them.
    rows = [row for n in group for row in updates.get(n, Recipe()).token_rows]
    recipes = {}
    for name in group:
        side = updates.get(name, Recipe())
        recipes[name] = Recipe(
            own.get(name, shared_start), list(side.updates), list(side.bias_terms), list(rows)
        )
    return recipes


def decide_tie(
    group: tuple[str, ...],
    stored: set[str],
    recipes: dict[str, Recipe],
    same_values: Callable[[tuple[int, str], tuple[int, str]], bool],
) -> TieOutcome:
    """Whether the group stays tied after the merge, and which members are written."""
    changed = tuple(n for n in group if not recipes[n].untouched)
    first = recipes[group[0]]
    same = all(
        not r.updates and not r.bias_terms and r.token_rows == first.token_rows for r in recipes.values()
    ) and all(
        r.start == first.start
        or (r.start is not BASE and first.start is not BASE and same_values(r.start, first.start))
        for r in recipes.values()
    )
    if same:
        return TieOutcome(group, tuple(n for n in group if n in stored), changed, untied=False)
    return TieOutcome(group, group, changed, untied=True)
