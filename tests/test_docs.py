"""Docs stay true: the CLI reference matches --help, the README's commands match CI."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_cli_reference", ROOT / "docs" / "make_cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_the_current_help():
    generator = load_generator()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == generator.render(), (
        "docs/cli.md is stale: run python docs/make_cli_reference.py"
    )


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    install_and_run, run_tests = commands
    assert install_and_run.startswith("pip install torch==2.13.0 ") and "lorasurgery " in install_and_run
    assert "sample_adapters/" in install_and_run and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "grep -m1 -E '^pip install .*pytest' README.md" in ci
    assert re.search(r"^pip install .*pytest.*$", readme, re.M).group(0) == run_tests


def test_every_doc_link_to_a_local_file_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
