"""lorasurgery rank-report vs weightwatcher analyze() on W of the real SmolLM2-135M.

weightwatcher (its own venv: benchmarks/_work/ww-venv, `pip install torch==2.13.0 weightwatcher
transformers safetensors`: weightwatcher 0.7.7 with torch 2.13.0+cpu and transformers 5.25)
analyzes every Linear and Embedding layer of the model; rank-report is run with --include . so that
it reads the same matrices. Both run in child processes, alternating,
and the medians of wall time are compared. Then the stable rank of each layer is compared:
weightwatcher's stable_rank is Σλ/λ_max of the eigenvalues λ of its normalised correlation matrix
X = WᵀW/N, and since λᵢ = σᵢ²/N the normalisation cancels: it is Σσ²/σ₁², the same quantity.

Run: python benchmarks/rank_report_vs_weightwatcher.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, lorasurgery, run_measured, smollm2_checkpoint  # noqa: E402

WW_PYTHON = WORK / "ww-venv" / "bin" / "python"
WW_CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
import weightwatcher as ww
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
start = time.perf_counter()
details = ww.WeightWatcher(model=model).analyze()
seconds = time.perf_counter() - start
name_column = "longname" if "longname" in details.columns else "name"
rows = [{"name": str(r[name_column]), "stable_rank": float(r["stable_rank"])} for _, r in details.iterrows() if "stable_rank" in details.columns]
json.dump({"seconds": seconds, "rows": rows}, open(sys.argv[2], "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not WW_PYTHON.exists():
        sys.exit(f"needs weightwatcher in {WW_PYTHON.parent.parent}")
    model = smollm2_checkpoint()
    out = WORK / "ww-bench"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {"weightwatcher": [], "lorasurgery": []}
    for run in range(args.runs):
        seconds, _ = run_measured([str(WW_PYTHON), "-c", WW_CHILD, str(model), str(out / "ww.json")])
        times["weightwatcher"].append(seconds)
        seconds, _ = run_measured(
            lorasurgery("rank-report", model, "--include", ".", "--json", out / "ours.json")
        )
        times["lorasurgery"].append(seconds)
        print(
            f"  run {run + 1}: weightwatcher {times['weightwatcher'][-1]:.1f} s, lorasurgery {times['lorasurgery'][-1]:.1f} s",
            flush=True,
        )

    ours = {
        m["name"]: m["metrics"]["stable_rank"] for m in json.loads((out / "ours.json").read_text())["modules"]
    }
    theirs = json.loads((out / "ww.json").read_text())
    compared, worst, where = 0, 0.0, ""
    for row in theirs["rows"]:
        name = row["name"]
        if name in ours and ours[name] > 0:
            compared += 1
            relative = abs(row["stable_rank"] - ours[name]) / ours[name]
            if relative > worst:
                worst, where = relative, name
    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nSmolLM2-135M, W of every Linear/Embedding layer; {args.runs} alternating runs, medians (whole process)"
    )
    print(
        f"  weightwatcher analyze(): {median['weightwatcher']:.1f} s (analyze() alone, last run: {theirs['seconds']:.1f} s)"
    )
    print(f"  lorasurgery rank-report: {median['lorasurgery']:.1f} s")
    print(
        f"  time ratio lorasurgery / weightwatcher: {median['lorasurgery'] / median['weightwatcher']:.4f} (1/{median['weightwatcher'] / median['lorasurgery']:.0f})"
    )
    print(
        f"  stable rank compared on {compared} layers (of {len(theirs['rows'])} weightwatcher rows, {len(ours)} ours): worst relative difference {worst:.2e} ({where})"
    )


if __name__ == "__main__":
    main()
