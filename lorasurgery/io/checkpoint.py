"""A model checkpoint as a header-only index of its tensors, read one tensor at a time.

Accepted inputs: a folder with `model.safetensors`, or `model.safetensors.index.json` plus shards,
or `pytorch_model.bin` (and its index); or one `.safetensors` / `.bin` file. Opening reads only
headers (validated in full); `read` then copies one tensor's bytes with plain reads into fresh
memory. No mmap: touched mmap pages count towards RSS and keep a whole file resident, while a read
leaves only the tensor. Pickle files go through `torch.load(weights_only=True)` and nothing else.

Opening also recognises a quantized checkpoint (io.quantization, docs/design.md §13), so that no
command reads codes as weights. One whose format has a dequantizing reader (io.readers: one module
per format) is presented as the model sees it: `tensors` lists the logical tensors, each
quantized one a DequantizedInfo (dtype F32, no byte range of its own), the scales hidden, and
`read` returns it dequantized in float32 — the exact product of codes and scales, rounded nowhere
else, so a merge adds ΔW to it and rounds once. Plain tensors read as stored, byte for byte.
`raw` (or `open_checkpoint(raw=True)`) is the stored layer: codes and scales as they are, for what
copies bytes or checks them itself. Every other quantized format is refused by name at open.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import lorasurgery.io.readers as readers
from lorasurgery.errors import CheckpointError, UnsupportedError
from lorasurgery.io.quantization import SIDE_CONFIGS, DequantizedInfo, recognise, refusal
from lorasurgery.io.safetensors_format import (
    TensorInfo,
    dtype_code_of,
    read_safetensors_header,
    torch_dtype_of,
)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_READ_CHUNK = 1 << 26  # 64 MiB per read call: large enough to be fast, small enough to interrupt


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed {what} ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: malformed {what} (not a JSON object)")
    return value


class Checkpoint:
    """Names, shapes, dtypes and locations of a checkpoint's tensors; reads them one at a time."""

    def __init__(self, path: Path, folder: Path, files: list[Path], tensors: dict[str, TensorInfo]):
        self.path = path  # what the user named
        self.folder = folder  # where config.json and the shards live
        self.files = files  # weight files, in shard order
        self.stored = tensors  # every stored tensor, codes and scales included
        self.tensors = tensors  # what commands see: the logical tensors once `dequantize_index` ran
        self.config = self._read_config()
        # What makes it quantized (None: plain); its reader presents it dequantized (`dequantize_index`).
        self.quantization = recognise(self.config, tensors, self._read_side_configs())
        self._pickle_cache: tuple[Path, dict] | None = None  # the one .bin shard kept loaded

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors in {len(self.files)} files)"

    @property
    def dequantizes(self) -> bool:
        """Whether `tensors` holds logical tensors decoded from codes (a quantized checkpoint)."""
        return self.tensors is not self.stored

    @property
    def raw(self) -> Checkpoint:
        """The stored layer: the same checkpoint with its stored tensors (codes and scales) as they are."""
        if not self.dequantizes:
            return self
        raw = copy.copy(self)
        raw.tensors = self.stored
        raw._pickle_cache = None
        return raw

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shard_groups(self) -> list[list[str]]:
        """Tensor names grouped by the file that holds them, in file order."""
        groups: dict[Path, list[str]] = {f: [] for f in self.files}
        for info in self.tensors.values():
            groups[info.file].append(info.name)
        return [names for names in groups.values() if names]

    def _read_config(self) -> dict | None:
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            return None
        return read_json(config_path, "config.json")

    def _read_side_configs(self) -> dict[str, dict]:
        """{name: JSON} of the quantization side files present (an old GPTQ/AWQ repo's)."""
        found = {}
        for name in SIDE_CONFIGS:
            if (self.folder / name).is_file():
                try:
                    found[name] = read_json(self.folder / name, name)
                except CheckpointError:
                    found[name] = {}  # its presence says enough
        return found

    def refuse_quantized(self) -> None:
        """UnsupportedError when the checkpoint is quantized in a format lorasurgery cannot read."""
        q = self.quantization
        if q is None or q.readable:
            return
        declared_in = q.source if q.source in SIDE_CONFIGS else "config.json"  # named when no tensor shows it
        raise refusal(q, self.stored, self.folder / declared_in)

    def dequantize_index(self) -> None:
        """Present a quantized checkpoint of a readable format as its logical tensors (the layout
        checked on the headers: CheckpointError naming the file and tensor when it is broken)."""
        if self.quantization is not None and not self.dequantizes:
            self.tensors = readers.logical_index(self.stored, self.quantization, self.config, self.folder)

    def read(self, name: str, device: str = "cpu"):
        """Tensor `name` in memory of its own (never a view of the file): a stored tensor in its
        stored dtype, a logical one of a quantized checkpoint dequantized in float32 (on `device`)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        if isinstance(info, DequantizedInfo):
            return readers.dequantize(info, lambda stored: self._read_stored(stored, device))
        return self._read_stored(info, device)

    def read_encoded(self, name: str) -> Encoded | object:
        """Tensor `name` read but, if it is a quantized checkpoint's logical tensor, not yet decoded:
        an Encoded holding its codes and scales (whose `decode()` gives what `read` gives), else the
        tensor as `read` returns it. A pipeline reads with this in its reader thread and decodes in
        its compute threads, so that decoding runs on every core instead of the reader's one."""
        info = self.tensors.get(name)
        if not isinstance(info, DequantizedInfo):
            return self.read(name)
        stored = {info.codes.name: self._read_stored(info.codes, "cpu")}
        for role, part in info.parts:
            if role not in readers.STATIC_ROLES:
                stored[part.name] = self._read_stored(part, "cpu")
        return Encoded(self, info, stored)

    def _read_stored(self, info: TensorInfo, device: str):
        import torch

        if info.start < 0:
            tensor = self._pickle_tensor(info).clone()
        else:
            dtype = torch_dtype_of(info.dtype)
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
            read_range(info.file, info.start, buffer.numpy())
            tensor = buffer.view(dtype).reshape(info.shape)
        return tensor if device == "cpu" else tensor.to(device)

    def iter_tensors(self, names: Iterable[str] | None = None, device: str = "cpu") -> Iterator:
        """Yield (name, tensor) one at a time, in file order so reads stay sequential."""
        chosen = self.tensors.values() if names is None else (self.tensors[n] for n in names)
        for info in sorted(chosen, key=lambda t: (self.files.index(t.file), t.position)):
            yield info.name, self.read(info.name, device)

    def _pickle_tensor(self, info: TensorInfo):
        if self._pickle_cache is None or self._pickle_cache[0] != info.file:
            self._pickle_cache = None  # drop the previous shard before loading the next
            self._pickle_cache = (info.file, load_pickle_state_dict(info.file))
        return self._pickle_cache[1][info.name]


class Encoded:
    """A quantized checkpoint's logical tensor as stored (codes and scales in memory), to be decoded."""

    def __init__(self, checkpoint: Checkpoint, info: DequantizedInfo, stored: dict):
        self.checkpoint, self.info, self.stored = checkpoint, info, stored

    def decode(self, device: str = "cpu"):
        """The float32 tensor Checkpoint.read(name, device) returns."""
        return readers.dequantize(self.info, self.reader(device))

    def rows(self, device: str = "cpu"):
        """The tensor as io.quantization.Rows (decoded a band of rows at a time by the merge kernel),
        or None where its format decodes it whole: then `decode()`."""
        return readers.rows(self.info, self.reader(device))

    def reader(self, device: str = "cpu"):
        """read(stored TensorInfo) for this tensor's reader: the parts in memory, others from the file."""

        def read(part: TensorInfo):
            tensor = self.stored.get(part.name)
            if tensor is None:  # a part this format reads only sometimes
                return self.checkpoint._read_stored(part, device)
            return tensor if device == "cpu" else tensor.to(device)

        return read


def read_range(path: Path, start: int, out) -> None:
    """Fill the writable buffer `out` with the bytes of `path` from `start` on."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        done = 0
        while done < len(view):
            n = f.readinto(view[done : done + _READ_CHUNK])
            if not n:
                raise CheckpointError(f"{path}: file ended early (was it truncated while reading?)")
            done += n
        _drop_page_cache(f.fileno(), start, len(view))


def _drop_page_cache(fd: int, start: int, length: int) -> None:
    # Streaming a checkpoint larger than RAM should not evict everything else from the cache.
    if hasattr(os, "posix_fadvise") and length:
        try:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def load_pickle_state_dict(path: Path) -> dict:
    """A state dict from a .bin file through torch.load(weights_only=True); never plain unpickling."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: cannot be loaded safely as a PyTorch state dict ({first_line})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return state


def _index_pickle_file(path: Path) -> dict[str, TensorInfo]:
    state = load_pickle_state_dict(path)
    return {
        name: TensorInfo(name, dtype_code_of(t.dtype), tuple(t.shape), path, -1, -1)
        for name, t in state.items()
    }


def _index_file(path: Path) -> dict[str, TensorInfo]:
    if path.suffix == ".bin":
        return _index_pickle_file(path)
    return read_safetensors_header(path).tensors


def _shard_path(folder: Path, index_path: Path, shard_name: object) -> Path:
    """A shard named by an index, confined to the index's folder."""
    if (
        not isinstance(shard_name, str)
        or not shard_name
        or shard_name != os.path.basename(shard_name)
        or "\\" in shard_name
        or "\x00" in shard_name
        or shard_name in (".", "..")
    ):
        raise CheckpointError(
            f"{index_path}: shard name {shard_name!r} is not a plain file name inside the folder"
        )
    path = folder / shard_name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index_path}: shard {shard_name!r} points outside the folder")
    if not path.is_file():
        raise CheckpointError(f"{index_path}: shard {shard_name!r} does not exist")
    return path


def _open_index(index_path: Path) -> Checkpoint:
    folder = index_path.parent
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: malformed index (no weight_map)")
    files: list[Path] = []
    for shard_name in weight_map.values():  # validated before use as a key: it may be any JSON
        path = _shard_path(folder, index_path, shard_name)
        if path not in files:
            files.append(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in _index_file(file).items():
            if name in tensors:
                raise CheckpointError(f"{index_path}: tensor {name!r} is stored in two shards")
            tensors[name] = info
    for name, shard_name in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard_name:
            raise CheckpointError(f"{index_path}: tensor {name!r} is not in its shard {shard_name!r}")
    return Checkpoint(index_path, folder, files, tensors)


def open_checkpoint(path: str | os.PathLike, *, raw: bool = False) -> Checkpoint:
    """Index the checkpoint at `path` (folder or file) from its headers alone.

    A quantized checkpoint of a readable format is presented dequantized (`Checkpoint.tensors` its
    logical tensors, `read` float32); any other is refused by name (UnsupportedError, docs/design.md
    §13). With `raw` its stored tensors are served as they are (codes and scales), never to be read
    as weights."""
    checkpoint = _open(Path(path))
    if not raw:
        checkpoint.refuse_quantized()
        checkpoint.dequantize_index()
    return checkpoint


def _open(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        candidates = (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX)
        found = next((path / c for c in candidates if (path / c).is_file()), None)
        if found is None:
            gguf = sorted(path.glob("*.gguf"))
            if gguf:
                raise _gguf_refusal(gguf[0])
            if (path / "adapter_config.json").is_file():
                raise CheckpointError(f"{path}: is a PEFT adapter folder, expected a model checkpoint")
            raise CheckpointError(f"{path}: no {', '.join(candidates)} in this folder")
        if found.name.endswith(".index.json"):
            return _open_index(found)
        return Checkpoint(path, path, [found], _index_file(found))
    if path.name.endswith(".index.json"):
        return _open_index(path)
    if path.suffix in (".safetensors", ".bin"):
        return Checkpoint(path, path.parent, [path], _index_file(path))
    if path.suffix == ".gguf":
        raise _gguf_refusal(path)
    raise CheckpointError(f"{path}: not a checkpoint (expected a model folder, .safetensors or .bin file)")


def _gguf_refusal(path: Path) -> UnsupportedError:
    return UnsupportedError(
        f"{path}: is a GGUF file (llama.cpp's format, quantized block by block); lorasurgery reads "
        f"safetensors and .bin checkpoints and does not read GGUF bases yet — give it the model's "
        f"Hugging Face folder (docs/design.md §13)"
    )
