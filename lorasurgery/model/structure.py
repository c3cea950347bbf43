"""The model's structure, the one place that knows it: each module's kind, each weight's layout, ties.

From the base's config.json (or `--config FILE`), transformers builds the model's skeleton on the
meta device (no weights, no memory); its modules say what each tensor is:

    kind                 class                             weight stored as
    linear               nn.Linear                         (out, in)
    conv1d               GPT-2 transformers Conv1D         (in, out)        fan_in_fan_out
    embedding            nn.Embedding                      (num_embeddings, dim)
    conv                 nn.Conv1d/2d/3d                   (out, in/groups, *kernel)
    multihead_attention  nn.MultiheadAttention             in_proj_weight (3·dim, dim), out_proj
    other                anything else with parameters     (each parameter's name and shape)

and parameters that are one object in the skeleton are tied (lm_head ↔ embed_tokens, a BERT decoder
bias ↔ its head bias): ties come from the config through the skeleton, never from equal shapes.
Skeleton names are mapped once onto the checkpoint's (a checkpoint saved from another head class
adds or drops a prefix). Building a skeleton costs an import of the model's transformers module
(seconds), so the summary is built in model/skeleton.py and cached per config in memory and on disk;
this module maps it onto a checkpoint's names.

Without a config.json (or when transformers cannot build it) the structure is `known = False`:
then `model.layouts.linear_layouts` decides a LoRA target's layout from the stored shape where the shape decides.
A square weight it cannot decide follows the adapter's flag as a stated assumption ("assumed"), and
is refused, naming the module and the way out (`--config`, `--fan-in-fan-out REGEX`), where
something contradicts that flag. The rules are in docs/merge.md, "Semantics".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.model.skeleton import skeleton_of

KINDS = ("linear", "conv1d", "embedding", "conv", "multihead_attention", "other")
_BLOCK = re.compile(r"\.\d+\.")  # a numbered layer: inside the repeated transformer blocks
# Without a config.json nothing says which module is an embedding but its conventional name; these
# are consulted only then (Structure.known is False).
CONVENTIONAL_INPUT_EMBEDDINGS = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "embed_in",
    "tok_embeddings",
    "shared",
)
CONVENTIONAL_OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
CONVENTIONAL_OTHER_EMBEDDINGS = ("wpe", "position_embeddings", "token_type_embeddings")


def leaf(name: str) -> str:
    """The last path component of a module or tensor name (q_proj, c_attn, weight …)."""
    return name.rsplit(".", 1)[-1]


def in_block(name: str) -> bool:
    """True for names inside a numbered layer (model.layers.3.…), i.e. the repeated blocks."""
    return bool(_BLOCK.search(name))


@dataclass(frozen=True)
class Module:
    """One module of the skeleton that owns parameters, under its checkpoint name."""

    name: str  # module path as the checkpoint names it, e.g. model.layers.0.self_attn.q_proj
    kind: str  # one of KINDS
    cls: str  # the class name, e.g. Linear, Conv1D, Qwen3MoeExperts
    parameters: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # own parameters, in registration order
    transposed: bool = False  # expert parameters stored (experts, in, out): transformers' is_transposed

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the weight is stored (in, out), as PEFT's fan_in_fan_out means."""
        return self.kind == "conv1d"


@dataclass(frozen=True)
class StoredAs:
    """A fused expert parameter (experts, d1, d2) that checkpoints store split (transformers'
    conversion mapping): expert e of source k is `sources[k]` (one of its spellings) with {e} = e, and
    the sources are concatenated along d1 (`concatenated`) or one source is the whole (d1, d2)."""

    sources: tuple[tuple[str, ...], ...]
    experts: int
    concatenated: bool


@dataclass
class Structure:
    """What is known about a base model's modules, in the checkpoint's names."""

    known: bool  # False: no config.json, or transformers cannot build it (see `reason`)
    source: str  # where it came from, for messages: the config file, or why it is unknown
    architecture: str | None = None  # the class that was built, e.g. LlamaForCausalLM
    modules: dict[str, Module] = field(default_factory=dict)  # module path -> Module
    tied: list[tuple[str, ...]] = field(default_factory=list)  # tensor names that are one parameter
    input_embedding: str | None = None  # module path of get_input_embeddings()
    output_embedding: str | None = None  # module path of get_output_embeddings()
    causal_lm: bool = False  # the class is a causal LM (…ForCausalLM, GPT2LMHeadModel …)
    stored: dict[str, StoredAs] = field(default_factory=dict)  # fused parameters the checkpoint splits
    _slices: dict | None = field(default=None, repr=False, compare=False)  # model/experts.py's, built once

    def expert_slice(self, tensor: str):
        """The ExpertSlice (model/experts.py) that per-expert weight `tensor` (`…experts.3.gate_proj.weight`)
        is of a fused expert parameter, or None."""
        return self.expert_slices().get(tensor)

    def expert_slices(self) -> dict:
        """{per-expert weight name: its ExpertSlice} of every fused expert parameter (model/experts.py)."""
        if self._slices is None:
            from lorasurgery.model.experts import expert_slices

            self._slices = expert_slices(self)
        return self._slices

    def pieces(self, name: str, tensors) -> list[list[str]] | None:
        """The checkpoint tensors a fused parameter is stored as, per expert ([[gate_e, up_e], …]), when
        the checkpoint splits it (Qwen3-MoE, Mixtral: transformers fuses them when loading)."""
        stored = self.stored.get(name)
        if stored is None:
            return None
        chosen = []
        for alternatives in stored.sources:
            found = next((a for a in alternatives if a.format(e=0) in tensors), None)
            if found is None:
                return None
            chosen.append(found)
        return [[source.format(e=e) for source in chosen] for e in range(stored.experts)]

    def module(self, name: str) -> Module | None:
        return self.modules.get(name)

    def module_of_tensor(self, tensor: str) -> Module | None:
        """The module owning `tensor` (model.layers.0.mlp.up_proj.weight -> its Module)."""
        path, _, parameter = tensor.rpartition(".")
        module = self.modules.get(path)
        return module if module is not None and parameter in module.parameters else None

    def kind_of(self, module: str) -> str | None:
        found = self.modules.get(module)
        return found.kind if found is not None else None

    def is_input_embedding(self, module: str) -> bool:
        if self.known:
            return module == self.input_embedding
        return leaf(module) in CONVENTIONAL_INPUT_EMBEDDINGS

    def is_output_embedding(self, module: str) -> bool:
        if self.known:
            return module == self.output_embedding
        return leaf(module) in CONVENTIONAL_OUTPUT_EMBEDDINGS

    def is_embedding(self, module: str) -> bool:
        """An embedding table, or the output projection onto the vocabulary (lm_head)."""
        if self.known:
            return self.kind_of(module) == "embedding" or module == self.output_embedding
        name = leaf(module)
        return (
            name
            in CONVENTIONAL_INPUT_EMBEDDINGS + CONVENTIONAL_OUTPUT_EMBEDDINGS + CONVENTIONAL_OTHER_EMBEDDINGS
            or name.endswith("_embeddings")
        )

    def fan_in_fan_out(self, module: str) -> bool:
        """Whether `module`'s weight is stored (in, out); False when unknown."""
        found = self.modules.get(module)
        return found is not None and found.fan_in_fan_out

    def word_embeddings_tied(self) -> bool:
        """Whether the output projection shares the input embedding's weight."""
        if not (self.input_embedding and self.output_embedding):
            return False
        group = self.tie_group(f"{self.input_embedding}.weight") or ()
        return f"{self.output_embedding}.weight" in group

    def tie_group(self, tensor: str) -> tuple[str, ...] | None:
        """The names sharing one parameter with `tensor` (itself included), when it is tied."""
        return next((group for group in self.tied if tensor in group), None)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the skeleton (tied names included) with its shape."""
        return {
            f"{m.name}.{p}" if m.name else p: shape
            for m in self.modules.values()
            for p, shape in m.parameters.items()
        }


def structure_of(checkpoint, config_file: str | os.PathLike | None = None) -> Structure:
    """The structure of `checkpoint` (an io.Checkpoint) from `config_file` or its own config.json."""
    config, where = read_config(checkpoint, config_file)
    if config is None:
        return Structure(known=False, source=where)
    try:
        skeleton = skeleton_of(config)
    except UnsupportedError as error:
        if config_file is not None:
            raise UnsupportedError(f"--config {config_file}: {error}") from None
        return Structure(known=False, source=f"{where}: {error}")
    return _mapped(skeleton, checkpoint.tensors, where)


def read_config(checkpoint, config_file=None) -> tuple[dict | None, str]:
    """(config, where it is) from `config_file` (a config.json or its folder), else the checkpoint's
    own config.json; (None, why) when there is none. `checkpoint` is an io.Checkpoint or a path."""
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"--config {config_file}: no such config.json")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"--config {config_file}: not a readable JSON file ({error})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"--config {config_file}: expected a JSON object (a model's config.json)")
        return config, str(path)
    if isinstance(checkpoint, (str, os.PathLike)):
        folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, f"{checkpoint} has no readable config.json"
        return (config if isinstance(config, dict) else None), str(folder / "config.json")
    if checkpoint.config is not None:
        return checkpoint.config, str(Path(checkpoint.folder) / "config.json")
    return None, f"{checkpoint.path} has no config.json"


def _mapped(summary: dict, tensors: dict, where: str) -> Structure:
    """The summary under the checkpoint's names (the prefix rule that matches most parameters)."""
    from lorasurgery.adapter.names import find_prefix_rule

    names = [f"{m}.{p}" if m else p for m, info in summary["modules"].items() for p in info["parameters"]]
    rule, _ = find_prefix_rule(names, tensors) if tensors else (None, names)

    def rename(name: str | None) -> str | None:
        if name is None or rule is None:
            return name
        return rule.apply(name)

    modules = {}
    for name, info in summary["modules"].items():
        mapped = rename(name)
        if mapped is None:
            continue
        parameters = {p: tuple(shape) for p, shape in info["parameters"].items()}
        modules[mapped] = Module(mapped, info["kind"], info["cls"], parameters, bool(info.get("transposed")))
    tied = []
    for group in summary["tied"]:
        renamed = tuple(n for n in (rename(g) for g in group) if n is not None)
        if len(renamed) > 1:
            tied.append(renamed)
    return Structure(
        known=True,
        source=where,
        architecture=summary["architecture"],
        modules=modules,
        tied=tied,
        input_embedding=rename(summary["input_embedding"]),
        output_embedding=rename(summary["output_embedding"]),
        causal_lm=bool(summary["causal_lm"]),
        stored={
            rename(name) or name: StoredAs(
                tuple(tuple(rename(a) or a for a in spellings) for spellings in info["sources"]),
                int(info["experts"]),
                bool(info["concatenated"]),
            )
            for name, info in summary.get("stored", {}).items()
        },
    )


def model_tensors(checkpoint, structure: Structure) -> dict:
    """The checkpoint's tensors plus the tied names it stores once (under the stored tensor's info)."""
    tensors = dict(checkpoint.tensors)
    for group in structure.tied:
        stored = next((n for n in group if n in checkpoint.tensors), None)
        if stored is not None:
            for name in group:
                tensors.setdefault(name, checkpoint.tensors[stored])
    return tensors
