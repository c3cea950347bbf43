"""The package's layering holds (docs/architecture.md): read from the source, not from a running import.

Every `import` and `from … import` of every module under lorasurgery/ — at the top or inside a
function, so a lazy import cannot hide an edge — makes one graph of lorasurgery modules. It must have
no cycle; every import looks down the layers (LAYERS); no `commands.<x>` package may import another command's package; only the command-line layer
(the cli/ package and __main__.py) may import a command; and no library module imports click
or rich (the library never prints).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorasurgery"


def in_cli_layer(name: str) -> bool:
    """The command line: the cli/ package (commands, render, plots …) and __main__."""
    return name in ("lorasurgery.cli", "lorasurgery.__main__") or name.startswith("lorasurgery.cli.")


UI_LIBRARIES = {"click", "rich"}
# Layers, lowest first (docs/architecture.md): a module imports only from its own layer or below.
LAYERS = (
    ("errors", "units", "progress", "devices", "memory", "concurrency", "textdata", "cache", "native"),
    ("io",),
    ("adapter",),
    ("model", "naming"),
    ("binding",),
    ("linalg",),
    ("factored", "causal_lm", "recipes", "targets", "llamacpp"),
    ("commands",),
    ("cli", "__main__", ""),
)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name `path` imports, relative imports resolved; `from a import b` gives a.b and a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: lorasurgery modules it imports}, {module: every top-level package it imports})."""
    known = modules(root)
    graph, externals = {}, {}
    for name, path in known.items():
        imported = imported_names(path, name)
        graph[name] = {n for n in imported if n in known and n != name}
        externals[name] = {n.split(".")[0] for n in imported if n}
    return graph, externals


def layer_of(name: str) -> int:
    """The index in LAYERS of module `name` (by its first component under lorasurgery)."""
    top = name.split(".")[1] if "." in name else ""
    found = [i for i, layer in enumerate(LAYERS) if top in layer]
    assert found, f"{name}: a new top-level module; add it to a layer in LAYERS and docs/architecture.md"
    return found[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def command_of(name: str) -> str | None:
    """`merge` for lorasurgery.commands.merge.plan; None outside lorasurgery.commands."""
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "commands" else None


def layering_errors(root: Path = PACKAGE) -> list[str]:
    graph, externals = import_graph(root)
    errors = []
    if cycle := find_cycle(graph):
        errors.append("import cycle: " + " -> ".join(cycle))
    for name, imported in sorted(graph.items()):
        for other in sorted(imported):
            if layer_of(other) > layer_of(name):
                errors.append(f"{name} imports {other}, a layer above it")
            if command_of(other) is None:
                continue
            if command_of(name) is not None and command_of(name) != command_of(other):
                errors.append(f"command {name} imports another command's {other}")
            elif command_of(name) is None and not in_cli_layer(name) and other != "lorasurgery.commands":
                errors.append(f"shared layer {name} imports the command {other}")
        if not in_cli_layer(name) and externals[name] & UI_LIBRARIES:
            errors.append(f"library module {name} imports {sorted(externals[name] & UI_LIBRARIES)}")
    return errors


def test_the_package_has_no_import_cycle_and_no_command_imports_another():
    assert layering_errors() == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a lazy import inside a function, a relative import, a cycle through both,
    a command importing another, a shared layer importing a command and a library importing click
    are each reported (a checker that read only top-level absolute imports would pass them all)."""
    root = tmp_path / "lorasurgery"
    files = {
        "__init__.py": "",
        "naming.py": "def f():\n    from lorasurgery.commands.merge import plan\n",
        "errors.py": "from lorasurgery.io import x\n",
        "io/__init__.py": "import click\n",
        "commands/__init__.py": "",
        "commands/merge/__init__.py": "",
        "commands/merge/plan.py": "from . import write\n",
        "commands/merge/write.py": "def g():\n    from lorasurgery.commands.merge.plan import x\n",
        "commands/export/__init__.py": "",
        "commands/export/export.py": "from lorasurgery.commands.merge import plan\n",
        "cli.py": "import click\nfrom lorasurgery.commands.export import export\n",
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    errors = layering_errors(root)
    assert any(
        e.startswith("import cycle:")
        and "lorasurgery.commands.merge.plan" in e
        and "lorasurgery.commands.merge.write" in e
        for e in errors
    ), errors
    assert (
        "command lorasurgery.commands.export.export imports another command's lorasurgery.commands.merge.plan"
        in errors
    )
    assert "shared layer lorasurgery.naming imports the command lorasurgery.commands.merge.plan" in errors
    assert "library module lorasurgery.io imports ['click']" in errors
    assert "lorasurgery.errors imports lorasurgery.io, a layer above it" in errors
    assert not any("lorasurgery.cli" in e for e in errors), errors  # the CLI may import commands and click
