"""`merge`: fold one or more PEFT LoRA adapters into a base checkpoint, one tensor at a time.

W' = W + Σᵢ wᵢ·ΔWᵢ for every targeted weight (SPEC §3; the kernels are in linalg/delta.py), saved
tensors (modules_to_save, `bias="all"`, saved base layers) replace the base's, and every other tensor
is copied byte for byte. Everything that can be checked is checked before the output folder exists:
adapters load, every target resolves against the base with its shape, options make sense, adapter
tensors are finite, adapters do not replace the same tensor with different values. Then each base
tensor is read, merged and written through the planned shard writer into a temporary folder that
becomes OUT only when complete (and, with verify, only when the merged model matches base+adapters).

Tied embeddings: PEFT applies a LoRA on a tied `embed_tokens` or `lm_head` to that side only, so
when the merge changes either side of a tied pair, both tensors are written and `config.json` gets
`tie_word_embeddings: false` (PEFT's own `merge_and_unload` writes ΔW into the shared tensor, which
changes both sides; its warning recommends untying first, which is what is done here). A saved
`base_layer` weight replaces the shared tensor, i.e. both sides, as it does when PEFT loads it.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorasurgery.devices import resolve_device
from lorasurgery.errors import (
    AdapterError,
    LoraSurgeryError,
    MismatchError,
    NonFiniteError,
    UnsupportedError,
    VerificationError,
)
from lorasurgery.io import (
    SafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    check_output_path,
    copy_side_files,
    open_checkpoint,
    plan_shards,
)
from lorasurgery.io.safetensors_format import TensorInfo, torch_dtype_of
from lorasurgery.memory import tune_allocator
from lorasurgery.progress import Progress, ProgressCallback, no_progress

DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
CONFIG_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

# Files beside the weights that a loader needs; copied unchanged (config.json is rewritten).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "LICENSE",
    "LICENSE.txt",
    "NOTICE",
)
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
OUTPUT_EMBEDDING_NAMES = (
    "lm_head.weight",
    "embed_out.weight",
    "cls.predictions.decoder.weight",
    "output.weight",
)


@dataclass
class AdapterSummary:
    path: str
    weight: float
    modules_merged: int
    dora_modules: int
    lora_biases: int
    tensors_replaced: int


@dataclass
class MergeSummary:
    """What a merge did; `--json` prints `to_dict()`."""

    base: str
    output: str
    adapters: list[AdapterSummary]
    tensors: int = 0  # tensors in the output
    tensors_merged: int = 0  # W + ΣΔW computed
    tensors_replaced: int = 0  # taken from an adapter (modules_to_save, saved biases, base layers)
    tensors_copied: int = 0  # byte-identical copies of the base
    tensors_converted: int = 0  # untouched but cast to the output dtype
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "cpu"
    precise: bool = False
    subtract: bool = False
    config_changes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. the tied-embeddings note
    verified: bool = False
    max_logit_difference: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Item:
    """How one output tensor is produced."""

    name: str  # output tensor name
    spec: TensorSpec
    source: TensorInfo | None  # base tensor read when nothing replaces it
    replacement: tuple[int, str] | None = None  # (adapter index, adapter tensor name)
    updates: list[tuple[int, str]] = field(default_factory=list)  # (adapter index, module)
    bias_terms: list[tuple[int, str]] = field(default_factory=list)  # lora_bias: (adapter index, module)
    token_rows: list[tuple[int, str]] = field(
        default_factory=list
    )  # trainable tokens: (adapter index, module)

    @property
    def untouched(self) -> bool:
        return self.replacement is None and not self.updates and not self.bias_terms and not self.token_rows


# --------------------------------------------------------------------------------------------------
# Entry point


def merge_checkpoint(
    base,
    adapters,
    out,
    *,
    weights=None,
    subtract: bool = False,
    dtype: str = "auto",
    max_shard_bytes: int | None = None,
    device: str = "cpu",
    precise: bool = False,
    force: bool = False,
    allow_nonfinite: bool = False,
    verify: bool = False,
    progress: ProgressCallback | None = None,
) -> MergeSummary:
    """Merge `adapters` into the checkpoint `base` and write a plain checkpoint to `out`.

    Raises a LoraSurgeryError (nothing written) for bad input, and VerificationError when `verify`
    finds the merged model's logits differ from base+adapters beyond the dtype's tolerance.
    """
    started = time.perf_counter()
    tune_allocator()
    progress = progress or no_progress
    adapters = [Path(a) for a in adapters]
    weights = _check_options(adapters, weights, subtract, dtype, max_shard_bytes)
    device = resolve_device(device)
    check_output_path(out, [base, *adapters], force)  # fail fast; checked again when writing
    if verify:
        _require_verification_libraries()

    with _one_compute_thread():
        plan = _plan(Path(base), adapters, weights, subtract, dtype, allow_nonfinite)
    summary = MergeSummary(
        base=str(base),
        output=str(out),
        adapters=plan.adapter_summaries,
        dtype=dtype,
        device=device,
        precise=precise,
        subtract=subtract,
        config_changes=plan.config_changes,
        notes=plan.notes,
    )
    shards = (
        plan_shards(plan.specs, max_shard_bytes=max_shard_bytes)
        if max_shard_bytes
        else plan_shards(plan.specs, groups=plan.checkpoint.shard_groups())
    )
    with atomic_output_dir(out, inputs=[base, *adapters], force=force) as folder:
        with _one_compute_thread(), SafetensorsWriter(folder, shards) as writer:
            _write_all(plan, writer, summary, device, precise, allow_nonfinite, progress)
            written = writer.close()
        _write_side_files(plan, folder)
        summary.files = [f.name for f in written.files]
        summary.bytes_written = written.bytes
        summary.tensors = written.tensors
        if verify:
            summary.max_logit_difference = verify_merge(
                base, adapters, folder, weights=weights, merged_dtype=plan.output_dtype_code
            )
            summary.verified = True
    summary.seconds = time.perf_counter() - started
    return summary


def _check_options(adapters, weights, subtract, dtype, max_shard_bytes) -> list[float]:
    if not adapters:
        raise LoraSurgeryError("merge needs at least one adapter")
    if len(set(map(lambda p: p.resolve(), adapters))) != len(adapters):
        raise LoraSurgeryError("the same adapter is given twice; use --weight to scale it instead")
    if dtype not in ("auto", *DTYPES):
        raise LoraSurgeryError(f"--dtype {dtype}: expected auto, fp32, bf16 or fp16")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise LoraSurgeryError("--max-shard-size must be positive")
    weights = [1.0] * len(adapters) if not weights else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise LoraSurgeryError(
            f"{len(weights)} --weight values for {len(adapters)} adapters; give one per adapter, in order"
        )
    for w, path in zip(weights, adapters):
        if not math.isfinite(w):
            raise LoraSurgeryError(f"--weight {w} for {path} is not a finite number")
    return [-w for w in weights] if subtract else weights


# --------------------------------------------------------------------------------------------------
# Planning: everything is resolved and checked here, before any output exists


@dataclass
class _Plan:
    checkpoint: object
    adapters: list  # loaded adapters
    weights: list[float]
    items: list[_Item]
    specs: list[TensorSpec]
    config: dict | None
    config_changes: dict
    notes: list[str]
    adapter_summaries: list[AdapterSummary]
    output_dtype_code: str | None  # --dtype as a safetensors code, None for auto


def _plan(base: Path, adapter_paths, weights, subtract, dtype, allow_nonfinite) -> _Plan:
    from lorasurgery.adapter import load_adapter

    checkpoint = open_checkpoint(base)
    adapters = [load_adapter(p) for p in adapter_paths]
    _bind_parameter_targets(checkpoint, adapters)
    if subtract:
        for path, adapter in zip(adapter_paths, adapters):
            dora = [m for m, module in adapter.modules.items() if module.dora]
            if dora:
                raise UnsupportedError(
                    f"{path}: --subtract is refused for DoRA adapters (module {dora[0]}): "
                    f"W' = (m/‖V‖)·V cannot be undone by subtracting an update"
                )
    tied = _TiedPair.find(checkpoint)
    tensors = dict(checkpoint.tensors)
    if tied and tied.output not in tensors:  # the checkpoint stores only the input side
        tensors[tied.output] = tensors[tied.input]

    items: dict[str, _Item] = {}
    out_code = DTYPES.get(dtype)

    def item_for(name: str) -> _Item:
        if name not in items:
            info = tensors[name]
            items[name] = _Item(name, _spec(name, info, out_code), info)
        return items[name]

    summaries = []
    replaced_by: dict[str, tuple[int, str]] = {}
    for index, (path, adapter, weight) in enumerate(zip(adapter_paths, adapters, weights)):
        if not adapter.modules and not _replacements_of(adapter):
            raise AdapterError(
                f"{path}: the adapter holds no LoRA modules and no saved tensors; nothing to merge"
            )
        view = _AdapterView(adapter, path, checkpoint, tensors)
        if not allow_nonfinite:
            view.check_finite()
        # Replacements first: a LoRA in the same merge adds on top of the saved tensor.
        for target, tensor_name, shared in view.replacements():
            names = [target]
            if shared and tied and target in (tied.input, tied.output):
                names = [tied.input, tied.output]  # a saved base layer is the shared parameter
            for name in names:
                previous = replaced_by.get(name)
                if previous and not _same_tensor(adapters[previous[0]], previous[1], adapter, tensor_name):
                    raise MismatchError(
                        f"{adapter_paths[previous[0]]} and {path} both replace {name} "
                        f"(modules_to_save or saved layers) with different values; merge them separately"
                    )
                replaced_by[name] = (index, tensor_name)
                item = item_for(name)
                item.replacement = (index, tensor_name)
                item.spec = TensorSpec(name, item.spec.dtype, view.shape_of(tensor_name))
        merged = dora = biases = 0
        for module, base_name in view.targets().items():
            item = item_for(base_name)
            view.check_shape(module, base_name, item.spec.shape)
            item.updates.append((index, module))
            merged += 1
            dora += bool(adapter.modules[module].dora)
            if _has_lora_bias(adapter.modules[module]):
                bias_name = base_name[: -len("weight")] + "bias"
                if not base_name.endswith(".weight") or bias_name not in tensors:
                    raise MismatchError(
                        f"{path}: module {module} has lora_bias but the base has no {bias_name} to add it to"
                    )
                item_for(bias_name).bias_terms.append((index, module))
                biases += 1
        for module, rows in adapter.tokens.items():
            base_name = view.rule.apply(rows.base_weight_name)
            if base_name not in tensors:
                raise MismatchError(
                    f"{path}: trainable tokens of {module}: the base has no {rows.base_weight_name}"
                )
            vocabulary = item_for(base_name).spec.shape[0]
            if max(rows.indices) >= vocabulary:
                raise MismatchError(
                    f"{path}: trainable tokens of {module}: token {max(rows.indices)} is beyond the "
                    f"{vocabulary} rows of {base_name}"
                )
            items[base_name].token_rows.append((index, module))
        summaries.append(
            AdapterSummary(
                str(path), weight, merged, dora, biases, sum(1 for v in replaced_by.values() if v[0] == index)
            )
        )

    notes: list[str] = []
    changes: dict = {}
    config = dict(checkpoint.config) if checkpoint.config is not None else None
    if tied and (tied.input in items or tied.output in items):
        changed_input = tied.input in items and not items[tied.input].untouched
        changed_output = tied.output in items and not items[tied.output].untouched
        if changed_input or changed_output:
            item_for(tied.input)
            item_for(tied.output)
            same = (
                items[tied.input].replacement == items[tied.output].replacement
                and not items[tied.input].updates
                and not items[tied.output].updates
                and not items[tied.input].bias_terms
                and not items[tied.output].token_rows
            )  # trainable tokens on the shared tensor change both sides, as PEFT's shared parameter
            if same:  # a saved base layer replaced the shared tensor: still tied, one tensor written
                if tied.output not in checkpoint.tensors:
                    del items[tied.output]
            else:
                changes["tie_word_embeddings"] = False
                notes.append(
                    f"the base ties {tied.output} to {tied.input} and the merge changes "
                    f"{'both' if changed_input and changed_output else (tied.input if changed_input else tied.output)}"
                    f": both are written and config.json gets tie_word_embeddings: false"
                )
    _check_vocabulary(checkpoint, tied, items, tensors, config, changes)
    if out_code and config is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config and config[key] != CONFIG_DTYPE_NAMES[out_code]:
                changes[key] = CONFIG_DTYPE_NAMES[out_code]
        if "torch_dtype" not in config and "dtype" not in config:
            changes["torch_dtype"] = CONFIG_DTYPE_NAMES[out_code]
    if config is not None:
        config.update(changes)
    elif changes:
        notes.append(f"the base has no config.json; these settings could not be recorded: {changes}")

    # Output order: the base's file order, tensors new to the output last.
    ordered = [
        items.get(name) or _Item(name, _spec(name, info, out_code), info) for name, info in tensors.items()
    ]
    ordered = [i for i in ordered if i.name in checkpoint.tensors or i.name in items]
    return _Plan(
        checkpoint=checkpoint,
        adapters=adapters,
        weights=weights,
        items=ordered,
        specs=[i.spec for i in ordered],
        config=config,
        config_changes=changes,
        notes=notes,
        adapter_summaries=summaries,
        output_dtype_code=out_code,
    )


def _spec(name: str, info: TensorInfo, out_code: str | None) -> TensorSpec:
    code = out_code if out_code and info.dtype in FLOAT_CODES else info.dtype
    return TensorSpec(name, code, tuple(info.shape))


def _has_lora_bias(module) -> bool:
    return bool(getattr(module, "lora_bias", False))


def _same_tensor(adapter_a, name_a, adapter_b, name_b) -> bool:
    import torch

    a, b = adapter_a.read(name_a), adapter_b.read(name_b)
    return a.shape == b.shape and torch.equal(a.float(), b.float())


def _check_vocabulary(checkpoint, tied, items, tensors, config, changes) -> None:
    """A replaced input embedding may have more rows (resized vocabulary): vocab_size follows it."""
    if tied is None:
        inputs = [n for n in tensors if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
        if len(inputs) != 1:
            return
        input_name = inputs[0]
        output_name = next((n for n in OUTPUT_EMBEDDING_NAMES if n in tensors), None)
    else:
        input_name, output_name = tied.input, tied.output
    item = items.get(input_name)
    if item is None or item.replacement is None:
        return
    rows = item.spec.shape[0]
    if rows == tensors[input_name].shape[0]:
        return
    if output_name is not None and output_name in tensors:
        out_rows = (items[output_name].spec if output_name in items else tensors[output_name]).shape[0]
        if out_rows != rows:
            raise MismatchError(
                f"the adapter resizes {input_name} to {rows} rows but {output_name} keeps {out_rows}; "
                f"an adapter for a resized vocabulary must also carry {output_name} (modules_to_save)"
            )
    if config is not None and config.get("vocab_size") != rows:
        changes["vocab_size"] = rows


@dataclass
class _TiedPair:
    input: str
    output: str

    @staticmethod
    def find(checkpoint) -> _TiedPair | None:
        """The tied input/output embedding pair, when the base may tie them."""
        config = checkpoint.config or {}
        flag = config.get("tie_word_embeddings")
        if flag is False:
            return None
        inputs = [n for n in checkpoint.tensors if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
        if len(inputs) != 1:
            return None
        output = next((n for n in OUTPUT_EMBEDDING_NAMES if n in checkpoint.tensors), None)
        if output is None:
            output = _tied_output_name(config, inputs[0])
            if output is None:
                return None
        elif flag is None and checkpoint.tensors[output].shape != checkpoint.tensors[inputs[0]].shape:
            return None
        return _TiedPair(inputs[0], output)


def _tied_output_name(config: dict, input_name: str) -> str | None:
    """The output embedding's name from the architecture's tied-weights keys, else `lm_head.weight`."""
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "lm_head.weight"  # every causal LM in transformers; no need to import it
    for target, source in architecture_tied_keys(config).items():
        if source == input_name:
            return target
    return None


def architecture_tied_keys(config: dict | None) -> dict[str, str]:
    """{tied tensor: the tensor it shares} for the architecture named in config.json (transformers)."""
    architectures = (config or {}).get("architectures") or []
    if not architectures:
        return {}
    try:
        import transformers

        keys = getattr(getattr(transformers, architectures[0], None), "_tied_weights_keys", None)
    except Exception:  # transformers missing or an unknown architecture: nothing known
        return {}
    if isinstance(keys, dict):  # transformers 5: {target: source}
        return {str(k): str(v) for k, v in keys.items()}
    return {}


class _AdapterView:
    """One adapter seen against one base: its targets and replaced tensors under base names."""

    def __init__(self, adapter, path: Path, checkpoint, tensors: dict):
        from lorasurgery.adapter import find_prefix_rule, resolve_base_names

        self.adapter = adapter
        self.path = path
        self.tensors = tensors
        self.config = checkpoint.config
        # The prefix rule comes from the LoRA modules (else from the saved tensors); shapes are
        # checked later against the tensor each module will really meet (a saved, resized one).
        weight_names = [module.base_weight_name for module in adapter.modules.values()]
        if weight_names:
            self.rule, unmatched = find_prefix_rule(weight_names, tensors)
            if unmatched:  # its error lists the modules the base lacks
                resolve_base_names(adapter, _Names(tensors, checkpoint.path))
        else:
            self.rule, _ = find_prefix_rule([r for r, _ in _replacements_of(adapter)], tensors)
        self._targets = {m: self.rule.apply(module.base_weight_name) for m, module in adapter.modules.items()}

    def _prefix(self, relative: str) -> str | None:
        name = self.rule.apply(relative)
        return name if name in self.tensors else None

    def targets(self) -> dict[str, str]:
        return dict(self._targets)

    def replacements(self):
        """(base tensor name, adapter tensor name, saved base layer?) per replaced tensor."""
        unmatched = []
        tied_keys = None
        for relative, tensor_name in _replacements_of(self.adapter):
            name = self._prefix(relative)
            shared = ".base_layer." in tensor_name
            if name is None:  # a tensor tied to another is stored once: replace the stored one
                tied_keys = architecture_tied_keys(self.config) if tied_keys is None else tied_keys
                source = tied_keys.get(self.rule.apply(relative) or relative)
                name = source if source in self.tensors else None
                shared = True
            if name is None:
                unmatched.append(relative)
                continue
            yield name, tensor_name, shared
        if unmatched:
            raise MismatchError(
                f"{self.path}: saved tensors with no counterpart in the base: {', '.join(unmatched[:8])}"
                + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
            )

    def shape_of(self, tensor_name: str) -> tuple[int, ...]:
        return _adapter_tensor_shape(self.adapter, tensor_name)

    def check_shape(self, module: str, base_name: str, shape: tuple[int, ...]) -> None:
        expected = tuple(self.adapter.modules[module].shape)
        if tuple(shape) != expected:
            raise MismatchError(
                f"{self.path}: module {module} expects a weight of shape {list(expected)} but the base's "
                f"{base_name} has shape {list(shape)}"
            )

    def check_finite(self) -> None:
        from lorasurgery.linalg.delta import all_finite

        for module in self.adapter.modules:
            for label, tensor in _module_tensors(self.adapter, module):
                if tensor.is_floating_point() and not all_finite(tensor):
                    raise NonFiniteError(
                        f"{self.path}: module {module}: {label} holds NaN/Inf; pass --allow-nonfinite to go on"
                    )
        for relative, tensor_name in _replacements_of(self.adapter):
            tensor = self.adapter.read(tensor_name)
            if tensor.is_floating_point() and not all_finite(tensor):
                raise NonFiniteError(
                    f"{self.path}: saved tensor {relative} holds NaN/Inf; pass --allow-nonfinite to go on"
                )


@dataclass
class _Names:
    """A checkpoint's names as resolve_base_names sees them: the tied output embedding included
    even when only the input side is stored."""

    tensors: dict
    path: Path


def _replacements_of(adapter) -> list[tuple[str, str]]:
    """(path relative to the model, adapter tensor name) of every non-LoRA tensor the adapter saved."""
    return list(adapter.replacements.items())


def _adapter_tensor_shape(adapter, tensor_name: str) -> tuple[int, ...]:
    """A saved tensor's shape, from the adapter file's header."""
    return tuple(adapter.tensors[tensor_name].shape)


def _module_tensors(adapter, module: str):
    A, B = adapter.read_factors(module)
    yield "lora_A", A
    yield "lora_B", B
    if adapter.modules[module].dora:
        yield "lora_magnitude_vector", adapter.read_magnitude(module)
    if _has_lora_bias(adapter.modules[module]):
        yield "lora_B.bias", adapter.read_lora_bias(module)


# --------------------------------------------------------------------------------------------------
# Writing


def _write_all(
    plan: _Plan, writer, summary: MergeSummary, device, precise, allow_nonfinite, progress
) -> None:
    """Read, merge and write every output tensor: a reader thread, two merging threads, a writer.

    Disk reads, the merge arithmetic and disk writes overlap (file I/O and torch release the GIL),
    and two tensors are merged at once (torch itself on one thread each). The writer puts each
    tensor at its planned offset, so the order of completion does not matter. A byte budget of
    twice the largest tensor bounds what is held in memory at once."""
    checkpoint = plan.checkpoint
    files = {f: i for i, f in enumerate(checkpoint.files)}
    order = sorted(
        plan.items, key=lambda i: (files.get(i.source.file, 0), i.source.start) if i.source else (0, 0)
    )
    costs = {item.name: _memory_cost(plan, item) for item in order}
    budget = _Budget(2 * max(costs.values(), default=0))
    total_bytes = sum(s.nbytes for s in plan.specs)

    def read(item: _Item):
        budget.acquire(costs[item.name])
        if _copies_raw(item):
            return None  # the writer copies the bytes itself
        if item.replacement is not None:
            index, tensor_name = item.replacement
            return plan.adapters[index].read(tensor_name)
        return checkpoint.read(item.source.name)

    def compute(item: _Item, tensor):
        if tensor is None:
            return None
        return _produce(plan, item, tensor, device, precise, allow_nonfinite)

    flusher = _Writeback(writer)

    def write(item: _Item, tensor) -> None:
        if tensor is None:
            writer.copy_raw(item.name, item.source)
        else:
            writer.write(item.name, tensor)
        budget.release(costs[item.name])
        flusher.start(item.name)

    done_bytes = 0
    with flusher, _Pipeline(order, read, compute, write, workers=2, on_stop=budget.cancel) as pipeline:
        for done, item in enumerate(pipeline, 1):
            if _copies_raw(item):
                summary.tensors_copied += 1
            elif item.replacement is not None:
                summary.tensors_replaced += 1
            elif item.updates or item.bias_terms or item.token_rows:
                summary.tensors_merged += 1
            else:
                summary.tensors_converted += 1
            done_bytes += item.spec.nbytes
            progress(Progress("merge", done, len(order), item.name, done_bytes, total_bytes))


class _Writeback:
    """Starts writing each finished tensor to disk at once, while later ones are read and merged.

    Otherwise every byte stays dirty in the page cache until close()'s fsync, and the disk, idle
    while tensors come from the page cache, then has all of it to write at the end: 8.4 s → 6.6 s
    (medians of 4) for the 1.1B bf16 merge. posix_fadvise(DONTNEED) on the written range starts
    the write-back without waiting for it; it acts on the file, so a read-only descriptor of our
    own will do."""

    def __init__(self, writer):
        self.writer = writer
        self.descriptors: dict[int, int] = {}

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.descriptors.values():
            os.close(fd)
        self.descriptors.clear()

    def start(self, name: str) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        slot = self.writer.slots[name]
        try:
            fd = self.descriptors.get(slot.file_index)
            if fd is None:
                path = self.writer.folder / self.writer.names[slot.file_index]
                fd = self.descriptors[slot.file_index] = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, slot.offset, slot.spec.nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:  # only an optimisation: close()'s fsync still makes the data durable
            pass


@contextmanager
def _one_compute_thread():
    """torch on one thread while planning and merging: the blocks are small and memory-bound, the
    other core is busy with reads and writes, and OpenMP workers spinning between tiny parallel
    regions made a 1.1B merge 6× slower on a busy 2-core machine (and isfinite on the adapter's
    small tensors 1.2 s instead of 0.02 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _copies_raw(item: _Item) -> bool:
    return (
        item.untouched
        and item.source is not None
        and item.source.dtype == item.spec.dtype
        and item.source.start >= 0  # safetensors, not a pickle
    )


def _memory_cost(plan: _Plan, item: _Item) -> int:
    """Bytes an item holds while in flight: what is read, plus the output when it is a new buffer."""
    if _copies_raw(item):
        return 0
    if item.replacement is not None:
        index, tensor_name = item.replacement
        shape = _adapter_tensor_shape(plan.adapters[index], tensor_name)
        read = math.prod(shape) * 4  # adapters are float32 at most, in practice
    else:
        read = item.source.nbytes
    return read + (0 if item.source and item.source.dtype == item.spec.dtype else item.spec.nbytes)


def _produce(plan: _Plan, item: _Item, tensor, device, precise, allow_nonfinite):
    """The output tensor of `item` from its base (or replacement) tensor."""
    from lorasurgery.linalg.delta import merge_bias, merge_weight

    out_dtype = torch_dtype_of(item.spec.dtype)
    if item.token_rows:  # after LoRA or a replacement: PEFT overwrites the rows last
        from lorasurgery.linalg.delta import overwrite_rows

        rows = [
            (plan.adapters[i].tokens[m].indices, plan.adapters[i].read(plan.adapters[i].tokens[m].key))
            for i, m in item.token_rows
        ]
        plain = _Item(item.name, item.spec, item.source, item.replacement, item.updates, item.bias_terms)
        return overwrite_rows(
            _produce(plan, plain, tensor, device, precise, allow_nonfinite), rows, out_dtype=out_dtype
        )
    if item.updates:
        updates = [_update(plan, index, module) for index, module in item.updates]
        return merge_weight(
            tensor,
            updates,
            out_dtype=out_dtype,
            precise=precise,
            device=device,
            allow_nonfinite=allow_nonfinite,
            name=item.name,
        )
    if item.bias_terms:
        terms = []
        for index, module in item.bias_terms:
            lora = plan.adapters[index].modules[module]
            terms.append((plan.adapters[index].read_lora_bias(module), plan.weights[index] * lora.scale))
        return merge_bias(
            tensor,
            terms,
            out_dtype=out_dtype,
            precise=precise,
            allow_nonfinite=allow_nonfinite,
            name=item.name,
            modules=", ".join(m for _, m in item.bias_terms),
        )
    return tensor.to(out_dtype)


class _Budget:
    """Bytes in flight between the reader and the writer; one item always fits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.condition = threading.Condition()
        self.cancelled = False

    def acquire(self, n: int) -> None:
        with self.condition:
            while self.used and self.used + n > self.limit and not self.cancelled:
                self.condition.wait(0.1)
            self.used += n

    def release(self, n: int) -> None:
        with self.condition:
            self.used -= n
            self.condition.notify_all()

    def cancel(self) -> None:
        with self.condition:
            self.cancelled = True
            self.condition.notify_all()


class _Pipeline:
    """read(item) in a reader thread → compute(item, value) in `workers` threads → write(item,
    result) in a writer thread. Iterating yields each item once written, in completion order.

    Leaving the block waits for every thread; an error in any thread stops the others and is
    raised in the caller (the first one wins), and so is a Ctrl-C in the caller."""

    _END = object()

    def __init__(self, items, read, compute, write, *, workers: int = 1, on_stop=None):
        self.items, self.read, self.compute, self.write = items, read, compute, write
        self.workers, self.on_stop = workers, on_stop
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.read_queue: queue.Queue = queue.Queue(maxsize=workers)
        self.write_queue: queue.Queue = queue.Queue(maxsize=workers)
        self.done_queue: queue.Queue = queue.Queue()
        self.threads = [
            threading.Thread(target=self._reader, name="merge-reader", daemon=True),
            *(
                threading.Thread(target=self._computer, name=f"merge-{i}", daemon=True)
                for i in range(workers)
            ),
            threading.Thread(target=self._writer, name="merge-writer", daemon=True),
        ]

    def __enter__(self) -> _Pipeline:
        try:
            for thread in self.threads:
                thread.start()
        except BaseException as error:  # Ctrl-C between two starts: stop what runs, then re-raise
            self._fail(error)
            self._join()
            raise
        return self

    def __iter__(self):
        for _ in self.items:
            value = self._get(self.done_queue)
            if value is self._END:
                return
            yield value

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fail(exc)
        interrupted = self._join()
        if exc_type is None and interrupted is not None:
            raise interrupted
        if exc_type is None and self.error is not None:
            raise self.error

    def _join(self) -> BaseException | None:
        # The threads must be gone before the temporary folder is removed and before the process
        # exits (a thread still inside torch at exit aborts it), so a second Ctrl-C or SIGTERM
        # while waiting only makes them stop sooner.
        interrupted = None
        for thread in self.threads:
            while thread.is_alive():
                try:
                    thread.join()
                except KeyboardInterrupt as error:
                    interrupted = interrupted or error
                    self._fail(error)
        return interrupted

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop()  # wake a reader waiting for memory

    def _put(self, q: queue.Queue, value) -> None:
        while not self.stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    if threading.current_thread() is threading.main_thread() and self.error is not None:
                        raise self.error from None
                    return self._END

    def _reader(self) -> None:
        try:
            for item in self.items:
                if self.stop.is_set():
                    return
                self._put(self.read_queue, (item, self.read(item)))
            for _ in range(self.workers):
                self._put(self.read_queue, self._END)
        except BaseException as error:  # handed to the main thread
            self._fail(error)

    def _computer(self) -> None:
        try:
            while True:
                value = self._get(self.read_queue)
                if value is self._END:
                    self._put(self.write_queue, self._END)
                    return
                item, data = value
                result = self.compute(item, data)
                del value, data  # the input may be a large tensor: do not hold it while waiting
                self._put(self.write_queue, (item, result))
        except BaseException as error:
            self._fail(error)

    def _writer(self) -> None:
        try:
            finished = 0
            while finished < self.workers:
                value = self._get(self.write_queue)
                if value is self._END:
                    finished += 1
                    continue
                self.write(*value)
                self.done_queue.put(value[0])
                del value
        except BaseException as error:
            self._fail(error)


def _update(plan: _Plan, index: int, module: str):
    from lorasurgery.linalg.delta import Update

    adapter = plan.adapters[index]
    lora = adapter.modules[module]
    A, B = adapter.read_factors(module)
    return Update(
        module=lora.name if lora.kind != "parameter" else lora.base_weight_name,
        kind=lora.kind,
        experts=lora.experts,
        transposed=lora.transposed,
        A=A,
        B=B,
        scale=lora.scale,
        weight=plan.weights[index],
        fan_in_fan_out=bool(lora.fan_in_fan_out),
        magnitude=adapter.read_magnitude(module) if lora.dora else None,
        source=str(adapter.path),
    )


def _bind_parameter_targets(checkpoint, adapters) -> None:
    """target_parameters modules learn their parameter and layout from the base (adapter/parameters.py)."""
    if not any(m.kind == "parameter" for a in adapters for m in a.modules.values()):
        return
    from lorasurgery.adapter.parameters import bind_against
    from lorasurgery.architecture import structure_of

    structure = structure_of(checkpoint)
    for adapter in adapters:
        bind_against(adapter, checkpoint.tensors, structure)


def _write_side_files(plan: _Plan, folder: Path) -> None:
    checkpoint = plan.checkpoint
    source = checkpoint.folder
    if plan.config is not None:
        with open(folder / "config.json", "w", encoding="utf-8") as f:
            json.dump(plan.config, f, indent=2)
            f.write("\n")
    names = list(SIDE_FILES)
    if Path(checkpoint.path).is_dir():  # remote code and templates that config.json may name
        names += sorted(p.name for p in source.iterdir() if p.suffix in (".py", ".jinja", ".tiktoken"))
    copy_side_files(source, folder, dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------
# Verification: base + adapters applied by PEFT against the merged model, in float32

VERIFY_TOLERANCE = {"F32": 1e-4, "F16": 2e-2, "BF16": 6e-2}  # × (1 + max |logit|)


def _require_verification_libraries() -> None:
    import importlib.util

    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise VerificationError(
            f"--verify needs {' and '.join(missing)} (pip install {' '.join(missing)}); nothing was written"
        )


def verify_merge(
    base, adapters, merged, *, weights, merged_dtype: str | None = None, batches: int = 2
) -> float:
    """Max |logits(base + adapters) − logits(merged)| on deterministic token batches, in float32.

    Raises VerificationError when it exceeds the tolerance of the merged checkpoint's dtype. When
    --dtype changed the dtype, the base is rounded to it first, so that what is compared is the
    merge, not the precision the user asked for."""
    import torch

    code = merged_dtype or _checkpoint_float_dtype(merged)
    with _quiet_transformers():
        reference_model = _load_model(base)
        if merged_dtype:
            rounded = torch_dtype_of(merged_dtype)
            with torch.no_grad():
                for parameter in reference_model.parameters():
                    parameter.copy_(parameter.to(rounded))
        config = reference_model.config
        vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randint(0, vocab, (2, 16), generator=generator) for _ in range(batches)]
        peft_model = _apply_adapters(reference_model, adapters, weights)
        reference = _run(peft_model, inputs)
        del peft_model, reference_model
        merged_model = _load_model(merged)
        outputs = _run(merged_model, inputs)
        del merged_model
    difference = max(float((a - b).abs().max()) for a, b in zip(reference, outputs))
    scale = max(float(a.abs().max()) for a in reference)
    tolerance = VERIFY_TOLERANCE.get(code, 1e-4) * (1.0 + scale)
    if not difference <= tolerance:
        raise VerificationError(
            f"verification failed: the merged model's logits differ from base + adapters by up to "
            f"{difference:.3g} (tolerance {tolerance:.3g} for {code}); nothing was written"
        )
    return difference


@contextmanager
def _quiet_transformers():
    """No loading bars or deprecation warnings from transformers/peft in the middle of our output."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _checkpoint_float_dtype(folder) -> str:
    codes = [t.dtype for t in open_checkpoint(folder).tensors.values() if t.dtype in FLOAT_CODES]
    return max(set(codes), key=codes.count) if codes else "F32"


def _load_model(path):
    import torch
    import transformers

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds; report which model failed
        raise VerificationError(f"--verify: transformers cannot load {folder}: {error}") from None
    return model.eval()


def _apply_adapters(model, adapters, weights):
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.base_model.set_adapter(names)
    # A weight w scales s: exactly w·ΔW for plain LoRA (and lora_bias), and DoRA's w·s as merged.
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict):
            continue
        for name, weight in zip(names, weights):
            if name in scaling and weight != 1.0:
                scaling[name] *= weight
    return peft_model.eval()


def _run(model, inputs):
    import torch

    outputs = []
    with torch.no_grad():
        for ids in inputs:
            result = model(input_ids=ids)
            value = getattr(result, "logits", None)
            if value is None:
                value = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
            outputs.append(value.float())
    return outputs
