"""Streaming writer of (sharded) safetensors checkpoints, one tensor at a time.

Every name, dtype and shape is known before the first byte is written, so each shard's header and
every tensor's offset are fixed up front: a tensor can be written as soon as it is computed, in any
order, and then dropped. Untouched tensors can be copied byte for byte from their source file.
Shards are named as Hugging Face names them, with `<stem>.safetensors.index.json` when there are
several. The writer writes into a folder it is given; `output.atomic_output_dir` makes that folder
appear at OUT only when everything is written.

For resumable runs (docs/design.md §7, io/journal.py) the writer can report each shard the moment
its last tensor is written and fsynced, with a digest made of each part's CRC-32 as it was written
(no re-read), and can start with some shards already complete: those files are not touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import OutputError
from lorasurgery.io.safetensors_format import (
    DTYPE_BITS,
    TensorInfo,
    byte_size,
    dtype_code_of,
    encode_header,
)

_COPY_CHUNK = 1 << 24  # 16 MiB


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return byte_size(self.dtype, self.shape)

    @classmethod
    def like(cls, info: TensorInfo, dtype: str | None = None) -> TensorSpec:
        return cls(info.name, dtype or info.dtype, tuple(info.shape))


def plan_shards(
    specs: Sequence[TensorSpec],
    *,
    max_shard_bytes: int | None = None,
    groups: Iterable[Iterable[str]] | None = None,
) -> list[list[TensorSpec]]:
    """Split `specs` into shards: by `groups` of names (shard like a source checkpoint), or
    greedily in order up to `max_shard_bytes` (a larger tensor gets a shard of its own), or one."""
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise OutputError("internal error: duplicate tensor names in the output plan")
    if max_shard_bytes is not None:
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        return shards
    if groups is not None:
        shards = [[by_name[n] for n in group if n in by_name] for group in groups]
        placed = {s.name for shard in shards for s in shard}
        leftovers = [s for s in specs if s.name not in placed]
        if leftovers:  # tensors new to the output join the last shard
            shards.append(leftovers) if not shards else shards[-1].extend(leftovers)
        return [shard for shard in shards if shard] or [[]]
    return [list(specs)]


def shard_file_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass(frozen=True)
class ShardLayout:
    """One output file as planned: its name, header bytes, and its tensors in file order."""

    name: str
    header: bytes
    specs: tuple[TensorSpec, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(spec.nbytes for spec in self.specs)


def shard_layouts(
    shards: list[list[TensorSpec]], stem: str = "model", metadata: dict[str, str] | None = None
) -> list[ShardLayout]:
    """Every planned file's name and exact header: the bytes the writer will produce, less the data."""
    metadata = {"format": "pt", **(metadata or {})}
    layouts = []
    for file_name, shard in zip(shard_file_names(len(shards), stem), shards):
        entries, position = {}, 0
        for spec in shard:
            if spec.dtype not in DTYPE_BITS:
                raise OutputError(f"cannot write tensor {spec.name!r}: unknown dtype {spec.dtype}")
            entries[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [position, position + spec.nbytes],
            }
            position += spec.nbytes
        layouts.append(ShardLayout(file_name, encode_header(entries, metadata), tuple(shard)))
    return layouts


def tensor_digest(data, running: int = 0) -> int:
    """The CRC-32 of a tensor's bytes (`running`: of the bytes before `data`, for chunked reads).

    A journal checks that a kept shard is the file this run wrote, not that nobody forged it: a
    checksum at ~3 GB/s on one core costs a merge nothing measurable, where sha256 (0.25–0.5 GB/s
    here) added seconds of CPU per GB written (docs/merge.md, "Resuming a long merge")."""
    return zlib.crc32(data, running)


def combine_digests(header: bytes, tensor_digests: Sequence[int]) -> str:
    """A shard's digest: sha256 over its header and the CRC-32 of each tensor's bytes, in file
    order. It covers every byte of the file, and the writer can compute it while tensors arrive in
    any order; io/journal.py recomputes it from the file to check a shard."""
    combined = hashlib.sha256(b"lorasurgery-shard-digest-2\n")
    combined.update(hashlib.sha256(header).digest())
    for digest in tensor_digests:
        combined.update(digest.to_bytes(4, "big"))
    return combined.hexdigest()


@dataclass
class _Slot:
    spec: TensorSpec
    file_index: int
    offset: int  # absolute offset in the shard file
    written: bool = False


@dataclass
class WriteSummary:
    files: list[Path] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0  # tensor bytes written (as index.json's total_size)


def _raw_bytes(tensor) -> memoryview:
    """A tensor's bytes as written: on the CPU, contiguous, flat (a view when it already is)."""
    import torch

    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(data.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Writes planned shards into `folder`; use as a context manager, or call close()/abort()."""

    def __init__(
        self,
        folder: str | os.PathLike,
        shards: list[list[TensorSpec]],
        *,
        stem: str = "model",
        metadata: dict[str, str] | None = None,
        complete: frozenset[int] = frozenset(),
        on_shard=None,
    ):
        """`complete`: indices of shards already whole in `folder` (a resumed run): left untouched,
        their tensors count as written. `on_shard(index, name, size, digest)` is called once a shard's
        last tensor is written and the file fsynced; the writer then hashes every tensor it writes."""
        self.folder = Path(folder)
        self.stem = stem
        self.layouts = shard_layouts(shards, stem, metadata)
        self.names = [layout.name for layout in self.layouts]
        self.slots: dict[str, _Slot] = {}
        self._files = []
        self._on_shard = on_shard
        self._remaining = [len(layout.specs) for layout in self.layouts]
        self._digests: dict[str, bytes] = {}
        try:
            for file_index, layout in enumerate(self.layouts):
                reused = file_index in complete
                handle = None if reused else open(self.folder / layout.name, "wb")
                self._files.append(handle)
                if handle is not None:
                    handle.write(layout.header)
                    handle.truncate(layout.size)  # fix the size now; data fills it in
                offset = len(layout.header)
                for spec in layout.specs:
                    self.slots[spec.name] = _Slot(spec, file_index, offset, written=reused)
                    offset += spec.nbytes
                if reused:
                    self._remaining[file_index] = 0
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _slot(self, name: str) -> _Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise OutputError(f"internal error: tensor {name!r} was not planned for the output")
        if slot.written:
            raise OutputError(f"internal error: tensor {name!r} written twice")
        return slot

    def digest(self, tensor) -> int | None:
        """The CRC-32 of the bytes `write` stores for `tensor` (a CPU tensor), or None when this
        writer reports no shards. Callers compute it in their own threads (merge: the merging
        threads), so that the one writing thread only writes."""
        if self._on_shard is None:
            return None
        return tensor_digest(_raw_bytes(tensor))

    def write(self, name: str, tensor, digest: int | None = None) -> None:
        """Write `tensor` (any device; its dtype and shape must match the plan); `digest`, from
        `digest(tensor)`, saves hashing it here."""
        slot = self._slot(name)
        spec = slot.spec
        if dtype_code_of(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise OutputError(
                f"internal error: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {spec.dtype} {spec.shape}"
            )
        raw = _raw_bytes(tensor)
        if len(raw):
            handle = self._files[slot.file_index]
            handle.seek(slot.offset)
            handle.write(raw)
        if self._on_shard is not None:
            self._digests[name] = tensor_digest(raw) if digest is None else digest
        self._written(slot)

    def copy_raw(self, name: str, source: TensorInfo) -> None:
        """Copy a tensor's bytes unchanged from a safetensors source (byte-identical output)."""
        slot = self._slot(name)
        if (source.dtype, tuple(source.shape)) != (slot.spec.dtype, slot.spec.shape) or source.start < 0:
            raise OutputError(f"internal error: tensor {name!r} cannot be copied raw from {source.file}")
        handle = self._files[slot.file_index]
        handle.seek(slot.offset)
        remaining, position = source.nbytes, source.start
        digest = 0
        with open(source.file, "rb", buffering=0) as src:
            src.seek(position)
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise OutputError(f"{source.file}: file ended early while copying {name!r}")
                handle.write(chunk)
                if self._on_shard is not None:
                    digest = tensor_digest(chunk, digest)
                remaining -= len(chunk)
        if self._on_shard is not None:
            self._digests[name] = digest
        self._written(slot)

    def _written(self, slot: _Slot) -> None:
        slot.written = True
        index = slot.file_index
        self._remaining[index] -= 1
        if self._remaining[index] == 0 and self._on_shard is not None:
            self._finish_shard(index)

    def _finish_shard(self, index: int) -> None:
        """The shard is whole: make it durable, then report it (a journal records it only now)."""
        handle, layout = self._files[index], self.layouts[index]
        handle.flush()
        os.fsync(handle.fileno())
        digests = [self._digests.pop(spec.name, 0) for spec in layout.specs]  # 0: an empty tensor's
        self._on_shard(index, layout.name, layout.size, combine_digests(layout.header, digests))

    def close(self) -> WriteSummary:
        """Finish: every planned tensor must have been written. Writes the index when sharded."""
        missing = [name for name, slot in self.slots.items() if not slot.written]
        if missing:
            self.abort()
            raise OutputError(
                f"internal error: {len(missing)} tensors were never written, e.g. {missing[0]!r}"
            )
        for handle in self._files:
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
        files = [self.folder / n for n in self.names]
        total = sum(slot.spec.nbytes for slot in self.slots.values())
        if len(files) > 1:
            weight_map = {name: self.names[slot.file_index] for name, slot in sorted(self.slots.items())}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(self.folder / f"{self.stem}.safetensors.index.json", "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        self._files = []
        return WriteSummary(files=files, tensors=len(self.slots), bytes=total)

    def abort(self) -> None:
        """Close files without finishing; the caller's temporary folder is then removed."""
        for handle in self._files:
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
        self._files = []


def save_tensors(
    folder: str | os.PathLike, tensors: dict, *, stem: str = "model", metadata=None
) -> WriteSummary:
    """Write a small dict of tensors as one safetensors file (adapters, tests)."""
    specs = [TensorSpec(n, dtype_code_of(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    writer = SafetensorsWriter(folder, [specs], stem=stem, metadata=metadata)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
