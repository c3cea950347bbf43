"""Generate docs/cli.md from the commands' own --help (tests/test_docs.py keeps it in sync).

Run: python docs/make_cli_reference.py
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lorasurgery.cli import cli

REFERENCE = Path(__file__).with_name("cli.md")
WIDTH = 100


def help_text(args: list[str]) -> str:
    result = CliRunner().invoke(
        cli, [*args, "--help"], prog_name="lorasurgery", terminal_width=WIDTH, max_content_width=WIDTH
    )
    assert result.exit_code == 0, result.output
    return result.output.rstrip() + "\n"


def render() -> str:
    parts = [
        "# CLI reference\n",
        "Generated from `--help` by `python docs/make_cli_reference.py`; a test fails when it is stale.\n",
        "The global options `--quiet` (`-q`) and `--debug` work before or after the command name:\n"
        "`lorasurgery --quiet merge …` and `lorasurgery merge … --quiet` are the same.\n",
        "## lorasurgery\n",
        "```\n" + help_text([]) + "```\n",
    ]
    for name in cli.commands:
        parts.append(f"## lorasurgery {name}\n")
        parts.append("```\n" + help_text([name]) + "```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    REFERENCE.write_text(render(), encoding="utf-8")
    print(f"wrote {REFERENCE}")
