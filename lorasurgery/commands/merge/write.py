"""merge execution: each planned output tensor read, merged and written through the project's pipeline.

A reader thread, two merging threads (torch on one thread each) and a writer overlap disk reads,
arithmetic and disk writes; the writer puts each tensor at its planned offset, so the order of
completion does not matter. A byte budget of twice the largest in-flight tensor bounds memory.

A requantizing item (--requantize, docs/design.md §13) is merged in float32, requantized by its
format's reader (linalg.requantize) and written as its codes and scales; its retention is recorded
in plan.measured. With --min-retention, `measure_retention` runs the same computation over those
items first (nothing written, one tensor at a time), since whether a module is written quantized
fixes the output's layout before the first byte.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import replace
from pathlib import Path

from lorasurgery.commands.merge.plan import Item, MergePlan
from lorasurgery.concurrency import Pipeline
from lorasurgery.io import TensorSpec, copy_side_files
from lorasurgery.io.checkpoint import Encoded
from lorasurgery.io.safetensors_format import dtype_name_of, torch_dtype_of
from lorasurgery.linalg.delta import merge_bias, overwrite_rows
from lorasurgery.linalg.requantize import requantize
from lorasurgery.linalg.update import kernel_update, merge_into
from lorasurgery.progress import Progress

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


def write_all(
    plan: MergePlan, writer, summary, device, precise, allow_nonfinite, progress, reused=frozenset()
) -> None:
    """Read, merge and write every output tensor of `plan` into `writer`, counting into `summary`.

    Tensors named in `reused` lie in shards a resumed run keeps (io/journal.py): an item all of whose
    tensors are there (a requantized one: its codes and scales) is counted as what it is, never read
    nor computed; one split across a kept shard and another is computed, and only its tensors
    outside the kept shard are written."""
    order = _pending(plan, summary, reused)
    costs = {item.name: memory_cost(plan, item) for item in order}
    total_bytes = sum(_item_bytes(item) for item in order)  # what is left to do, when resumed
    flusher = _Writeback(writer)
    pipeline = Pipeline(
        order,
        _read_step(plan),
        _compute_step(plan, writer, device, precise, allow_nonfinite),
        _write_step(writer, flusher, reused),
        workers=2,
        cost=lambda item: costs[item.name],
        limit=2 * max(costs.values(), default=0),
        name="merge",
    )
    done_bytes = 0
    with flusher, pipeline:
        for done, item in enumerate(pipeline, 1):
            _count(item, summary)
            done_bytes += _item_bytes(item)
            progress(Progress("merge", done, len(order), item.name, done_bytes, total_bytes))
    if plan.requantize:
        summary.retention = retention_rows(plan)


def _pending(plan: MergePlan, summary, reused) -> list[Item]:
    """The items left to write, in the base's file order; those wholly in kept shards are counted."""
    files = {f: i for i, f in enumerate(plan.checkpoint.files)}
    kept = [item for item in plan.items if {item.name, *(p.name for p in item.parts)} <= reused]
    for item in kept:
        _count(item, summary)
    kept_names = {item.name for item in kept}
    return sorted(
        (item for item in plan.items if item.name not in kept_names),
        key=lambda i: (files.get(i.source.file, 0), i.source.position) if i.source else (0, 0),
    )


def _item_bytes(item: Item) -> int:
    return item.spec.nbytes + sum(p.nbytes for p in item.parts)


def _read_step(plan: MergePlan):
    """The pipeline's read: what an item starts from, still encoded for a quantized base."""
    checkpoint = plan.checkpoint

    def read(item: Item):
        if copies_raw(item):
            return None  # the writer copies the bytes itself
        if item.requantize:
            return checkpoint.read_encoded(item.source.name)  # deq(W): the start of W′ and of its retention
        if item.recipe.start is not None:
            index, tensor_name = item.recipe.start
            return plan.adapters[index].adapter.read(tensor_name)
        return checkpoint.read_encoded(item.source.name)  # a quantized base's: decoded in compute

    return read


def _compute_step(plan: MergePlan, writer, device, precise, allow_nonfinite):
    """The merging threads' work: an item's output tensor (and its hash), or its codes and scales."""
    stored = plan.checkpoint.raw

    def compute(item: Item, tensor):
        if tensor is None:
            return None
        if item.requantize:
            result = requantized(plan, item, tensor, device, precise, allow_nonfinite, stored)
            plan.measured[item.source.name] = replace(result, tensors={})
            return {name: value.cpu() for name, value in result.tensors.items()}
        if isinstance(tensor, Encoded):  # decoded here, by the merging threads, not by the reader
            tensor = decoded(item, tensor)
        merged = produce(plan, item, tensor, device, precise, allow_nonfinite).to("cpu")
        return merged, writer.digest(merged)  # the journal's hash, here in a merging thread

    return compute


def _write_step(writer, flusher: _Writeback, reused):
    """The writer thread's work: an item's bytes at their planned offset, write-back started."""

    def write(item: Item, result) -> None:
        if result is None:
            writer.copy_raw(item.name, item.source)
        elif isinstance(result, dict):  # a requantized tensor: its codes and scales
            for name, value in result.items():
                if name not in reused:  # a part already in a shard a resumed run keeps: the same bytes
                    writer.write(name, value)
                    flusher.start(name)
            return
        else:
            writer.write(item.name, *result)
        flusher.start(item.name)

    return write


def decoded(item: Item, encoded: Encoded):
    """What the merge kernel reads of a quantized base tensor: its Rows (decoded block by block
    inside the kernel, docs/design.md §13 "Decoding in bands") when only LoRA updates touch it and
    its format decodes in bands, else the whole float32 tensor."""
    recipe = item.recipe
    if recipe.updates and not recipe.bias_terms and recipe.start is None:
        rows = encoded.rows()
        if rows is not None:
            return rows
    return encoded.decode()


def requantized(plan: MergePlan, item: Item, base, device, precise, allow_nonfinite, stored):
    """W′ of a requantizing item: deq(W) (`base`: float32, or the Encoded tensor as read) merged in
    float32, then requantized by its format (linalg.requantize), with its retention; `stored` is the
    base's stored layer. Where the format quantizes in bands, the merge, the quantization and the
    retention run together block by block (linalg.requantize.requantize_blocks): the same bytes."""
    info = item.source
    if isinstance(base, Encoded):
        fused = _requantized_in_blocks(plan, item, base, device, precise, allow_nonfinite)
        if fused is not None:
            return fused
        base = base.decode()
    as_float32 = replace(
        item, spec=TensorSpec(item.name, "F32", tuple(info.shape)), parts=(), requantize=False
    )
    if item.recipe.start is not None:
        index, tensor_name = item.recipe.start
        start = plan.adapters[index].adapter.read(tensor_name)
    else:
        start = base.clone()  # merge_weight may write W′ over its input
    merged = produce(plan, as_float32, start, device, precise, allow_nonfinite)
    if str(device) != "cpu":  # quantize, decode and measure on the merge's device too
        base, merged = base.to(device), merged.to(device)
    return requantize(info, base, merged, lambda part: stored.read(part.name, str(device)))


def _requantized_in_blocks(plan: MergePlan, item: Item, encoded: Encoded, device, precise, allow_nonfinite):
    """requantized() fused block by block, or None where it cannot be (a replaced tensor, trainable
    tokens, a precise merge, a format or layout without band decoding and quantizing)."""
    from lorasurgery.io import readers
    from lorasurgery.linalg.delta import merged_blocks
    from lorasurgery.linalg.requantize import requantize_blocks

    recipe = item.recipe
    if precise or recipe.start is not None or recipe.token_rows or recipe.bias_terms or not recipe.updates:
        return None
    rows = encoded.rows()
    read = encoded.reader("cpu")
    quantizer = readers.band_quantizer(item.source, read)
    if rows is None or quantizer is None:
        return None
    updates = [update_of(plan, index, module) for index, module in recipe.updates]
    if any(u.experts for u in updates):
        return None
    blocks = merged_blocks(
        rows, updates, device=device, allow_nonfinite=allow_nonfinite, name=item.name, keep_base=True
    )
    return requantize_blocks(item.source, blocks, quantizer, read(item.source.codes), _thread_buffers())


_THREAD = threading.local()


def _thread_buffers() -> dict:
    """The calling merging thread's scratch buffers for requantize_blocks, kept from one tensor to
    the next (fresh ones per tensor cost their page faults again: docs/merge.md); they go with the
    pipeline's thread. The main thread gets fresh ones, so that nothing outlives the command."""
    if threading.current_thread() is threading.main_thread():
        return {}
    buffers = getattr(_THREAD, "buffers", None)
    if buffers is None:
        buffers = _THREAD.buffers = {}
    return buffers


def measure_retention(plan: MergePlan, device, precise, allow_nonfinite, progress) -> dict:
    """{logical name: Requantized (its tensors dropped)} of every requantizing item, nothing written:
    the same computation as the write, through the same pipeline and byte budget."""
    checkpoint, stored = plan.checkpoint, plan.checkpoint.raw
    items = [i for i in plan.items if i.requantize]
    costs = {item.name: memory_cost(plan, item) for item in items}

    def compute(item: Item, base):
        result = requantized(plan, item, base, device, precise, allow_nonfinite, stored)
        return replace(result, tensors={})

    pipeline = Pipeline(
        items,
        lambda item: checkpoint.read_encoded(item.source.name),
        compute,
        workers=2,
        cost=lambda item: costs[item.name],
        limit=2 * max(costs.values(), default=0),
        name="retention",
    )
    with pipeline:
        for done, (item, result) in enumerate(pipeline, 1):
            plan.measured[item.source.name] = result
            progress(Progress("retention", done, len(items), item.source.name))
    return plan.measured


def retention_rows(plan: MergePlan) -> list[dict]:
    """One row per merged quantized tensor, in output order: its retention, the share of its codes
    that changed, and how it was written."""
    rows = []
    for item in plan.items:
        written_whole = item.source is not None and item.source.dequantized and item.name == item.source.name
        if not (item.requantize or written_whole) or item.source.name not in plan.measured:
            continue
        result = plan.measured[item.source.name]
        name = item.source.name
        rows.append(
            {
                "module": name[: -len(".weight")] if name.endswith(".weight") else name,
                "tensor": name,
                "retention": result.retention,
                "codes_changed": result.codes_changed / result.codes if result.codes else 0.0,
                "written": plan.checkpoint.quantization.name
                if item.requantize
                else dtype_name_of(item.spec.dtype),
            }
        )
    return rows


def _count(item: Item, summary) -> None:
    if copies_raw(item):
        summary.tensors_copied += 1
    elif item.requantize:
        summary.tensors_requantized += 1
    elif item.recipe.start is not None:
        summary.tensors_replaced += 1
    elif item.recipe.updates or item.recipe.bias_terms or item.recipe.token_rows:
        summary.tensors_merged += 1
    else:
        summary.tensors_converted += 1


class _Writeback:
    """Starts writing each finished tensor to disk at once, while later ones are read and merged.

    Otherwise every byte stays dirty in the page cache until close()'s fsync, and the disk has it
    all to write at the end (docs/merge.md has the measurement). posix_fadvise(DONTNEED) on the
    written range starts the write-back without waiting; a read-only descriptor of our own will do."""

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


def copies_raw(item: Item) -> bool:
    # A dequantized tensor of a quantized base has start -1 (no bytes of its own): never copied raw.
    return (
        item.untouched
        and item.source is not None
        and item.source.dtype == item.spec.dtype
        and item.source.start >= 0  # safetensors, not a pickle
    )


def memory_cost(plan: MergePlan, item: Item) -> int:
    """Bytes an item holds while in flight: what is read, plus the output when it is a new buffer."""
    if copies_raw(item):
        return 0
    if item.requantize:  # deq(W), W′ in float32 and deq(W′), and the new and old codes and scales
        return 3 * item.source.nbytes + 2 * (item.spec.nbytes + sum(p.nbytes for p in item.parts))
    if item.recipe.start is not None:
        index, tensor_name = item.recipe.start
        shape = tuple(plan.adapters[index].adapter.tensors[tensor_name].shape)
        read = math.prod(shape) * 4  # adapters are float32 at most, in practice
    else:
        read = item.source.nbytes
    return read + (0 if item.source and item.source.dtype == item.spec.dtype else item.spec.nbytes)


def produce(plan: MergePlan, item: Item, tensor, device, precise, allow_nonfinite):
    """The output tensor of `item` from its base (or replacement) tensor."""
    out_dtype = torch_dtype_of(item.spec.dtype)
    if item.recipe.token_rows:  # after LoRA or a replacement: PEFT overwrites the rows last
        rows = []
        for index, module in item.recipe.token_rows:
            tokens = plan.adapters[index].tokens[module].rows
            rows.append((tokens.indices, plan.adapters[index].adapter.read(tokens.key)))
        start = produce(
            plan,
            replace(item, recipe=replace(item.recipe, token_rows=[])),
            tensor,
            device,
            precise,
            allow_nonfinite,
        )
        return overwrite_rows(start, rows, out_dtype=out_dtype)
    if item.recipe.updates:
        updates = [update_of(plan, index, module) for index, module in item.recipe.updates]
        return merge_into(  # per-expert modules into their slices of a fused parameter too
            tensor,
            updates,
            out_dtype=out_dtype,
            precise=precise,
            device=device,
            allow_nonfinite=allow_nonfinite,
            name=item.name,
        )
    if item.recipe.bias_terms:
        terms = []
        for index, module in item.recipe.bias_terms:
            lora = plan.adapters[index].targets[module].lora
            terms.append(
                (plan.adapters[index].adapter.read_lora_bias(lora), plan.weights[index] * lora.scale)
            )
        return merge_bias(
            tensor,
            terms,
            out_dtype=out_dtype,
            precise=precise,
            allow_nonfinite=allow_nonfinite,
            name=item.name,
            modules=", ".join(m for _, m in item.recipe.bias_terms),
        )
    return tensor.to(out_dtype)


def update_of(plan: MergePlan, index: int, module: str):
    """The kernel's Update for one adapter's module, laid out as the binding decided."""
    bound = plan.adapters[index]
    return kernel_update(bound.adapter, bound.targets[module].lora, weight=plan.weights[index])


def write_side_files(plan: MergePlan, folder: Path) -> None:
    """config.json (with the plan's changes) and the tokenizer/generation files beside the weights."""
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
