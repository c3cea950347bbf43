"""The skeleton of a model: what transformers builds from a config.json on the meta device, summarised.

Building a skeleton imports the model's transformers module (seconds, and hundreds of MB that a
merge should not carry), so it runs in a child process (`prefetch` starts it early, overlapping the
caller's own start-up) unless transformers is already imported, and its JSON summary — each
module's kind, class and parameter shapes, ties, the fused parameters a checkpoint splits — is
cached per config in memory and on disk ($LORASURGERY_CACHE). model/structure.py maps the summary
onto a checkpoint's names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from lorasurgery.cache import cache_folder
from lorasurgery.errors import UnsupportedError

CACHE_VERSION = 3  # of the summary's form: a summary of another version is built again
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
    code = "import sys, json; from lorasurgery.model.skeleton import _child; _child()"
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
    return str(Path(__file__).resolve().parents[2])  # the folder holding the lorasurgery package


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
    """Where skeleton summaries are kept: the cache's `structure/` (lorasurgery/cache.py)."""
    return cache_folder("structure")


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
