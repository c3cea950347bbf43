"""The journal of a resumable run: which output shards are complete, and of which run they are.

A run that writes shards keeps `.lorasurgery-journal.json` in its work folder (the hidden temporary
folder of io/output.py, beside OUT). It holds the run's identity (everything that decides the output
bytes: the tool's and torch's versions, every input file's name, size and mtime, the options, and
the planned header of every shard) and, for each shard whose last byte is written and fsynced, its
name, size and digest (io/writer.py: `combine_digests`). It is rewritten atomically (temporary
file, fsync, rename, fsync of the folder) after each shard, so a kill at any moment leaves either
the previous journal or the next one, and a journaled shard is on disk whole.

A run started with --resume adopts the leftover folder (io/output.py), and `resume_work` keeps each
journaled shard whose file still has its size and digest; every other file is removed and
recomputed. A journal of a different run is refused, naming what differs: never two runs' shards
in one output (docs/design.md §7).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorasurgery.errors import OutputError
from lorasurgery.io.writer import ShardLayout, combine_digests, tensor_digest

JOURNAL_NAME = ".lorasurgery-journal.json"
_FORMAT = 1
_READ_CHUNK = 1 << 24  # 16 MiB


def file_fingerprints(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """[size, mtime in ns] of each regular file, and of every file directly inside a folder given:
    the cheap test that make and rsync use for "this input has not changed"."""
    found: dict[str, list[int]] = {}
    for given in paths:
        path = Path(given)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                stat = file.stat()
                found[str(file.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return found


def run_identity(
    *, inputs: Iterable[str | os.PathLike], options: dict, layouts: Sequence[ShardLayout]
) -> dict:
    """Everything that decides a run's output bytes, as plain JSON-able data (compared part by part)."""
    import torch

    headers = hashlib.sha256()
    for layout in layouts:
        headers.update(layout.name.encode() + b"\0" + layout.header)
    return {
        "lorasurgery": _version(),
        "torch": torch.__version__,
        "inputs": file_fingerprints(inputs),
        "options": json.loads(json.dumps(options, default=str)),  # paths and tuples as JSON has them
        "shards": [len(layouts), headers.hexdigest()],
    }


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two identities, in words a user can act on."""
    said = []
    for key in ("lorasurgery", "torch"):
        if old.get(key) != new.get(key):
            said.append(f"{key} {old.get(key)} then, {new.get(key)} now")
    old_options, new_options = old.get("options", {}), new.get("options", {})
    for key in sorted(set(old_options) | set(new_options)):
        if old_options.get(key) != new_options.get(key):
            option = "--" + key.replace("_", "-")
            said.append(f"{option} was {_shown(old_options.get(key))}, is now {_shown(new_options.get(key))}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(old_inputs) | set(new_inputs)):
        if path not in new_inputs:
            said.append(f"input {path} is gone")
        elif path not in old_inputs:
            said.append(f"input {path} is new")
        elif old_inputs[path] != new_inputs[path]:
            said.append(f"input {path} has changed (size or modification time)")
    if not said and old.get("shards") != new.get("shards"):
        said.append("the planned output shards differ")
    return said or ["the journal is of another run"]


def _shown(value) -> str:
    return "not given" if value is None else repr(value)


def shard_digest(path: Path, layout: ShardLayout) -> str | None:
    """The digest of the file at `path` read as `layout` (None when its header is not the planned one)."""
    with open(path, "rb", buffering=0) as f:
        if f.read(len(layout.header)) != layout.header:
            return None
        digests = []
        for spec in layout.specs:
            digest, remaining = 0, spec.nbytes
            while remaining:
                chunk = f.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    return None
                digest = tensor_digest(chunk, digest)
                remaining -= len(chunk)
            digests.append(digest)
    return combine_digests(layout.header, digests)


@dataclass
class Journal:
    """The journal file of one work folder; `record` adds a completed shard durably."""

    folder: Path
    identity: dict
    shards: dict[str, dict] = field(default_factory=dict)  # name -> {"size": …, "digest": …}

    @property
    def path(self) -> Path:
        return self.folder / JOURNAL_NAME

    @classmethod
    def read(cls, folder: Path) -> Journal | None:
        """The journal in `folder`, or None when there is none or it is unreadable (then: start over)."""
        try:
            data = json.loads((folder / JOURNAL_NAME).read_text(encoding="utf-8"))
            identity, shards = data["identity"], data["shards"]
            if data.get("format") != _FORMAT or not isinstance(identity, dict):
                return None
            return cls(folder, identity, {k: v for k, v in shards.items() if isinstance(v, dict)})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def record(self, name: str, size: int, digest: str) -> None:
        self.shards[name] = {"size": size, "digest": digest}
        self.save()

    def on_shard(self, index: int, name: str, size: int, digest: str) -> None:
        """The writer's callback for a shard written whole and fsynced."""
        self.record(name, size, digest)

    def save(self) -> None:
        """Write the journal beside its final name, fsync it, rename it into place, fsync the folder."""
        data = {"format": _FORMAT, "identity": self.identity, "shards": self.shards}
        temp = self.path.with_name(f"{JOURNAL_NAME}.tmp")
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        _fsync_folder(self.folder)

    def remove(self) -> None:
        """Before the work folder becomes OUT: the journal is no part of the output."""
        self.path.unlink(missing_ok=True)


@dataclass
class Resumed:
    """What a --resume found in its work folder."""

    journal: Journal
    complete: frozenset[int]  # shard indices kept as they are
    rejected: list[str]  # journaled shards whose file failed the check (recomputed)
    found: bool  # a journal of this run was there (else: nothing to resume, started afresh)


def resume_work(folder: Path, identity: dict, layouts: Sequence[ShardLayout], *, out: Path) -> Resumed:
    """Keep the journaled shards of `folder` that pass the check; clear everything else in it.

    Raises OutputError when the journal belongs to another run (options, inputs or version differ);
    the folder is then left as it is, for a resume with the right arguments or a run without
    --resume that starts over."""
    journal = Journal.read(folder)
    if journal is not None and journal.identity != identity:
        what = "; ".join(differences(journal.identity, identity))
        raise OutputError(
            f"--resume: the unfinished output for {out} ({folder.name}) is of another run: {what}. "
            f"Give the same inputs and options to resume it, or run without --resume to start over"
        )
    found = journal is not None
    journal = journal or Journal(folder, identity)
    complete, rejected, kept = set(), [], {JOURNAL_NAME}
    for index, layout in enumerate(layouts):
        entry = journal.shards.get(layout.name)
        if entry is None:
            continue
        path = folder / layout.name
        ok = (
            path.is_file()
            and not path.is_symlink()
            and path.stat().st_size == entry.get("size") == layout.size
            and shard_digest(path, layout) == entry.get("digest")
        )
        if ok:
            complete.add(index)
            kept.add(layout.name)
        else:
            rejected.append(layout.name)
            del journal.shards[layout.name]
    for entry in list(folder.iterdir()):  # partial shards, an index, a config: all rewritten
        if entry.name not in kept:
            entry.unlink() if entry.is_file() or entry.is_symlink() else _remove_tree(entry)
    journal.shards = {name: journal.shards[name] for name in kept if name in journal.shards}
    journal.save()
    return Resumed(journal, frozenset(complete), rejected, found)


def _version() -> str:
    """The installed lorasurgery's version (the package's own attribute is a layer above io)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorasurgery")
    except PackageNotFoundError:
        return "unknown"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
