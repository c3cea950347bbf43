"""Planning `extract`: which tensors become LoRA factors, which are saved whole, which are measured.

Everything here runs before any arithmetic and before any output exists: the two checkpoints must
be the same architecture with the same tensor names and shapes (a resized vocabulary only with
`--embeddings full`), and the output path must be usable. The plan then says, per tensor:

- a `Target`: a 2-D weight factored as ΔW ≈ B·A, in PEFT's layout for its module kind, which the
  model's structure gives (lorasurgery.model): Linear: ΔW is (out, in); GPT-2's Conv1D stores
  (in, out), so its SVD runs on the transpose and the adapter says `fan_in_fan_out`; an embedding's
  LoRA is ΔEᵀ (dim, vocab) = B·A;
- a `Measured` group: tensors read only to report how much the fine-tune changed them (skipped
  modules), or to save them whole when changed (`--embeddings full`, `--save-1d`).

It also writes the adapter_config.json, checked against PEFT's own matching rules so that every
module gets exactly its rank and α = r (scale 1), and no other module is wrapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorasurgery.adapter.model import base_layer_key, saved_key
from lorasurgery.adapter.writer import check_module_keys, lora_rank_fields
from lorasurgery.errors import LoraSurgeryError, MismatchError
from lorasurgery.io.safetensors_format import torch_dtype_of
from lorasurgery.model import in_block, structure_of
from lorasurgery.naming import natural_key


@dataclass
class Target:
    """One 2-D weight to factor. `shape` is the SVD layout (d, n): ΔW ≈ B (d, r) @ A (r, n)."""

    name: str  # tensor name in both checkpoints
    module: str
    kind: str  # "linear" | "embedding"
    transpose: bool  # the SVD layout is the stored tensor transposed
    stored_shape: tuple[int, int]
    source_code: str  # safetensors dtype code of the fine-tune's tensor ("BF16", ...)
    copies: int = 1  # 2 when a tied lm_head gets the same factors (the budget pays twice)

    @property
    def source_dtype(self):
        """The fine-tune's torch dtype (imports torch: planning itself runs before torch is loaded)."""
        return torch_dtype_of(self.source_code)

    @property
    def shape(self) -> tuple[int, int]:
        d, n = self.stored_shape
        return (n, d) if self.transpose else (d, n)

    @property
    def numel(self) -> int:
        return self.stored_shape[0] * self.stored_shape[1]


@dataclass
class Measured:
    """Tensors of one module read only to measure ‖ΔW‖/‖W‖, and saved whole when `save` is set."""

    module: str
    names: list[str]  # tensor names in both checkpoints
    reason: str  # why it is not factored (reported when it changed and is not saved)
    save: bool = False  # write the fine-tune's tensors into the adapter when changed
    adapter_keys: dict[str, str] = field(default_factory=dict)  # tensor name -> adapter key
    as_bias: bool = False  # saved as <module>.base_layer.<p> of a LoRA-targeted layer
    resized: bool = False  # shapes differ (resized vocabulary): always saved

    def numel(self, checkpoint) -> int:
        return sum(checkpoint.tensors[n].numel for n in self.names)


@dataclass
class Plan:
    targets: list[Target]
    measured: list[Measured]
    tied_output: str | None  # lm_head module that gets the input embedding's factors (tied)
    tied_input: str | None  # the input embedding module it is tied to
    tied_embedding: str | None  # the input embedding when the config ties lm_head to it
    tied_head: str | None  # the lm_head module tied to it
    fan_in_fan_out: bool
    task_type: str | None


def module_of(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def compile_regex(pattern: str | None, option: str):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise LoraSurgeryError(f"{option} {pattern!r} is not a valid regular expression ({error})") from None


def check_architectures(base, ft) -> None:
    base_config, ft_config = base.config or {}, ft.config or {}
    kinds = [base_config.get("model_type"), ft_config.get("model_type")]
    if all(kinds) and kinds[0] != kinds[1]:
        raise MismatchError(
            f"{ft.path}: a {kinds[1]} model cannot be a fine-tune of the {kinds[0]} model {base.path}"
        )


def build_plan(base, ft, include_re, exclude_re, embeddings: str, save_1d: bool, config_file=None) -> Plan:
    """Validate the pair and decide what happens to every tensor (see the module docstring)."""
    structure = structure_of(ft if ft.config is not None else base, config_file)
    _check_same_tensors(base, ft)
    planner = _Planner(structure, include_re, exclude_re, embeddings)
    for name, info in base.tensors.items():
        planner.add(name, info, ft.tensors[name], ft.path)
    tied = planner.tie_head(structure)
    planner.add_one_d(save_1d)
    task_type = "CAUSAL_LM" if structure.causal_lm else None
    # PEFT sets fan_in_fan_out per layer when loading; the saved flag says what the targets are.
    fan_in_fan_out = any(t.transpose for t in planner.targets if t.kind == "linear")
    return Plan(planner.targets, planner.measured, *tied, fan_in_fan_out, task_type)


def _check_same_tensors(base, ft) -> None:
    """The fine-tune holds exactly the base's tensor names (shapes are checked per tensor)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing = [n for n in base.tensors if n not in ft.tensors]
    if missing:
        raise MismatchError(
            f"{ft.path}: tensors of the base are missing from the fine-tune: {listed(missing)}"
        )
    extra = [n for n in ft.tensors if n not in base.tensors]
    if extra:
        raise MismatchError(f"{ft.path}: tensors not in the base {base.path}: {listed(extra)}")


class _Planner:
    """Sorts the pair's tensors, one at a time, into targets and measured groups."""

    def __init__(self, structure, include_re, exclude_re, embeddings: str):
        self.structure = structure
        self.include_re, self.exclude_re, self.embeddings = include_re, exclude_re, embeddings
        self.targets: list[Target] = []
        self.measured: list[Measured] = []
        self.lora_modules: set[str] = set()
        self.input_embedding = self.output_embedding = None
        self.one_d: dict[str, list[str]] = {}  # module -> its 1-D tensors, decided once all are seen
        self.modules_with_2d: set[str] = set()

    def excluded(self, module: str) -> bool:
        return self.exclude_re is not None and bool(self.exclude_re.search(module))

    def add(self, name: str, info, ft_info, ft_path) -> None:
        module = module_of(name)
        structure = self.structure
        is_input = structure.is_input_embedding(module)
        is_output = structure.is_output_embedding(module)
        is_embedding = is_input or is_output or structure.is_embedding(module)
        if len(info.shape) == 2:
            self.modules_with_2d.add(module)
        if is_input and name.endswith(".weight"):
            self.input_embedding = module
        if is_output and name.endswith(".weight"):
            self.output_embedding = module
        if tuple(ft_info.shape) != tuple(info.shape):
            if is_embedding and self.embeddings == "full":
                keys = {name: saved_key(name)}
                self.measured.append(
                    Measured(module, [name], "resized", save=True, resized=True, adapter_keys=keys)
                )
                return
            what = "vocabulary sizes differ" if is_embedding else "shapes differ"
            raise MismatchError(
                f"{ft_path}: module {module}: {what} ({list(info.shape)} in the base, "
                f"{list(ft_info.shape)} in the fine-tune)"
                + ("; --embeddings full saves the resized matrices" if is_embedding else "")
            )
        if len(info.shape) == 1:
            self.one_d.setdefault(module, []).append(name)
        elif len(info.shape) >= 3 and not structure.kind_of(module) == "conv":
            # fused expert parameters (E, d1, d2): measured and reported, never dropped silently
            reason = "3-D parameter such as fused MoE experts (extract factors 2-D weights only)"
            self.measured.append(
                Measured(name, [name], reason)
            )  # named by the parameter: a module has several
        elif len(info.shape) != 2 or not name.endswith(".weight"):
            pass  # no LoRA for 0-D tensors or convolutions; their changes are not measured either
        elif is_embedding:
            self._add_embedding(name, module, is_output, tuple(info.shape), ft_info.dtype)
        else:
            self._add_weight(name, module, tuple(info.shape), ft_info.dtype)

    def _add_embedding(self, name: str, module: str, is_output: bool, shape, source_code: str) -> None:
        if self.embeddings == "skip" or self.excluded(module):
            reason = "embedding or lm_head (--embeddings lora or full extracts it)"
            self.measured.append(Measured(module, [name], reason))
        elif self.embeddings == "full":
            self.measured.append(
                Measured(module, [name], "embedding", save=True, adapter_keys={name: saved_key(name)})
            )
        else:
            kind = "linear" if is_output else "embedding"
            self.targets.append(Target(name, module, kind, not is_output, shape, source_code))
            self.lora_modules.add(module)

    def _add_weight(self, name: str, module: str, shape, source_code: str) -> None:
        chosen = self.include_re.search(module) if self.include_re is not None else in_block(name)
        if not chosen or self.excluded(module):
            reason = "not selected (outside the transformer blocks, or --include/--exclude)"
            self.measured.append(Measured(module, [name], reason))
            return
        transpose = self.structure.fan_in_fan_out(module)  # a Conv1D stores (in, out)
        self.targets.append(Target(name, module, "linear", transpose, shape, source_code))
        self.lora_modules.add(module)

    def tie_head(self, structure) -> tuple:
        """(tied_output, tied_input, tied_embedding, tied_head) of Plan.

        A tied lm_head has no tensor of its own (or a copy of the embedding's): it follows the input
        embedding — the same factors with `lora`, the same saved matrix with `full`, never twice."""
        tied = structure.word_embeddings_tied()
        tied_output = tied_input = None
        tied_embedding = self.input_embedding if tied else None
        tied_head = structure.output_embedding if tied else None  # tied: the structure names both
        if tied and self.input_embedding is not None:
            if self.output_embedding is not None:  # stored twice although tied: drop the copy
                copy = f"{self.output_embedding}.weight"
                self.targets = [t for t in self.targets if t.name != copy]
                self.measured = [m for m in self.measured if m.names != [copy]]
                self.lora_modules.discard(self.output_embedding)
            embedding = next((t for t in self.targets if t.module == self.input_embedding), None)
            if embedding is not None:
                tied_output, tied_input = tied_head, self.input_embedding
                embedding.copies = 2
        return tied_output, tied_input, tied_embedding, tied_head

    def add_one_d(self, save_1d: bool) -> None:
        """Norms and biases: measured, or saved with --save-1d (a bias as PEFT's bias key)."""
        for module, names in self.one_d.items():
            reason = "norm or bias (1-D; --save-1d saves it)"
            if not save_1d or self.excluded(module):
                self.measured.append(Measured(module, names, reason))
            elif module in self.lora_modules:  # the bias of a factored layer: PEFT's bias="lora_only" key
                keys = {n: base_layer_key(module, n.rsplit(".", 1)[1]) for n in names}
                self.measured.append(
                    Measured(module, names, reason, save=True, adapter_keys=keys, as_bias=True)
                )
            elif module in self.modules_with_2d:  # saving it would mean saving the whole (unselected) weight
                reason = "bias of a module not in the adapter (select the module to save its bias)"
                self.measured.append(Measured(module, names, reason))
            else:  # a norm: the whole module goes into modules_to_save
                keys = {n: saved_key(n) for n in names}
                self.measured.append(Measured(module, names, reason, save=True, adapter_keys=keys))


def extracted_adapter_config(
    base_path: str,
    plan: Plan,
    module_ranks: dict[str, int],
    modules_to_save: list[str],
    saved_biases: bool,
    all_modules: set[str],
) -> dict:
    """adapter_config.json: α = r for every module (scale 1), keys PEFT resolves to exactly one module.

    `module_ranks` holds every module with factors (a tied lm_head included); `all_modules` every
    module path of the checkpoint, to check that PEFT's suffix rules pick no other module.
    """
    # Keys are full module paths, checked against PEFT's matching rules (adapter.writer).
    rank_fields = lora_rank_fields(module_ranks, natural_key)
    check_module_keys(module_ranks, modules_to_save, all_modules)
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base_path),
        "r": rank_fields["r"],
        "lora_alpha": rank_fields["lora_alpha"],
        "rank_pattern": rank_fields["rank_pattern"],
        "alpha_pattern": rank_fields["alpha_pattern"],
        "target_modules": rank_fields["target_modules"],
        "lora_dropout": 0.0,
        "bias": "lora_only" if saved_biases else "none",
        "lora_bias": False,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "modules_to_save": sorted(modules_to_save, key=natural_key) or None,
        # PEFT ties a tied lm_head's adapter (or its modules_to_save copy) to the input
        # embedding's, and stops warning, only when asked to.
        "ensure_weight_tying": plan.tied_output in module_ranks or plan.tied_embedding in modules_to_save,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": plan.task_type,
    }
