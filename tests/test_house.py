"""Functions a reader can follow (docs/architecture.md, "The rules"): read from the source with `ast`.

No function or method under lorasurgery/ is longer than MAX_LINES lines (decorators excluded,
docstring included) or takes more than MAX_PARAMETERS named parameters (every positional,
keyword-only, *args and **kwargs name, self and cls excepted): a longer one becomes steps with names,
a wider one takes a request dataclass. Click commands are exempt from the parameter count (click
passes each option as one parameter; each builds its command's request at once). ALLOWED names the
few that exceed today, each with why; an entry there may shrink, never grow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorasurgery"
MAX_LINES = 80
MAX_PARAMETERS = 8

# (path under lorasurgery/, function name) -> why it may exceed, for now
ALLOWED = {
    (
        "commands/verify/adapter.py",
        "_compare",
    ): "10 parameters: verify/adapter.py is being edited in parallel",
    ("commands/verify/text.py", "check_text"): "10 parameters: verify/text.py is being edited in parallel",
    (
        "concurrency.py",
        "__init__",
    ): "Pipeline: 9 parameters: the three stages, then five keyword-only tuning options, each defaulted "
    "(threading.Thread's own shape); a request object would only rename them",
}


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    named = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    named += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [name for name in named if name not in ("self", "cls")]


def _is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated `@<group>.command(…)` (or `@click.command`)."""
    for decorator in node.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(call, ast.Attribute) and call.attr == "command":
            return True
    return False


def oversized(source: str) -> list[tuple[str, str]]:
    """[(function name, what exceeds)] in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES:
            found.append((node.name, f"{lines} lines"))
        count = len(_parameters(node))
        if count > MAX_PARAMETERS and not _is_click_command(node):
            found.append((node.name, f"{count} parameters"))
    return found


def test_no_long_function_or_wide_signature():
    offenders, still_over = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for name, what in oversized(path.read_text(encoding="utf-8")):
            if (relative, name) in ALLOWED:
                still_over.add((relative, name))
            else:
                offenders.append(f"lorasurgery/{relative}: {name}: {what}")
    assert not offenders, (
        f"split into named steps (≤ {MAX_LINES} lines) or take a request dataclass (≤ {MAX_PARAMETERS} "
        "parameters):\n" + "\n".join(offenders)
    )
    stale = sorted(set(ALLOWED) - still_over)
    assert not stale, f"within the limits now: take these off ALLOWED: {stale}"


def test_the_check_finds_a_long_function_and_a_wide_signature():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    long = f"def long():\n{body}\n"
    wide = f"def wide(self, {', '.join(f'a{i}' for i in range(MAX_PARAMETERS))}, *, b=1):\n    pass\n"
    fits = f"def fits(self, {', '.join(f'a{i}' for i in range(MAX_PARAMETERS))}):\n    pass\n"
    command = f"@cli.command()\ndef command({', '.join(f'a{i}' for i in range(20))}):\n    pass\n"
    assert oversized(long) == [("long", f"{MAX_LINES + 1} lines")]
    assert oversized(wide) == [("wide", f"{MAX_PARAMETERS + 1} parameters")]
    assert oversized(fits) == [] and oversized(command) == []
