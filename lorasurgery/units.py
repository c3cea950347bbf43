"""Parsing of human sizes: byte sizes (`5GB`, `500MB`) and counts (`20M`, `1.5k`)."""

from __future__ import annotations

import re

from lorasurgery.errors import LoraSurgeryError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?)(b?)\s*$", re.IGNORECASE)
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _parse(text: str, what: str) -> int:
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() == "i":
        raise LoraSurgeryError(f"cannot parse {what} {text!r} (examples: 5GB, 500MB, 20M, 1.5k)")
    number, unit = float(m.group(1)), m.group(2).lower()
    factor = _BINARY[unit] if unit.endswith("i") else _DECIMAL[unit]
    value = int(round(number * factor))
    if value <= 0:
        raise LoraSurgeryError(f"{what} must be positive, got {text!r}")
    return value


def parse_bytes(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; GiB, MiB are binary)."""
    return _parse(text, "size")


def parse_count(text: str) -> int:
    """'20M' -> 20_000_000; a parameter count for --budget."""
    return _parse(text, "count")


def format_bytes(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"
