"""Building and loading the compiled kernels: small C sources built on first use by the machine's C
compiler (docs/design.md §13, "Native kernels").

torch on a CPU runs each elementwise step as its own pass over memory; `merge --requantize` makes
about seven such passes per element (decode, block amax, divide, encode, decode again, retention
sums, changed-code count), and that is what kept it slower than SPEC's 1.3× of a bf16 merge. A C
loop does them in two passes. The kernels compute bit for bit what the torch code beside them
computes (tests/test_native.py compares the two on every code and on random data), so a machine
without a compiler gets the same bytes, only slower.

`library("fp8", signatures, check)` compiles `fp8.c` once per source version into the cache folder
($LORASURGERY_CACHE/native, else ~/.cache/lorasurgery/native; a temporary folder when
LORASURGERY_CACHE is ""), loads it with ctypes (which releases the GIL during each call, so the
merge's threads run them side by side), declares its functions' C signatures, runs `check` on it
(the kernels against torch) and returns it — or None when there is no compiler, the build fails, the
check fails, or LORASURGERY_NATIVE=0. Callers fall back to torch then. A cached library that does
not load (a truncated file) is built again once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from lorasurgery.cache import cache_folder

_HERE = Path(__file__).resolve().parent
# No -ffast-math, and no contraction into fused multiply-adds: the kernels must round as torch does.
_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}
_WHY: dict[str, str] = {}


def library(name: str, signatures: dict, check: Callable[[object], bool]):
    """The loaded kernels of `<name>.c`, or None (see the module docstring; `why_not(name)` says
    why). `signatures`: {function: (restype, argtypes)}; `check(lib)`: whether they agree with torch."""
    with _LOCK:
        if name not in _LOADED:
            try:
                _LOADED[name] = _load(name, signatures, check)
            except _Unavailable as reason:
                _LOADED[name], _WHY[name] = None, str(reason)
        return _LOADED[name]


def why_not(name: str) -> str | None:
    """Why `library(name)` is None (after a call to it), else None."""
    return _WHY.get(name)


class _Unavailable(Exception):
    pass


def _load(name: str, signatures: dict, check: Callable[[object], bool]):
    if os.environ.get("LORASURGERY_NATIVE", "1") == "0":
        raise _Unavailable("LORASURGERY_NATIVE=0")
    source = _HERE / f"{name}.c"
    compiler = _compiler()
    key = hashlib.sha256(source.read_bytes() + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    lib = _cached(name, key, compiler, source, signatures)
    if lib is None:  # no cache, or one that cannot be written: built for this process only
        with tempfile.TemporaryDirectory() as scratch:  # the loaded library outlives its file
            lib = _open(_build(compiler, source, Path(scratch) / f"{name}.so"), signatures)
    if not check(lib):
        raise _Unavailable(f"the compiled {name} kernels disagree with torch on this machine")
    return lib


def _cached(name: str, key: str, compiler: str, source: Path, signatures: dict):
    """The library from the cache folder, built there first if it is not there or does not load;
    None when there is no cache or its folder cannot be written."""
    folder = cache_folder("native")
    if folder is None:
        return None
    target = folder / f"{name}-{key}.so"
    try:
        if target.is_file():
            return _open(target, signatures)
    except _Unavailable:
        pass  # a damaged file: built again
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    return _open(_build(compiler, source, target), signatures)


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        program = (candidate or "").split()
        if program and shutil.which(program[0]):
            return program[0]
    raise _Unavailable("no C compiler found (set CC)")


def _build(compiler: str, source: Path, target: Path) -> Path:
    """Compile into a temporary name beside `target`, then rename: a concurrent build or a killed one
    never leaves a half-written library under the name that is loaded."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    attempts = ([], ["-DLS_NO_CLONES"])  # without per-instruction-set clones where they do not build
    try:
        for extra in attempts:
            done = subprocess.run(
                [compiler, *_FLAGS, *extra, "-o", str(partial), str(source)],
                capture_output=True,
                text=True,
                check=False,
                timeout=300,
            )
            if done.returncode == 0:
                os.replace(partial, target)
                return target
        raise _Unavailable(f"{compiler} could not build {source.name}: {done.stderr.strip()[:500]}")
    except (OSError, subprocess.SubprocessError) as error:  # not writable, not runnable, hung
        raise _Unavailable(f"{compiler} could not build {source.name}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)


def _open(path: Path, signatures: dict):
    try:
        lib = ctypes.CDLL(str(path))
        for function, (result, arguments) in signatures.items():
            getattr(lib, function).restype = result
            getattr(lib, function).argtypes = arguments
    except (OSError, AttributeError) as error:
        raise _Unavailable(f"{path} could not be loaded: {error}") from error
    return lib
