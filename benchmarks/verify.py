"""`lorasurgery verify` against the floor it is measured by: reading the base and the artifact once.

docs/design.md §8: verify ≤ 1.2× the time of reading the base and the artifact once (it is
disk-bound). The model is merge_quantized.py's Llama with SmolLM2-135M's shapes (random bf16 weights,
tied embeddings) and its all-linear r=16 adapter; the artifact is our own bf16 merge of it. The
floor is a process of its own that opens both checkpoints and reads every tensor through
`Checkpoint.read`, the reader verify uses; verify runs as the whole command (`--json`, exit 0).

    python benchmarks/verify.py [--runs 5]

Each measurement is a child process; the runs alternate; medians are printed with the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import WORK, lorasurgery, median, run_measured  # noqa: E402
from merge_quantized import build_smollm2  # noqa: E402

READ_CHILD = r"""
import sys
from lorasurgery.io import open_checkpoint
for path in sys.argv[1:]:
    checkpoint = open_checkpoint(path)
    for name in checkpoint.tensors:
        checkpoint.read(name)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    plain, _, adapter = build_smollm2(576, 30)  # SmolLM2-135M's shapes
    merged = WORK / "verify-bench-merged"
    if not (merged / "config.json").is_file():
        subprocess.run(lorasurgery("merge", plain, adapter, "-o", merged, "--force"), check=True)
    verify = lorasurgery("verify", plain, adapter, merged, "--json")
    subprocess.run(verify, check=True, capture_output=True)  # fills the structure cache, unmeasured
    read = [sys.executable, "-c", READ_CHILD, str(plain), str(merged)]
    results: dict[str, list] = {}
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        for label, command in (("read base + artifact", read), ("verify", verify)):
            seconds, rss = run_measured(command)
            results.setdefault(label, []).append((seconds, rss))
            print(f"  {label}: {seconds:.2f} s, {rss / 1e9:.3f} GB", flush=True)
    time = {label: median(s for s, _ in values) for label, values in results.items()}
    rss = {label: median(r for _, r in values) for label, values in results.items()}
    for label in results:
        print(f"{label:>22}: {time[label]:.2f} s, {rss[label] / 1e9:.3f} GB (medians)")
    print(f"verify / read: {time['verify'] / time['read base + artifact']:.3f} (target ≤ 1.2)")


if __name__ == "__main__":
    main()
