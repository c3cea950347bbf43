"""The command line (docs/architecture.md, layer 8): the only code that prints.

- commands.py  the click commands: parse, call the library, render
- group.py     the group, and the one place errors become `Error: …` and an exit code
- options.py   options several commands share, as decorators
- render.py    tables, JSON and CSV with rich
- plots.py     rank-report's PNG plots (matplotlib)

Importing this package loads click and the commands' definitions only: rich, torch and the
library's commands are imported when a command runs.
"""

from lorasurgery.cli.commands import cli, main

__all__ = ["cli", "main"]
