"""Peak RSS of streaming every tensor of a ~500 MB single-file checkpoint.

Compares lorasurgery's reader (plain reads into fresh memory) with the safetensors library's
`safe_open` (mmap; touched pages count towards RSS). Each reader runs in its own child process;
after imports the child resets its peak (/proc/self/clear_refs) and reports how far VmHWM rose above
the RSS it had before streaming.

Run: python benchmarks/reader_rss.py [--size-mb 500] [--largest-mb 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, time
import torch
from safetensors import safe_open
from lorasurgery.io import open_checkpoint


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


mode, path = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) after imports
    f.write("5")
before = status("VmRSS:")
start = time.perf_counter()
total = 0.0
if mode == "lorasurgery":
    for name, tensor in open_checkpoint(path).iter_tensors():
        total += float(tensor.sum())  # touch every value
        del tensor
elif mode == "safetensors":
    with safe_open(path + "/model.safetensors", "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            total += float(tensor.sum())
            del tensor
seconds = time.perf_counter() - start
print(status("VmHWM:") - before, seconds)
"""


def make_checkpoint(path: Path, size_mb: int, largest_mb: int) -> int:
    import torch

    from lorasurgery.io import save_tensors

    generator = torch.Generator().manual_seed(0)
    tensors, total, i = {}, 0, 0
    largest = largest_mb * 2**20 // 4  # float32 elements
    while total < size_mb * 2**20:
        numel = largest if i == 0 else largest // 4
        tensors[f"layers.{i}.weight"] = torch.randn(numel // 256, 256, generator=generator)
        total += numel * 4
        i += 1
    save_tensors(path, tensors)
    return largest * 4


def run_child(mode: str, path: Path) -> tuple[int, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, check=True
    )
    rss, seconds = out.stdout.split()
    return int(rss), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--largest-mb", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        largest = make_checkpoint(path, args.size_mb, args.largest_mb)
        size = (path / "model.safetensors").stat().st_size
        results: dict[str, list[tuple[int, float]]] = {"lorasurgery": [], "safetensors": []}
        for _ in range(args.runs):
            for mode in results:  # alternate so drift affects all alike
                results[mode].append(run_child(mode, path))
    mb = 2**20
    print(
        f"checkpoint {size / mb:.0f} MiB, largest tensor {largest / mb:.0f} MiB, {args.runs} runs each, medians:"
    )
    for mode in ("lorasurgery", "safetensors"):
        rise = statistics.median(r for r, _ in results[mode])
        seconds = statistics.median(s for _, s in results[mode])
        print(
            f"  {mode:12s} peak RSS rise while streaming {rise / mb:6.0f} MiB = {rise / largest:.2f} × largest tensor; {seconds:.2f} s"
        )
    ours = statistics.median(r for r, _ in results["lorasurgery"])
    theirs = statistics.median(r for r, _ in results["safetensors"])
    print(f"  ratio lorasurgery / safetensors peak RSS: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
