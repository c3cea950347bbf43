"""Rendering for the command line: rich tables on stdout, progress bars on stderr, JSON.

The library returns plain dataclasses; this module turns them into what a person (or a pipe)
reads. Shared helpers come first; each command's renderer follows.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lorasurgery.io.output import write_text_atomically
from lorasurgery.progress import Progress as ProgressEvent
from lorasurgery.progress import ProgressCallback, no_progress


def _pipe_width() -> int | None:
    """Rich assumes 80 columns when stdout is not a terminal; tables piped to files need more."""
    if sys.stdout.isatty():
        return None
    try:
        return max(int(os.environ.get("COLUMNS", "")), 80)
    except ValueError:
        return 120


stdout = Console(highlight=False, width=_pipe_width())
stderr = Console(stderr=True, highlight=False)


def print_json(value: object) -> None:
    """JSON on stdout, alone, indented; safe to pipe."""
    stdout.out(json.dumps(value, indent=2, ensure_ascii=False), highlight=False)


def note(message: str, quiet: bool = False) -> None:
    """A log line on stderr (silenced by --quiet)."""
    if not quiet:
        stderr.print(message)


def _bar(*columns) -> Progress:
    """A transient rich bar on stderr: the stage's name, the bar, then `columns`."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *columns, console=stderr, transient=True
    )


@contextmanager
def progress_bar(description: str, quiet: bool = False) -> Iterator[ProgressCallback]:
    """A ProgressCallback driving a rich bar on stderr; a no-op when quiet or not a terminal."""
    if quiet or not stderr.is_terminal:
        yield no_progress
        return
    bar = _bar(MofNCompleteColumn(), TextColumn("{task.fields[item]}", style="dim"), TimeRemainingColumn())
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


def add_module_column(table: Table, modules) -> None:
    """A "module" column that keeps every name whole on a narrow terminal (the other headers wrap)."""
    table.add_column("module", no_wrap=True, min_width=max((len(m.name) for m in modules), default=6))


# --------------------------------------------------------------------------------------------------
# inspect


def _module_type(name: str, kind: str) -> str:
    from lorasurgery.model import leaf

    if kind in ("replaced", "tokens"):  # a saved tensor: keep its parameter name (lm_head.weight)
        return ".".join(p for p in name.split(".")[-2:] if not p.isdigit())
    return leaf(name)


def _distinct(values) -> str:
    values = sorted({v for v in values if v is not None}, key=float)
    return ", ".join(format_number(v) for v in values) or "—"


def inspect_report(report, as_json: bool = False, show_all: bool = False, quiet: bool = False) -> None:
    if as_json:
        print_json(report.to_json())
        return
    with_base = report.base is not None
    table = new_table(f"{report.path} — {report.peft_type} adapter, {report.totals['modules']} LoRA modules")
    for column in (
        "module" if show_all else "module type",
        "kind",
        "" if show_all else "count",
        "r",
        "alpha",
        "scale",
    ):
        if column:
            left = column in ("module", "module type", "kind")
            table.add_column(column, justify="left" if left else "right", no_wrap=True)
    table.add_column("dora", min_width=4)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("‖ΔW‖_F", justify="right", no_wrap=True)
    if with_base:
        table.add_column("‖ΔW‖/‖W‖", justify="right", no_wrap=True)
    if report.requantizable:  # a quantized base: what merge --requantize would keep (docs/design.md §13)
        table.add_column("retention ρ", justify="right", no_wrap=True)
        table.add_column("codes changed", justify="right", no_wrap=True)

    if show_all:
        groups = [(m.name, [m]) for m in report.modules]
    else:
        grouped: dict[tuple[str, str], list] = {}
        for m in report.modules:
            grouped.setdefault((_module_type(m.name, m.kind), m.kind), []).append(m)
        groups = [(key[0], members) for key, members in grouped.items()]
    for label, members in groups:
        norms = [m.delta_fro_norm for m in members if m.delta_fro_norm is not None]
        row = [label, members[0].kind]
        if not show_all:
            row.append(str(len(members)))
        row += [
            _distinct(m.r for m in members),
            _distinct(m.alpha for m in members),
            _distinct(m.scale for m in members),
            "yes" if any(m.dora for m in members) else "",
            format_number(sum(m.params for m in members)),
            spread(norms),
        ]
        if with_base:
            row.append(spread([m.relative_norm for m in members if m.relative_norm is not None]))
        if report.requantizable:
            row.append(spread([m.retention for m in members if m.retention is not None]))
            changed = [100 * m.codes_changed for m in members if m.codes_changed is not None]
            row.append(f"{spread(changed)}%" if changed else "")
        table.add_row(*row)
    stdout.print(table)
    totals = report.totals
    stdout.print(
        f"total: {totals['modules']} modules, {totals['params']:,} parameters, {totals['bytes']:,} bytes"
        + (f"; base model: {report.base_model_name_or_path}" if report.base_model_name_or_path else "")
    )
    for warning in report.warnings:
        note(f"[yellow]warning:[/yellow] {warning}", quiet)


# --------------------------------------------------------------------------------------------------
# merge


@contextmanager
def merge_progress(quiet: bool = False) -> Iterator[ProgressCallback]:
    """Like progress_bar, counting tensors and bytes; shown from the first tensor on, so that a
    refusal while planning leaves stderr with the error alone."""
    if quiet or not stderr.is_terminal:
        yield no_progress
        return
    from rich.progress import DownloadColumn

    bar = _bar(
        TextColumn("{task.fields[tensors]} tensors"),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}", style="dim"),
    )
    task = None

    def update(event: ProgressEvent) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(event.stage, total=event.bytes_total or None, tensors="", item="")
        bar.update(
            task,
            description=event.stage,  # --min-retention measures ("retention") before it merges
            total=event.bytes_total or None,
            completed=event.bytes_done,
            tensors=f"{event.done}/{event.total}",
            item=event.item[-48:],
        )

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def merge_summary(summary, as_json: bool = False, quiet: bool = False) -> None:
    """The merge summary: JSON or a table on stdout; notes (tied embeddings, …) on stderr."""
    from lorasurgery.units import format_bytes

    if as_json:
        print_json(summary.to_dict())
        return
    for message in summary.notes:
        stderr.print(f"[yellow]note:[/yellow] {message}")
    table = new_table(f"merged into {summary.output}")
    for column in ("adapter", "weight", "modules", "dora", "lora biases", "tensors replaced"):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    for adapter in summary.adapters:
        table.add_row(
            adapter.path,
            f"{adapter.weight:g}",
            format_number(adapter.modules_merged),
            format_number(adapter.dora_modules),
            format_number(adapter.lora_biases),
            format_number(adapter.tensors_replaced),
        )
    stdout.print(table)
    if summary.requantize:
        stdout.print(
            retention_table(
                summary.retention,
                f"requantized (min retention {summary.min_retention:g})"
                if summary.min_retention is not None
                else "requantized",
            )
        )
    requantized = f"{summary.tensors_requantized:,} requantized, " if summary.requantize else ""
    stdout.print(
        f"{summary.tensors:,} tensors: {summary.tensors_merged:,} merged, {requantized}"
        f"{summary.tensors_replaced:,} replaced, {summary.tensors_copied:,} copied byte for byte, "
        f"{summary.tensors_converted:,} converted; {format_bytes(summary.bytes_written)} in "
        f"{len(summary.files)} file(s), {summary.seconds:.1f} s"
    )
    if summary.shards_reused:
        stdout.print(
            f"resumed: {summary.shards_reused} of {len(summary.files)} file(s) reused, not recomputed"
        )
    if summary.config_changes:
        changes = ", ".join(  # None: the key is removed (a quantized base's quantization_config)
            f"{k}: {json.dumps(v)}" if v is not None else f"{k} removed"
            for k, v in summary.config_changes.items()
        )
        stdout.print(f"config.json: {changes}")
    for assumption in summary.assumptions:  # part of what was written: on stdout, with the table
        stdout.print(f"assumed: {assumption.message()}", markup=False, soft_wrap=True)
    if summary.verified:
        stdout.print(f"verified: largest logit difference {summary.max_logit_difference:.3g}")


def retention_table(rows: list[dict], title: str) -> Table:
    """Per merged quantized module: the share of its update the requantized codes keep (ρ, docs/design.md
    §13), the share of codes that changed, and how it is (or would be) written."""
    table = new_table(title)
    for column in ("module", "retention ρ", "codes changed", "written as"):
        table.add_column(
            column, justify="left" if column in ("module", "written as") else "right", no_wrap=True
        )
    for row in rows:
        rho = row["retention"]
        table.add_row(
            row["module"],
            "—" if rho is None else f"{rho:.4f}",
            f"{100 * row['codes_changed']:.1f}%",
            row.get("written", ""),
        )
    return table


# --------------------------------------------------------------------------------------------------
# verify


def verify_report(report, as_json: bool = False, quiet: bool = False) -> None:
    """verify: one row per module type and verdict (a row per tensor that did not land), then what
    else changed, on stdout; JSON with --json."""
    if as_json:
        print_json(report.to_dict())
        return
    table = new_table(
        f"{report.artifact} ({report.artifact_kind}) against {report.base} + {', '.join(report.adapters)}"
    )
    for column in ("module type", "kind", "tensors", "verdict", "relative error", "retention ρ"):
        table.add_column(column, justify="left" if column in ("module type", "kind", "verdict") else "right")
    groups: dict[tuple, list] = {}
    for check in report.checks:
        key = (
            _module_type(check.name.removesuffix(".weight"), check.kind),
            check.kind,
            check.verdict,
        )
        groups.setdefault(key, []).append(check)
    for (module_type, kind, verdict), checks in groups.items():
        errors = [c.comparison.relative_error for c in checks if c.comparison]
        kept = [c.comparison.retention for c in checks if c.comparison]
        table.add_row(module_type, kind, format_number(len(checks)), verdict, spread(errors), spread(kept))
    stdout.print(table)
    for check in report.checks:
        if check.verdict != "landed":
            c = check.comparison
            numbers = (
                f" (relative error {format_number(c.relative_error)}, ρ {format_number(c.retention)}"
                f"{'' if c.uncertainty is None else ' ± ' + format_number(c.uncertainty)}"
                f"{'' if c.on_grid is None else ', ' + format_number(c.on_grid) + ' on its grid'}"
                f", tolerance {format_number(c.tolerance)})"
                if c
                else ""
            )
            detail = f": {check.detail}" if check.detail else ""
            stdout.print(f"{check.verdict}: {check.name}{numbers}{detail}", markup=False, soft_wrap=True)
    for changed in report.changed:
        stdout.print(
            f"changed: {changed.name} is not touched by the adapters but {changed.detail}",
            markup=False,
            soft_wrap=True,
        )
    for name in report.extra:
        stdout.print(f"extra: {name} is in the artifact but not in the base", markup=False, soft_wrap=True)
    for issue in report.config:
        label = "target" if report.target else "config"
        stdout.print(f"{label}: {issue}", markup=False, soft_wrap=True)
    if report.target:
        stdout.print(f"read by {report.target}'s rules ({report.target_rule})", markup=False, soft_wrap=True)
    for difference in report.releases:
        stdout.print(f"other releases: {difference.summary}", markup=False, soft_wrap=True)
    if report.target_release and not report.releases:
        from lorasurgery.targets import VLLM_KNOWN

        stdout.print(
            f"other releases: every vLLM release known ({VLLM_KNOWN}) computes the same", markup=False
        )
    text = report.text
    if text is not None and text.skipped:
        stdout.print(f"logits: skipped: {text.skipped}", markup=False, soft_wrap=True)
    elif text is not None:
        verdict = "within" if text.passed else "BEYOND"
        stdout.print(
            f"logits on {text.text} ({text.tokens} tokens): max |Δ| {format_number(text.max_difference)} {verdict} "
            f"the {text.dtype} tolerance {format_number(text.tolerance)}",
            markup=False,
            soft_wrap=True,
        )
    landed = sum(c.verdict == "landed" for c in report.checks)
    outcome = "everything landed" if report.landed else "did NOT land"
    stdout.print(
        f"{outcome}: {landed}/{len(report.checks)} touched tensors landed, {len(report.changed)} untouched "
        f"changed, {report.tensors_checked:,} tensors checked in {report.seconds:.1f} s",
        markup=False,
    )


# --------------------------------------------------------------------------------------------------
# extract


def extract_report(report, as_json: bool = False, quiet: bool = False) -> None:
    if as_json:
        print_json(report.to_json())
        return
    table = new_table(f"{report.output} — extracted from {report.finetuned} ({report.policy})")
    add_module_column(table, report.modules)
    table.add_column("shape", no_wrap=True)
    calibrated = any(m.data_relative_error is not None for m in report.modules)
    coded = any(m.identical_codes is not None for m in report.modules)  # a quantized pair
    columns = ("rank", "retained energy", "relative error") + (("data error",) if calibrated else ())
    for column in columns + (("same codes", "scales") if coded else ()):
        # headers wrap at spaces, never inside a word (80 columns fit them all)
        table.add_column(column, justify="right", min_width=max(map(len, column.split())))
    for m in report.modules:
        shape = "×".join(map(str, m.shape))
        row = [m.name, shape, str(m.rank), f"{m.retained_energy:.4f}", format_number(m.relative_error)]
        row += [format_number(m.data_relative_error)] if calibrated else []
        if coded:
            row += (
                ["—", "—"]
                if m.identical_codes is None
                else [f"{100 * m.identical_codes:.1f}%", "changed" if m.scales_changed else "same"]
            )
        table.add_row(*row)
    stdout.print(table)
    if report.skipped:
        # Norms and biases come one per layer: one line for all of them keeps the table readable
        # (every one is in the JSON report).
        one_d = [s for s in report.skipped if s.reason.startswith("norm or bias")]
        skipped = new_table("skipped (changed by the fine-tune, not in the adapter)")
        for column in ("name", "reason", "‖ΔW‖/‖W‖"):
            skipped.add_column(column, no_wrap=column != "reason")
        for s in report.skipped:
            if s not in one_d:
                skipped.add_row(s.name, s.reason, format_number(s.relative_norm))
        if one_d:
            largest = max(one_d, key=lambda s: s.relative_norm)
            skipped.add_row(
                f"{len(one_d)} norms/biases" if len(one_d) > 1 else one_d[0].name,
                f"1-D (--save-1d saves them); largest change: {largest.name}",
                format_number(largest.relative_norm),
            )
        stdout.print(skipped)
    totals = report.totals
    stdout.print(
        f"total: {len(report.modules)} modules, {totals['params']:,} parameters, {totals['bytes']:,} bytes, "
        f"overall relative error {format_number(totals['relative_error'])}"
        + (
            f" (data space: {format_number(totals['data_relative_error'])})"
            if "data_relative_error" in totals
            else ""
        )
        + (f"; saved in full: {', '.join(report.saved)}" if report.saved else "")
    )
    for line in report.notes:
        note(f"note: {line}", quiet)
    note(f"wrote {report.output} in {report.seconds:.1f} s", quiet)


# --------------------------------------------------------------------------------------------------
# resize / combine


def surgery_report(report, as_json: bool = False, quiet: bool = False) -> None:
    if as_json:
        print_json(report.to_json())
        return
    if report.command == "combine":
        weighted = ", ".join(f"{w:g}·{p}" for w, p in zip(report.weights, report.inputs))
        title = f"{report.output} — combined {weighted} ({report.policy})"
    else:
        title = f"{report.output} — resized from {report.inputs[0]} ({report.policy})"
    table = new_table(title)
    add_module_column(table, report.modules)
    table.add_column("shape", no_wrap=True)
    for column in ("rank in", "rank", "retained energy", "relative error"):
        table.add_column(column, justify="right")
    for m in report.modules:
        table.add_row(
            m.name,
            "×".join(map(str, m.shape)),
            str(m.original_rank),
            str(m.rank),
            f"{m.retained_energy:.4f}",
            format_number(m.relative_error),
        )
    stdout.print(table)
    if report.skipped:
        skipped = new_table("left out")
        for column in ("module", "reason", "‖ΔW‖_F"):
            skipped.add_column(column, no_wrap=column != "reason")
        for s in report.skipped:
            skipped.add_row(s.name, s.reason, format_number(s.fro_norm))
        stdout.print(skipped)
    totals = report.totals
    stdout.print(
        f"total: {len(report.modules)} modules, {totals['params']:,} parameters, {totals['bytes']:,} bytes, "
        f"overall relative error {format_number(totals['relative_error'])}"
        + (f"; copied unchanged: {', '.join(report.saved)}" if report.saved else "")
    )
    for line in report.notes:
        note(f"note: {line}", quiet)
    note(f"wrote {report.output} in {report.seconds:.1f} s", quiet)


# --------------------------------------------------------------------------------------------------
# rank-report

RANK_COLUMNS = (
    ("stable_rank", "stable"),
    ("effective_rank", "effective"),
    ("energy_rank_90", "E90"),
    ("energy_rank_99", "E99"),
    ("optimal_rank", "GD"),
    ("numerical_rank", "numerical"),
    ("relative_norm", "‖ΔW‖/‖W‖"),
    ("amplification", "amplif."),
    ("subspace_similarity_1_1", "φ(1,1)"),
    ("intruder_dimensions", "intruders"),
)


def _mean_range(stats: dict | None) -> str:
    """'mean (min–max)' from precomputed statistics, or the single value; counts show their total."""
    if stats is None:
        return "—"
    if "total" in stats:
        return f"{stats['total']}\n[dim]≤ {format_number(stats['max'], 3)} each[/dim]"
    if stats["min"] == stats["max"]:
        return format_number(stats["mean"], 3)
    low, high = format_number(stats["min"], 3), format_number(stats["max"], 3)
    return f"{format_number(stats['mean'], 3)}\n[dim]{low}–{high}[/dim]"


def rank_report_csv(report) -> str:
    import csv
    import io

    keys: list[str] = []
    for entry in report.modules:
        for key, value in entry.metrics.items():
            if key not in keys and not isinstance(value, list):
                keys.append(key)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "kind", "rows", "cols", *keys])
    for entry in report.modules:
        writer.writerow([entry.name, entry.kind, *entry.shape[:2], *(entry.metrics.get(k, "") for k in keys)])
    return buffer.getvalue()


def rank_report(report, show_all=False, json_path=None, csv_path=None, plot_dir=None, quiet=False) -> None:
    if json_path:
        text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
        if json_path == "-":
            stdout.out(text.rstrip("\n"), highlight=False)
        else:
            write_text_atomically(json_path, text)
    if csv_path:
        write_text_atomically(csv_path, rank_report_csv(report))
    if plot_dir:
        from lorasurgery.cli.plots import write_plots

        for path in write_plots(report, plot_dir):
            note(f"plot: {path}", quiet)
    if json_path == "-":
        return  # stdout carries the JSON alone
    present = [(key, label) for key, label in RANK_COLUMNS if any(key in e.metrics for e in report.modules)]
    title = f"{report.target} — {'adapter ΔW' if report.mode == 'adapter' else 'ΔW = target − base' if report.mode == 'delta' else 'W'}"
    if not show_all:
        title += " (mean over matrices, min–max below; --all: every module)"
    table = new_table(title)
    table.add_column("module" if show_all else "type", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("shape" if show_all else "n", justify="right", no_wrap=True)
    for _, label in present:
        table.add_column(label, justify="right", no_wrap=True)
    if show_all:
        for entry in report.modules:
            row = [entry.name, entry.kind, "×".join(map(str, entry.shape))]
            row += [format_number(entry.metrics.get(key)) for key, _ in present]
            table.add_row(*row)
    else:
        for group in report.summary["by_type"]:
            row = [group["module_type"], group["kind"], str(group["count"])]
            for key, _ in present:
                stats = group["metrics"].get(key)
                row.append(_mean_range(stats))
            table.add_row(*row)
    stdout.print(table)
    if report.probe is not None:
        stdout.print(probe_table(report.probe))
    for line in report.notes:
        note(f"note: {line}", quiet)


def probe_table(probe) -> Table:
    """Functional rank per module type, with the measured points of its bisection."""
    reference = probe.reference
    if probe.mode == "weight":
        title = (
            f"functional rank of W: smallest rank fraction whose loss rise ≤ {probe.tolerance:.0%} "
            f"(intact loss {reference['loss']:.4f} nats/token, {probe.tokens} tokens, {probe.passes} passes)"
        )
    else:
        title = (
            f"functional rank of ΔW: smallest rank fraction keeping ≥ {1 - probe.tolerance:.0%} of the "
            f"fine-tune's effect (KL(ft‖base) {reference['kl_finetuned_base']:.4f} nats/token, "
            f"{probe.tokens} tokens, {probe.passes} passes)"
        )
    table = new_table(title)
    table.add_column("type", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("functional rank", justify="right")
    table.add_column(
        "measured: fraction (rank) → " + ("loss rise" if probe.mode == "weight" else "kept effect")
    )
    for curve in probe.curves:
        points = sorted(curve.points, key=lambda p: p["fraction"])
        if probe.mode == "weight":
            cells = [f"{p['fraction']:g} ({p['rank']}) → {p['loss_rise']:+.2%}" for p in points]
        else:
            cells = [f"{p['fraction']:g} ({p['rank']}) → {p['kept_effect']:.3f}" for p in points]
        shown = "full" if curve.functional_rank >= 1 else f"{curve.functional_rank:g}"
        table.add_row(curve.module_type, str(curve.matrices), shown, ", ".join(cells))
    return table


# --------------------------------------------------------------------------------------------------
# export / inspect --for


def serving_check(check, as_json: bool = False) -> None:
    if as_json:
        print_json(check.to_json())
        return
    for rule in check.rules:
        listed = ", ".join(rule.modules[:4]) + (
            f" and {len(rule.modules) - 4} more" if len(rule.modules) > 4 else ""
        )
        line = f"{rule.status:<10} {rule.id}: {rule.requirement}"
        if listed:
            line += f" [{listed}]"
        if rule.action:
            line += f" -> {rule.action}"
        stdout.print(line, markup=False, soft_wrap=True)
    release = f" {check.release}" if check.release else ""
    stdout.print(f"{check.target}{release}: {check.summary}", markup=False, soft_wrap=True)


def export_report(report, as_json: bool = False, quiet: bool = False) -> None:
    if as_json:
        print_json(report.to_json())
        return
    table = new_table(f"{report.output} — {report.adapter} for {report.target}")
    add_module_column(table, report.modules)
    for column in ("r in", "r out", "method", "relative error"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for m in report.modules:
        table.add_row(m.name, str(m.rank_in), str(m.rank_out), m.method, format_number(m.relative_error))
    stdout.print(table)
    config = ", ".join(f"{k} = {v}" for k, v in report.config.items())
    stdout.print(
        f"{len(report.modules)} modules; the target reads {config}; max relative error {format_number(report.max_error)}"
    )
    for name, norm in report.dropped.items():
        note(f"dropped {name} (‖·‖_F = {format_number(norm)})", quiet)
    for line in report.notes:
        note(f"note: {line}", quiet)
    note(f"wrote {report.output}", quiet)
