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
(seconds), so the summary is cached per config in memory and on disk.

Without a config.json (or when transformers cannot build it) the structure is `known = False`:
then `linear_layouts` decides a LoRA target's layout from the stored shape where the shape decides.
A square weight it cannot decide follows the adapter's flag as a stated assumption ("assumed"), and
is refused, naming the module and the way out (`--config`, `--fan-in-fan-out REGEX`), where
something contradicts that flag. The rules are in docs/merge.md, "Semantics".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import CheckpointError, MismatchError, UnsupportedError

KINDS = ("linear", "conv1d", "embedding", "conv", "multihead_attention", "other")
CACHE_VERSION = 3
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


# --------------------------------------------------------------------------------------------------
# Building


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


_MEMORY: dict[str, dict] = {}
_PENDING: dict[str, subprocess.Popen] = {}
_LOCK = threading.Lock()


def skeleton_of(config: dict) -> dict:
    """The skeleton summary of a config (JSON-ready, skeleton names), from the caches or transformers."""
    key = _cache_key(config)
    with _LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
        summary = _read_cache(key)
        if summary is None:
            child = _PENDING.pop(key, None)
            summary = _collect(child) if child is not None else None
            if summary is None:
                summary = _build(config) if "transformers" in sys.modules else _collect(_spawn(config))
            _write_cache(key, summary)
        _MEMORY[key] = summary
        return summary


def prefetch(config: dict | None) -> None:
    """Start building the skeleton of `config` in a child process unless a cache has it, so that the
    import of transformers overlaps the caller's own start-up (and its memory stays out of ours)."""
    if config is None or "transformers" in sys.modules:
        return
    key = _cache_key(config)
    with _LOCK:
        if key in _MEMORY or key in _PENDING or _read_cache(key) is not None:
            return
        _PENDING[key] = _spawn(config)


def _spawn(config: dict) -> subprocess.Popen:
    code = "import sys, json; from lorasurgery.architecture import _child; _child()"
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")])),
        },
    )
    child.stdin.write(json.dumps(config).encode())
    child.stdin.close()
    return child


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _collect(child: subprocess.Popen) -> dict:
    out = child.stdout.read()
    err = child.stderr.read()
    child.wait()
    try:
        answer = json.loads(out)
    except ValueError:
        raise UnsupportedError(
            f"building the model's skeleton failed ({err.decode(errors='replace').strip()[-300:]})"
        ) from None
    if "error" in answer:
        raise UnsupportedError(answer["error"])
    return answer["summary"]


def _child() -> None:
    """The child of _spawn: config JSON on stdin, {"summary"} or {"error"} on stdout."""
    config = json.loads(sys.stdin.read())
    try:
        answer = {"summary": _build(config)}
    except UnsupportedError as error:
        answer = {"error": str(error)}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


def _cache_key(config: dict) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        version = installed("transformers")  # without importing it
    except PackageNotFoundError:
        version = "none"
    text = json.dumps(
        {"config": config, "transformers": version, "v": CACHE_VERSION}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path | None:
    """Where skeleton summaries are kept: $LORASURGERY_CACHE, else ~/.cache/lorasurgery ("" disables)."""
    value = os.environ.get("LORASURGERY_CACHE")
    if value == "":
        return None
    if value:
        return Path(value) / "structure"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorasurgery" / "structure"


def _read_cache(key: str) -> dict | None:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        summary = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("v") == CACHE_VERSION else None


def _write_cache(key: str, summary: dict) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:  # only a cache: a read-only home must not fail a merge
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{key}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(summary), encoding="utf-8")
        os.replace(temporary, folder / f"{key}.json")
    except OSError:
        pass


def _build(config: dict) -> dict:
    """Instantiate the architecture on the meta device and summarise it."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise UnsupportedError(f"reading the model's structure needs transformers ({error})") from None
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedError("config.json has no model_type")
    with _quiet():
        try:
            settings = {k: v for k, v in config.items() if k != "model_type"}
            model_config = transformers.AutoConfig.for_model(model_type, **settings)
        except Exception as error:  # an unknown model_type (remote code) or a malformed config
            raise UnsupportedError(
                f"transformers {transformers.__version__} does not know model_type "
                f"{model_type!r} ({type(error).__name__})"
            ) from None
        architectures = config.get("architectures") or []
        candidates = [getattr(transformers, a, None) for a in architectures[:1]]
        candidates += [transformers.AutoModelForCausalLM, transformers.AutoModel]
        model, errors = None, []
        for cls in filter(None, candidates):
            try:
                with torch.device("meta"):
                    model = (
                        cls.from_config(model_config)
                        if cls.__name__.startswith("Auto")
                        else cls._from_config(model_config)
                    )
                break
            except Exception as error:
                errors.append(f"{cls.__name__}: {type(error).__name__}")
        if model is None:
            raise UnsupportedError(
                f"transformers cannot build {architectures[:1] or model_type} ({'; '.join(errors)})"
            )
    return _summarise(model)


def _summarise(model) -> dict:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        Conv1D = ()

    def kind(module) -> str:
        if isinstance(module, Conv1D):
            return "conv1d"
        if isinstance(module, torch.nn.MultiheadAttention):
            return "multihead_attention"
        if isinstance(module, torch.nn.Linear):
            return "linear"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return "conv"
        return "other"

    modules = {}
    names_of = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), name)
        parameters = {p: list(t.shape) for p, t in module.named_parameters(recurse=False)}
        if parameters:
            modules[name] = {"kind": kind(module), "cls": type(module).__name__, "parameters": parameters}
            if getattr(module, "is_transposed", False) is True:
                modules[name]["transposed"] = True
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    tied = [names for names in groups.values() if len(names) > 1]

    def embedding_name(getter) -> str | None:
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            return None
        return names_of.get(id(found)) if found is not None else None

    architecture = type(model).__name__
    return {
        "v": CACHE_VERSION,
        "architecture": architecture,
        "modules": modules,
        "tied": tied,
        "input_embedding": embedding_name(model.get_input_embeddings),
        "output_embedding": embedding_name(model.get_output_embeddings),
        "causal_lm": architecture.endswith(("ForCausalLM", "LMHeadModel")),
        "stored": _stored_split(model, modules),
    }


def _stored_split(model, modules: dict) -> dict:
    """Fused expert parameters that the checkpoint stores per expert (and per projection), from
    transformers' own conversion mapping; only its plain merges (stack experts, concatenate along
    dim 1) and literal renamings are understood, anything else is left out (the parameter then has no
    counterpart in the checkpoint and a LoRA on it is refused by name)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers, or a model without a mapping
        return {}

    def literal(pattern: str) -> bool:
        return re.fullmatch(r"[\w.*]+", pattern) is not None

    renamings = [
        (t.source_patterns[0], t.target_patterns[0])
        for t in transforms
        if isinstance(t, WeightRenaming)
        and len(t.source_patterns) == len(t.target_patterns) == 1
        and literal(t.source_patterns[0])
        and literal(t.target_patterns[0])
    ]
    stored = {}
    for transform in transforms:
        if not isinstance(transform, WeightConverter) or len(transform.target_patterns) != 1:
            continue
        operations = [(type(o).__name__, getattr(o, "dim", None)) for o in transform.operations]
        if operations not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
            continue
        target = transform.target_patterns[0].lstrip(".")
        sources = [p.lstrip(".") for p in transform.source_patterns]
        if not literal(target) or not all(literal(p) and p.count("*") == 1 for p in sources):
            continue
        for module_name, info in modules.items():
            for parameter, shape in info["parameters"].items():
                full = f"{module_name}.{parameter}"
                if len(shape) != 3 or not (full == target or full.endswith("." + target)):
                    continue
                prefix = full[: len(full) - len(target)]
                spellings = []
                for source in sources:
                    base = prefix + source.replace("*", "{e}")
                    spellings.append(
                        [base] + [base.replace(dst, src) for src, dst in renamings if dst in base]
                    )
                stored[full] = {
                    "sources": spellings,
                    "experts": shape[0],
                    "concatenated": len(operations) == 2,
                }
    return stored


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


class _quiet:
    """transformers' warnings about odd tiny configs are not the user's business here."""

    def __enter__(self):
        import warnings

        import transformers

        self.verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        import transformers

        self.warnings.__exit__(*exc)
        transformers.logging.set_verbosity(self.verbosity)


# --------------------------------------------------------------------------------------------------
# Layouts of LoRA targets


@dataclass(frozen=True)
class LinearTarget:
    """A LoRA module with lora_A/lora_B (r, in)/(out, r) on a 2-D base weight, as a layout question."""

    adapter: str  # the adapter's path, for messages
    module: str  # the adapter's module name
    weight: str  # the base tensor's name
    stored: tuple[int, ...]  # the base tensor's stored shape
    features: tuple[int, int]  # (out, in) = (lora_B rows, lora_A columns)
    hint: bool  # adapter_config.json's fan_in_fan_out, which PEFT saves from its last-created layer


@dataclass(frozen=True)
class Layout:
    fan_in_fan_out: bool  # stored (in, out)
    # who decided: "structure" | "option" | "shape"; "assumed": the adapter's flag, nothing deciding
    # (a square weight without a structure); "adapter": the flag, no layout fitting (the shape check
    # then reports it)
    reason: str


def fan_in_fan_out_matcher(pattern: str | None):
    """A predicate on module names for `--fan-in-fan-out REGEX` (re.search), or None."""
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise UnsupportedError(f"--fan-in-fan-out {pattern!r} is not a regular expression: {error}") from None
    return lambda name: compiled.search(name) is not None


def linear_layouts(
    structure: Structure, targets: list[LinearTarget], fan_in_fan_out: str | None = None
) -> dict[tuple[str, str], Layout]:
    """{(adapter, module): Layout} for every target, or an error naming the module and the fix.

    The structure decides when it knows the module (PEFT sets fan_in_fan_out per layer: on for
    Conv1D, off for Linear). Else `--fan-in-fan-out REGEX` decides (matching modules are stored
    (in, out)); else the stored shape when it is not square. Else the layout is assumed from the
    adapter's flag (reason "assumed"), unless something contradicts it: another target of that
    adapter whose shape decides disagrees, the adapters targeting that weight disagree, or (without a
    structure) the flag is true and the adapter's square targets have several names. PEFT saves
    the flag of the layer it created last: false is nn.Linear's, the layer custom models are built
    of (transformers models, which have Conv1D, come with a config.json); true is a Conv1D's, and
    square targets of several names need not all be Conv1D."""
    matches = fan_in_fan_out_matcher(fan_in_fan_out)
    layouts: dict[tuple[str, str], Layout] = {}
    undecided: list[LinearTarget] = []
    contradicted: dict[str, str] = {}  # adapter -> why its flag is not trusted
    for target in targets:
        key = (target.adapter, target.module)
        module = structure.module_of_tensor(target.weight) if structure.known else None
        if module is not None and module.kind in ("linear", "conv1d"):
            if matches is not None and matches(target.module) != module.fan_in_fan_out:
                raise MismatchError(
                    f"--fan-in-fan-out {fan_in_fan_out!r} {'matches' if matches(target.module) else 'does not match'} "
                    f"module {target.module}, but {structure.source} makes {target.weight} a {module.cls} "
                    f"(stored {'(in, out)' if module.fan_in_fan_out else '(out, in)'}); drop the option or fix it"
                )
            layouts[key] = Layout(module.fan_in_fan_out, "structure")
            continue
        if matches is not None:
            layouts[key] = Layout(matches(target.module), "option")
            continue
        out_features, in_features = target.features
        stored = tuple(target.stored)
        if stored == (out_features, in_features) and out_features != in_features:
            layouts[key] = Layout(False, "shape")
        elif stored == (in_features, out_features) and out_features != in_features:
            layouts[key] = Layout(True, "shape")
        else:
            undecided.append(target)  # square, or fitting neither way (a shape check will say so)
    for key, layout in layouts.items():
        if layout.reason != "shape":
            continue
        target = next(t for t in targets if (t.adapter, t.module) == key)
        if layout.fan_in_fan_out != target.hint and target.adapter not in contradicted:
            contradicted[target.adapter] = (
                f"its module {target.module} is stored {'(in, out)' if layout.fan_in_fan_out else '(out, in)'}, "
                f"so the adapter targets layers of another kind than its flag says"
            )
    hints: dict[str, set[bool]] = {}
    square_kinds: dict[str, set[str]] = {}  # adapter -> leaf names of its undecided targets
    for target in undecided:
        hints.setdefault(target.weight, set()).add(target.hint)
        square_kinds.setdefault(target.adapter, set()).add(leaf(target.module))
    for target in undecided:
        key = (target.adapter, target.module)
        stored = tuple(target.stored)
        if stored not in ((target.features[0], target.features[1]), (target.features[1], target.features[0])):
            layouts[key] = Layout(target.hint, "adapter")  # no layout fits: the shape check reports it
            continue
        unknown = (
            structure.source if not structure.known else f"the model of {structure.source} has no such module"
        )
        why = contradicted.get(target.adapter)
        if why is None and len(hints[target.weight]) > 1:
            why = "the adapters that target it disagree on fan_in_fan_out"
        if why is None and target.hint and not structure.known and len(square_kinds[target.adapter]) > 1:
            # PEFT saves the flag of the layer it created last: a true flag (a Conv1D's) with square
            # targets of several names does not say they are all Conv1D.
            names = ", ".join(sorted(square_kinds[target.adapter]))
            why = f"it targets square weights of several names ({names}) and saves the flag of only one"
        if why is not None:
            raise UnsupportedError(
                f"{target.adapter}: module {target.module}: the base's {target.weight} is square "
                f"({stored[0]}×{stored[1]}) and {unknown}, so neither tells a Linear (stored (out, in)) "
                f"from a GPT-2 Conv1D (stored (in, out)); the adapter's fan_in_fan_out: "
                f"{str(target.hint).lower()} cannot be trusted ({why}). Pass --config with the base's "
                f"config.json, or --fan-in-fan-out REGEX matching the Conv1D modules (e.g. 'c_attn|c_proj|c_fc')"
            )
        layouts[key] = Layout(target.hint, "assumed")
    return layouts


def model_tensors(checkpoint, structure: Structure) -> dict:
    """The checkpoint's tensors plus the tied names it stores once (under the stored tensor's info)."""
    tensors = dict(checkpoint.tensors)
    for group in structure.tied:
        stored = next((n for n in group if n in checkpoint.tensors), None)
        if stored is not None:
            for name in group:
                tensors.setdefault(name, checkpoint.tensors[stored])
    return tensors
