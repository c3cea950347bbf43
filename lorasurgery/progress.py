"""Progress reporting from the core: a callback that receives Progress events.

The core never prints; the CLI passes a callback that drives a rich progress bar on stderr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    stage: str  # "merge", "extract", "rank-report", ...
    done: int  # items finished so far
    total: int  # items in all (0 when unknown)
    item: str = ""  # the tensor or module just finished
    bytes_done: int = 0
    bytes_total: int = 0


ProgressCallback = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """The default callback: ignore progress."""
