"""Rendering for the command line: rich tables on stdout, progress bars on stderr, JSON.

The library returns plain dataclasses; this module turns them into what a person (or a pipe)
reads. Shared helpers come first; each command's renderer follows.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lorasurgery.progress import Progress as ProgressEvent
from lorasurgery.progress import ProgressCallback, no_progress

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False)


def print_json(value: object) -> None:
    """JSON on stdout, alone, indented; safe to pipe."""
    stdout.out(json.dumps(value, indent=2, ensure_ascii=False), highlight=False)


def note(message: str, quiet: bool = False) -> None:
    """A log line on stderr (silenced by --quiet)."""
    if not quiet:
        stderr.print(message)


@contextmanager
def progress_bar(description: str, quiet: bool = False) -> Iterator[ProgressCallback]:
    """A ProgressCallback driving a rich bar on stderr; a no-op when quiet or not a terminal."""
    if quiet or not stderr.is_terminal:
        yield no_progress
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[item]}", style="dim"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
    task = bar.add_task(description, total=None, item="")

    def update(event: ProgressEvent) -> None:
        bar.update(task, completed=event.done, total=event.total or None, item=event.item[-48:])

    with bar:
        yield update


def format_number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def spread(values: list[float]) -> str:
    """'mean (min–max)' of a column, or the single value."""
    if not values:
        return "—"
    if min(values) == max(values):
        return format_number(values[0])
    return f"{format_number(statistics.fmean(values))} ({format_number(min(values))}–{format_number(max(values))})"


def new_table(title: str | None = None) -> Table:
    return Table(title=title, title_justify="left", show_edge=False, header_style="bold")
