"""merge execution: each planned output tensor read, merged and written through the project's pipeline.

A reader thread, two merging threads (torch on one thread each) and a writer overlap disk reads,
arithmetic and disk writes; the writer puts each tensor at its planned offset, so the order of
completion does not matter. A byte budget of twice the largest in-flight tensor bounds memory.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lorasurgery.commands.merge.plan import Item, MergePlan
from lorasurgery.concurrency import Pipeline
from lorasurgery.io import copy_side_files
from lorasurgery.io.safetensors_format import torch_dtype_of
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

    Tensors named in `reused` lie in shards a resumed run keeps (io/journal.py): counted as what
    they are, never read nor computed."""
    checkpoint = plan.checkpoint
    files = {f: i for i, f in enumerate(checkpoint.files)}
    for item in plan.items:
        if item.name in reused:
            _count(item, summary)
    order = sorted(
        (item for item in plan.items if item.name not in reused),
        key=lambda i: (files.get(i.source.file, 0), i.source.position) if i.source else (0, 0),
    )
    costs = {item.name: memory_cost(plan, item) for item in order}
    total_bytes = sum(item.spec.nbytes for item in order)  # what is left to do, when resumed

    def read(item: Item):
        if copies_raw(item):
            return None  # the writer copies the bytes itself
        if item.recipe.start is not None:
            index, tensor_name = item.recipe.start
            return plan.adapters[index].adapter.read(tensor_name)
        return checkpoint.read(item.source.name)

    def compute(item: Item, tensor):
        if tensor is None:
            return None
        merged = produce(plan, item, tensor, device, precise, allow_nonfinite).to("cpu")
        return merged, writer.digest(merged)  # the journal's hash, here in a merging thread

    flusher = _Writeback(writer)

    def write(item: Item, result) -> None:
        if result is None:
            writer.copy_raw(item.name, item.source)
        else:
            writer.write(item.name, *result)
        flusher.start(item.name)

    pipeline = Pipeline(
        order,
        read,
        compute,
        write,
        workers=2,
        cost=lambda item: costs[item.name],
        limit=2 * max(costs.values(), default=0),
        name="merge",
    )
    done_bytes = 0
    with flusher, pipeline:
        for done, item in enumerate(pipeline, 1):
            _count(item, summary)
            done_bytes += item.spec.nbytes
            progress(Progress("merge", done, len(order), item.name, done_bytes, total_bytes))


def _count(item: Item, summary) -> None:
    if copies_raw(item):
        summary.tensors_copied += 1
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
    if item.recipe.start is not None:
        index, tensor_name = item.recipe.start
        shape = tuple(plan.adapters[index].adapter.tensors[tensor_name].shape)
        read = math.prod(shape) * 4  # adapters are float32 at most, in practice
    else:
        read = item.source.nbytes
    return read + (0 if item.source and item.source.dtype == item.spec.dtype else item.spec.nbytes)


def produce(plan: MergePlan, item: Item, tensor, device, precise, allow_nonfinite):
    """The output tensor of `item` from its base (or replacement) tensor."""
    from lorasurgery.linalg.delta import merge_bias, merge_weight

    out_dtype = torch_dtype_of(item.spec.dtype)
    if item.recipe.token_rows:  # after LoRA or a replacement: PEFT overwrites the rows last
        from dataclasses import replace

        from lorasurgery.linalg.delta import overwrite_rows

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
        return merge_weight(
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
    from lorasurgery.linalg.update import kernel_update

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
