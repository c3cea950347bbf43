"""What `merge --requantize` costs on one large FP8 tensor, route by route (docs/merge.md, issue #18 item 8).

One gate_proj-sized weight (5632 × 2048, TinyLlama-1.1B's) stored as 128×128 block FP8 by the
library's own quantizer, an r 16 update with random factors; the CPU time of one thread
(`time.thread_time`: a loaded machine's other jobs do not count) of

- the bf16 merge of the same weight (`linalg.delta.merge_weight`, bf16 in and out);
- the FP8 merge, unquantized output (the codes decoded in bands into the merge kernel);
- `--requantize`'s fused route (`linalg.requantize.requantize_blocks`) with the native kernels
  (lorasurgery/native) and with them unloaded (the torch code: the same bytes, checked here).

Run in a worker thread after the merge command's allocator tuning, as the merge runs it; medians of
`--repeats` interleaved repeats.

    python benchmarks/requantize_phases.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent)]

SHAPE, BLOCK, RANK = (5632, 2048), (128, 128), 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result: dict = {}
    worker = threading.Thread(target=measure, args=(args.repeats, result))
    worker.start()
    worker.join()
    bf16 = result["bf16 merge"]
    print(f"one {SHAPE[0]}×{SHAPE[1]} FP8 weight ({BLOCK[0]}×{BLOCK[1]} blocks), r {RANK}; thread CPU ms")
    for label, ms in result.items():
        if isinstance(ms, float):
            print(f"  {label:<40} {ms:8.1f} ms  {ms / bf16:5.2f}× the bf16 merge")
    print(f"native kernels: {result['kernels']}; same bytes with and without: {result['same']}")


def measure(repeats: int, result: dict) -> None:
    import torch
    from factories import quantize_fp8
    from test_quantized_bands import info_of, reader

    from lorasurgery.io import fp8
    from lorasurgery.linalg.delta import Update, merge_weight, merged_blocks
    from lorasurgery.linalg.requantize import requantize_blocks
    from lorasurgery.memory import tune_allocator
    from lorasurgery.native import build
    from lorasurgery.native import fp8 as kernels

    tune_allocator()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    W = (torch.randn(SHAPE, generator=generator) * 0.02).to(torch.bfloat16)
    update = Update(
        "m", "linear", torch.randn(RANK, SHAPE[1], generator=generator) * 0.02,
        torch.randn(SHAPE[0], RANK, generator=generator) * 0.02, 1.0,
    )  # fmt: skip
    codes, scale = quantize_fp8(W.float(), BLOCK, torch.float32, False)
    info, read = info_of(codes, scale, BLOCK), reader(codes, scale)
    buffers: dict = {}

    def requantized():
        blocks = merged_blocks(fp8.rows(info, read), [update], keep_base=True)
        return requantize_blocks(info, blocks, fp8.band_quantizer(info, read), codes, buffers)

    def without_kernels():
        build._LOADED["fp8"], saved = None, build._LOADED.get("fp8")
        try:
            return requantized()
        finally:
            build._LOADED["fp8"] = saved

    routes = {
        "bf16 merge": lambda: merge_weight(W.clone(), [update], out_dtype=torch.bfloat16),
        "FP8 merge, unquantized output": lambda: merge_weight(
            fp8.rows(info, read), [update], out_dtype=torch.bfloat16
        ),
        "--requantize, native kernels": requantized,
        "--requantize, torch only": without_kernels,
    }
    result["kernels"] = "loaded" if kernels._lib() is not None else f"absent ({build.why_not('fp8')})"
    times: dict[str, list[float]] = {label: [] for label in routes}
    for _ in range(repeats + 1):  # the first round warms up, unmeasured
        for label, route in routes.items():
            start = time.thread_time()
            route()
            times[label].append((time.thread_time() - start) * 1e3)
    for label, values in times.items():
        result[label] = statistics.median(values[1:])
    a, b = requantized(), without_kernels()
    result["same"] = all(
        torch.equal(a.tensors[k].view(torch.uint8), b.tensors[k].view(torch.uint8)) for k in a.tensors
    )


if __name__ == "__main__":
    main()
