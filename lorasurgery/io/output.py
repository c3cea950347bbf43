"""Atomic output folders: everything is written to a hidden temporary folder beside OUT, which is
renamed to OUT only when complete.

An interrupted run (exception, Ctrl-C, SIGTERM turned into KeyboardInterrupt by the CLI, disk full)
removes its temporary folder; a SIGKILLed run leaves one behind, hidden, which the next run for the
same OUT removes once its owner process is gone. OUT is never an input or inside one, and never
contains one: `--force` must not delete what is being read.

A resumable run (`resume=True`, merge's --resume; docs/design.md §7) instead adopts the newest such
leftover as its own work folder (renamed to its own name, so that one run only can take it), and
keeps its folder when it fails or is interrupted, naming it on the exception (`kept_work`) so the
command line can say where the work is and how to continue it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lorasurgery.errors import OutputError

_TEMP_MARK = ".lorasurgery-tmp-"
_ACTIVE: set[Path] = set()  # this process's folders being written now (the others are leftovers)


def _temp_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}{re.escape(_TEMP_MARK)}(\d+)-[0-9a-f]+$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_over(entry: Path, pid: int) -> bool:
    """A temporary folder no run is writing: its process is gone, or it is this process's and was
    kept by a failed resumable run (a library caller may run again in the same process)."""
    if pid == os.getpid():
        return entry not in _ACTIVE
    return not _process_alive(pid)


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove temporary folders for `out` left by runs that were killed."""
    removed = []
    pattern = _temp_pattern(out)
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match and _left_over(entry, int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def adopt_stale_temp_dir(out: Path, temp: Path) -> Path | None:
    """Rename the newest leftover folder of a dead run for `out` to `temp`; remove the older ones."""
    pattern = _temp_pattern(out)
    if not out.parent.is_dir():
        return None
    stale = []
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and _left_over(entry, int(match.group(1))):
            stale.append((entry.stat().st_mtime_ns, entry))
    for _, entry in sorted(stale, reverse=True):
        try:
            os.rename(entry, temp)  # atomic: of two runs resuming at once, one gets it
        except FileNotFoundError:
            continue
        remove_stale_temp_dirs(out)
        return entry
    return None


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool) -> Path:
    """Refuse an OUT that is, lies inside, or contains an input; or exists without --force."""
    out = Path(out)
    resolved = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if resolved.is_relative_to(source):  # equal to it, or inside a folder input
            raise OutputError(f"output {out} is inside the input {given}; choose a folder elsewhere")
        if source.is_relative_to(resolved):
            raise OutputError(f"output {out} contains the input {given}; choose a folder elsewhere")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder")
    return out


@contextmanager
def atomic_output_dir(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    resume: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes `out`, on failure it vanishes.

    With `resume`, the folder yielded is a dead run's leftover when there is one (its contents are
    the caller's to check), and on failure it stays, named on the exception as `kept_work`."""
    out = check_output_path(out, inputs, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    if not resume:
        remove_stale_temp_dirs(out)
    _ACTIVE.add(temp)
    try:  # mkdir inside: an interrupt landing just after it must still remove the folder
        if not (resume and adopt_stale_temp_dir(out, temp)):
            temp.mkdir()
        yield temp
        if out.exists():  # --force: move the old folder aside first, remove it last
            old = out.parent / f".{out.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
            os.rename(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, out)
    except BaseException as error:
        if resume and temp.is_dir():
            try:
                error.kept_work = temp
            except AttributeError:  # an exception type without a __dict__: the folder still stays
                pass
            raise
        for _ in range(3):  # a file still being closed elsewhere can make one pass fall short
            shutil.rmtree(temp, ignore_errors=True)
            if not temp.exists():
                break
        raise
    finally:
        _ACTIVE.discard(temp)


def copy_side_files(source_folder: Path, dest: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files (config, tokenizer, …) that exist in `source_folder`; return their names."""
    copied = []
    for name in names:
        src = source_folder / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, dest / name)
            copied.append(name)
    return copied


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a report file beside its final name, then rename it into place: never half a report."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)
