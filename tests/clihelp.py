"""Running the CLI in tests, and the checks every bad-input case shares.

`run_cli` invokes the real click group in-process (CliRunner, separate stderr); `verify` runs
`lorasurgery verify … --json` and returns its exit code and report. `assert_refused`
checks the contract of docs/design.md §7 for a bad input: exit code 1, a message starting `Error:` that
contains the expected text, no traceback, no output folder, and inputs byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from click.testing import CliRunner, Result

from lorasurgery.cli import cli


def run_cli(*args: str | os.PathLike) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="lorasurgery")


LANDED, DID_NOT_LAND = 0, 1  # verify's exit codes for a completed check (docs/design.md §14)


def verify(*args):
    """`lorasurgery verify ARGS --json`: (exit code, the report), the check completed either way."""
    result = run_cli("verify", *args, "--json")
    assert result.exit_code in (LANDED, DID_NOT_LAND), (result.exit_code, result.stdout, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def verdicts(report) -> dict[str, str]:
    """{tensor: verdict} of a verify report."""
    return {c["tensor"]: c["verdict"] for c in report["checks"]}


def tree_digest(*paths: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders), keyed by path."""
    digests = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def assert_refused(
    args: list, expected: str, *, inputs: list = (), output: str | os.PathLike | None = None
) -> Result:
    """Run the CLI on a bad input and check everything docs/design.md §7 promises about it."""
    before = tree_digest(*inputs)
    result = run_cli(*args)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("Error: "), result.stderr
    assert expected in result.stderr, (expected, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    if output is not None:
        output = Path(output)
        assert not output.exists(), f"{output} was left behind"
        leftovers = [p.name for p in output.parent.glob(f".{output.name}.lorasurgery-tmp-*")]
        assert not leftovers, leftovers
    assert tree_digest(*inputs) == before, "an input was modified"
    return result
