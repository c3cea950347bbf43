"""Map an adapter's module paths to a base checkpoint's tensor names (used by lorasurgery.binding).

A model saved from another head class adds or drops a prefix (`model.`, `bert.`, `transformer.` …):
an adapter trained on BertForSequenceClassification names `bert.encoder…` while a BertModel
checkpoint stores `encoder…`. The rule is resolved once per checkpoint: every candidate prefix
that maps the first module onto some base tensor is tried on all modules, and the one that finds
every module (with the right shape) wins, the identity first.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasurgery.errors import MismatchError

_LISTED = 8  # how many unmatched modules an error names


@dataclass(frozen=True)
class PrefixRule:
    """adapter name -> base name: strip `drop` from the front, then prepend `add`."""

    drop: str = ""
    add: str = ""

    def apply(self, name: str) -> str | None:
        if not name.startswith(self.drop):
            return None
        return self.add + name[len(self.drop) :]


def _candidate_rules(first: str, base_names) -> list[PrefixRule]:
    rules = {PrefixRule(): None}
    for name in base_names:
        if name.endswith("." + first):
            rules.setdefault(PrefixRule(add=name[: -len(first)]), None)
        elif first.endswith("." + name):
            rules.setdefault(PrefixRule(drop=first[: -len(name)]), None)
        else:  # one prefix swapped for another: same tail after the first component
            head_a, _, tail_a = first.partition(".")
            head_b, _, tail_b = name.partition(".")
            if tail_a and tail_a == tail_b and head_a != head_b:
                rules.setdefault(PrefixRule(drop=head_a + ".", add=head_b + "."), None)
    return list(rules)


def find_prefix_rule(weight_names: list[str], base_tensors: dict) -> tuple[PrefixRule, list[str]]:
    """The rule mapping the most of `weight_names` into `base_tensors`, and what it leaves unmatched."""
    best: tuple[PrefixRule, list[str]] | None = None
    for rule in _candidate_rules(weight_names[0], base_tensors) if weight_names else [PrefixRule()]:
        unmatched = [n for n in weight_names if rule.apply(n) not in base_tensors]
        if best is None or len(unmatched) < len(best[1]):
            best = (rule, unmatched)
        if not unmatched:
            break
    return best


def _listed(items: list[str], separator: str) -> str:
    more = len(items) - _LISTED
    return separator.join(items[:_LISTED]) + (f"{separator}and {more} more" if more > 0 else "")


def missing_modules_error(adapter_path, unmatched: list[str], total: int, base_path) -> MismatchError:
    """The error for LoRA modules whose base tensors (`unmatched`, adapter names) the base lacks."""
    names = [n.removesuffix(".weight") for n in unmatched]
    return MismatchError(
        f"{adapter_path}: {len(names)} of {total} target modules are not in the base {base_path}: "
        f"{_listed(names, ', ')}"
    )


def shape_mismatch_error(adapter_path, wrong: list[str], base_path) -> MismatchError:
    """The error for modules whose ΔW does not fit the base tensor (`wrong`: one phrase per module)."""
    return MismatchError(f"{adapter_path}: shape mismatch with the base {base_path}: {_listed(wrong, '; ')}")
