"""The summary that benchmarks/run_peers.sh prints: each new ratio beside the earlier one.

The earlier ratios are read from the table in docs/benchmarks.md ("All five peer benchmarks in one
command"), whose first column holds the keys below; the new ones from the logs the five benchmarks
left in benchmarks/_work/peers-<name>.log. Then each log's own "same results" lines are repeated, so
one screen says whether issue #19 holds: the same results, and not slower.

    python benchmarks/peers_summary.py [--work benchmarks/_work]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
NUMBER = r"([0-9.]+(?:e[-+]?[0-9]+)?)"

# key: (log name, section of that log or None, regular expression whose group 1 is the new ratio)
RATIOS = {
    "merge-smollm2-time": ("merge", "smollm2", rf"^time ratio\s+{NUMBER}"),
    "merge-smollm2-rss": ("merge", "smollm2", rf"^RSS ratio\s+{NUMBER}"),
    "merge-1.1b-time": ("merge", "synthetic", rf"^time ratio\s+{NUMBER}"),
    "merge-1.1b-rss": ("merge", "synthetic", rf"^RSS ratio\s+{NUMBER}"),
    "extract-time": ("extract", None, rf"time ratio {NUMBER}"),
    "rank-report-time": ("rank-report", None, rf"time ratio lorasurgery / weightwatcher: {NUMBER}"),
    "combine-whole": ("combine", None, rf"^whole process:.*ratio {NUMBER}"),
    "combine-call": ("combine", None, rf"^computation:.*ratio {NUMBER}"),
    "export-time": ("export", None, rf"ratio ours/theirs\s+{NUMBER}"),
}

# Each log's lines that say whether both sides still give the same results.
RESULTS = {
    "merge": r"^== |max \|peft|W' − W'_exact",
    "extract": r"recovered effect|Eckart–Young|median of the per-run",
    "rank-report": r"stable rank compared",
    "combine": r"error vs the exact sum|combine --exact|resize c",
    "export": r"tensors:|rsLoRA",
}

# Single runs on a shared machine swing by ±15% (docs/benchmarks.md); beyond that, look closer.
NOISE = 1.15


def earlier_ratios() -> dict[str, float]:
    """{key: ratio} from the rows of docs/benchmarks.md's table whose first cell is `key`."""
    found = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].strip("`") in RATIOS:
            found[cells[0].strip("`")] = float(cells[2])
    return found


def section(text: str, name: str | None) -> str:
    """The part of merge_vs_peft.py's output after its `== name` heading (the whole text for None)."""
    if name is None:
        return text
    parts = re.split(r"^== ", text, flags=re.M)
    return next((p for p in parts if p.startswith(name)), "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    args = parser.parse_args()
    logs = {}
    for name in RESULTS:
        path = args.work / f"peers-{name}.log"
        logs[name] = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    earlier = earlier_ratios()

    print(f"\n{'ratio (ours / peer, lower is better)':38s}{'earlier':>9s}{'now':>9s}{'now/earlier':>13s}")
    flagged = 0
    for key, (log, part, pattern) in RATIOS.items():
        match = re.search(pattern, section(logs[log], part), flags=re.M)
        before = earlier.get(key)
        if match is None:
            print(f"{key:38s}{before or float('nan'):9.3f}{'—':>9s}   (no figure in peers-{log}.log)")
            flagged += 1
            continue
        now = float(match.group(1))
        change = now / before if before else float("nan")
        note = "  <- worse than the ±15% noise" if change > NOISE else ""
        flagged += change > NOISE
        print(f"{key:38s}{before:9.3f}{now:9.3f}{change:13.2f}{note}")

    print("\nsame results (each benchmark's own checks):")
    for name, pattern in RESULTS.items():
        lines = [line.strip() for line in logs[name].splitlines() if re.search(pattern, line)]
        print(f"  {name}:")
        for line in lines or ["(no output: see its log)"]:
            print(f"    {line}")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
