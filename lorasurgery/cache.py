"""Where lorasurgery keeps what it can compute again: $LORASURGERY_CACHE, else
$XDG_CACHE_HOME/lorasurgery (~/.cache/lorasurgery); LORASURGERY_CACHE="" keeps nothing.

Two things live there, each in a folder of its own: the model skeletons' summaries (`structure/`,
model/skeleton.py) and the compiled kernels (`native/`, native/build.py). Deleting it costs only
the time to make them again.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder(part: str) -> Path | None:
    """The folder `part` of the cache (not created), or None when caching is off."""
    value = os.environ.get("LORASURGERY_CACHE")
    if value == "":
        return None
    if value:
        return Path(value) / part
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorasurgery" / part
