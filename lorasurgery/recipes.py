"""What each base tensor becomes under a set of adapters: one `Recipe` per touched tensor, ties
decided by one rule. merge writes these recipes; verify checks an artifact against them — one plan
of expected updates, not two (docs/design.md §3, §14).

`plan_recipes(bound)` takes the bound adapters (lorasurgery.binding) and gathers, per base tensor:
the saved tensor that replaces it (modules_to_save, a saved `<m>.weight`), or a saved `base_layer`
shared by a tie; the LoRA modules that update it (`(adapter index, target key)` into
`BoundAdapter.targets`); the lora_bias terms of its bias; the trainable-token rows that overwrite it.
Two adapters replacing one tensor must agree. Tie groups are then settled by the rule below.

The tie rule.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorasurgery.binding import BoundAdapter
from lorasurgery.errors import MismatchError
from lorasurgery.model import model_tensors

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


@dataclass
class Recipes:
    """Every tensor the adapters touch, with its recipe, and how each touched tie group ends."""

    recipes: dict[str, Recipe]  # base tensor name (a tied member by its own name) -> its recipe
    ties: list[TieOutcome]  # the tie groups something touches
    tensors: dict  # every name the model has (binding's model_tensors: tied members stored once too)

    def touched(self, name: str) -> bool:
        recipe = self.recipes.get(name)
        return recipe is not None and not recipe.untouched


_LISTED = 8  # how many names an error lists


def plan_recipes(bound: Sequence[BoundAdapter]) -> Recipes:
    """The recipes of `bound` (adapters bound together to one base); raises MismatchError naming the
    adapter when a saved tensor has no counterpart, two replacements disagree, or a lora_bias has no
    base bias to go to."""
    checkpoint, structure = bound[0].checkpoint, bound[0].structure
    adapters = [b.adapter for b in bound]
    paths = [b.path for b in bound]
    tensors = model_tensors(checkpoint, structure)
    groups = [g for g in structure.tied if any(n in checkpoint.tensors for n in g)]

    # Per tensor: its own saved copy, a saved base layer (the shared parameter), its updates.
    own: dict[str, tuple[int, str]] = {}
    shared: dict[str, tuple[int, str]] = {}
    sides: dict[str, Recipe] = {}
    for index, b in enumerate(bound):
        unmatched = [saved.relative for saved in b.saved if saved.name is None]
        if unmatched:
            raise MismatchError(
                f"{paths[index]}: saved tensors with no counterpart in the base: {', '.join(unmatched[:_LISTED])}"
                + (f" and {len(unmatched) - _LISTED} more" if len(unmatched) > _LISTED else "")
            )
        for saved in b.saved:
            _claim(shared if saved.base_layer else own, saved.name, (index, saved.key), adapters, paths)
        for key, module in b.targets.items():
            sides.setdefault(module.name, Recipe()).updates.append((index, key))
            if module.lora.lora_bias:
                bias_name = module.name[: -len("weight")] + "bias"
                if not module.name.endswith(".weight") or bias_name not in tensors:
                    raise MismatchError(
                        f"{paths[index]}: module {key} has lora_bias but the base has no {bias_name} to add it to"
                    )
                sides.setdefault(bias_name, Recipe()).bias_terms.append((index, key))
        for module, tokens in b.tokens.items():
            sides.setdefault(tokens.name, Recipe()).token_rows.append((index, module))

    # Tie groups by the one rule, every other tensor by itself.
    recipes: dict[str, Recipe] = {}
    outcomes: list[TieOutcome] = []
    in_group = {n for g in groups for n in g}

    def same_values(a, b) -> bool:
        return same_tensor(adapters[a[0]], a[1], adapters[b[0]], b[1])

    for group in groups:
        _check_shared(group, shared, same_values, paths)
        group_recipes = tied_recipes(group, own, shared, sides)
        if all(r.untouched for r in group_recipes.values()):
            continue
        outcome = decide_tie(group, set(checkpoint.tensors), group_recipes, same_values)
        outcomes.append(outcome)
        for name in outcome.written:
            recipes[name] = group_recipes[name]
    for name in {*own, *shared, *sides} - in_group:
        side = sides.get(name, Recipe())
        recipes[name] = Recipe(
            own.get(name, shared.get(name, BASE)), side.updates, side.bias_terms, side.token_rows
        )
    return Recipes(recipes, outcomes, tensors)


def same_tensor(adapter_a, name_a, adapter_b, name_b) -> bool:
    """Whether two adapters' saved tensors hold the same values."""
    import torch

    if tuple(adapter_a.tensors[name_a].shape) != tuple(adapter_b.tensors[name_b].shape):
        return False
    return torch.equal(adapter_a.read(name_a).float(), adapter_b.read(name_b).float())


def _claim(target: dict, name: str, value: tuple[int, str], adapters, paths) -> None:
    """Record that adapter value[0] replaces `name`; two adapters may only agree."""
    previous = target.get(name)
    if previous is not None and previous != value:
        if not same_tensor(adapters[previous[0]], previous[1], adapters[value[0]], value[1]):
            if previous[0] == value[0]:
                raise MismatchError(
                    f"{paths[value[0]]}: {previous[1]} and {value[1]} both replace {name} with different values"
                )
            raise MismatchError(
                f"{paths[previous[0]]} and {paths[value[0]]} both replace {name} "
                f"(modules_to_save or saved layers) with different values; merge them separately"
            )
        return
    target[name] = value


def _check_shared(group, shared: dict, same_values, paths) -> None:
    """Saved base layers of members of one tie group are one parameter: they must agree."""
    found = [(n, shared[n]) for n in group if n in shared]
    for name, value in found[1:]:
        first_name, first = found[0]
        if value != first and not same_values(value, first):
            sources = (
                f"{paths[first[0]]} saves"
                if first[0] == value[0]
                else f"{paths[first[0]]} and {paths[value[0]]} save"
            )
            raise MismatchError(
                f"{sources} different base layers for {first_name} and {name}, which the base ties "
                f"into one tensor; merge them separately"
            )
