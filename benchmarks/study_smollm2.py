"""The LoRA paper's §7 and Shuttleworth et al.'s intruder dimensions on the real SmolLM2-135M.

Trains (once, cached under benchmarks/_work/):
- LoRA adapters on q_proj and v_proj (the paper's §7 setting: W_q, W_v), r = 8 and r = 64, seeds 0
  and 1, lora_alpha = 2r, AdamW lr 1e-3, on the same licence texts as the full fine-tune;
- the full fine-tune of benchmarks/extract_vs_mergekit.py (AdamW on every weight).
Then runs `rank-report` on them with the base: φ grids (both definitions) between the runs,
amplification, and intruder dimensions of LoRA vs full fine-tuning, each checked against float64
dense SVDs of a few modules. Results go to docs/rank-report.md and docs/study.md.

Run: python benchmarks/study_smollm2.py [--steps 60] [--ranks 8,64] [--seeds 0,1] [--check 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, smollm2_checkpoint  # noqa: E402
from extract_vs_mergekit import TRAIN_TEXTS, make_finetune, read_texts, token_batches  # noqa: E402


def train_adapter(base: Path, r: int, seed: int, steps: int) -> Path:
    """A real LoRA adapter on q_proj, v_proj trained by PEFT (cached)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = WORK / f"smollm2-lora-qv-r{r}-s{seed}-{steps}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    # The batches differ by seed too, as two independent training runs would.
    batches = token_batches(read_texts(TRAIN_TEXTS), batch=2, length=128, count=steps + 1000 * seed)
    for _ in range(1000 * seed):
        next(batches)
    for step, batch in enumerate(batches):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  r={r} seed={seed} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


def check_against_dense(report: dict, base: Path, tuned_of, count: int) -> float:
    """Largest |difference| between the report's intruder cosines and float64 dense SVDs (first `count` modules)."""
    import torch

    from lorasurgery.io import open_checkpoint

    checkpoint = open_checkpoint(base)
    worst = 0.0
    deltas = [m for m in report["modules"] if m["kind"] == "delta"][:count]
    for module in deltas:
        W = checkpoint.read(module["name"] + ".weight").double()
        tuned = tuned_of(module["name"], W)
        U = torch.linalg.svd(W, full_matrices=False)[0]
        top = torch.linalg.svd(tuned, full_matrices=False)[0][:, :10]
        max_cosine = (top.T @ U).abs().max(dim=1).values
        got = torch.tensor(module["metrics"]["intruder_max_cosine"], dtype=torch.float64)
        worst = max(worst, float((got - max_cosine).abs().max()))
        assert module["metrics"]["intruder_dimensions"] == int((max_cosine < 0.5).sum()), module["name"]
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ft-steps", type=int, default=10)
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--check", type=int, default=4, help="modules checked against dense float64 SVDs")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a busy machine)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from lorasurgery.adapter import load_adapter
    from lorasurgery.io import open_checkpoint
    from lorasurgery.operations.rank_report import rank_report

    base = smollm2_checkpoint()
    finetuned = make_finetune(base, args.ft_steps)
    adapters = {
        (r, s): train_adapter(base, r, s, args.steps)
        for r in map(int, args.ranks.split(","))
        for s in map(int, args.seeds.split(","))
    }
    if args.train_only:
        return
    results: dict = {}
    for (r, s), folder in adapters.items():
        started = time.perf_counter()
        report = rank_report(folder, base=base).to_json()
        seconds = time.perf_counter() - started
        adapter = load_adapter(folder)

        def tuned(name, W, adapter=adapter):
            A, B = adapter.read_factors(name)
            return W + adapter.modules[name].scale * (B.double() @ A.double())

        worst = check_against_dense(report, base, tuned, args.check)
        results[f"lora r={r} seed={s}"] = summarize(report) | {"seconds": seconds, "max_cos_error": worst}
    started = time.perf_counter()
    report = rank_report(finetuned, base=base, include=r"\.(q_proj|v_proj)$").to_json()
    seconds = time.perf_counter() - started
    ft = open_checkpoint(finetuned)
    worst = check_against_dense(report, base, lambda name, W: ft.read(name + ".weight").double(), args.check)
    results["full fine-tune (q_proj, v_proj)"] = summarize(report) | {
        "seconds": seconds,
        "max_cos_error": worst,
    }

    # φ between the runs: r = 8 vs r = 64 (paper Fig. 3) and seed 0 vs seed 1 (Fig. 4).
    pairs = [((8, 0), (64, 0)), ((64, 0), (64, 1)), ((8, 0), (8, 1))]
    for first, second in pairs:
        if first in adapters and second in adapters:
            report = rank_report(adapters[first], compare=adapters[second]).to_json()
            results[f"phi r={first[0]}s{first[1]} vs r={second[0]}s{second[1]}"] = phi_summary(report)
    print(json.dumps(results, indent=1))
    (WORK / "study_results.json").write_text(json.dumps(results, indent=1))


def summarize(report: dict) -> dict:
    out = {}
    for group in report["summary"]["by_type"]:
        if group["kind"] != "delta":
            continue
        metrics = group["metrics"]
        out[group["module_type"]] = {
            "intruders_total": metrics["intruder_dimensions"]["total"],
            "intruders_max": metrics["intruder_dimensions"]["max"],
            "modules": group["count"],
            "amplification_mean": metrics.get("amplification", {}).get("mean"),
            "relative_norm_mean": metrics.get("relative_norm", {}).get("mean"),
        }
    return out


def phi_summary(report: dict) -> dict:
    out = {}
    for module in report["modules"]:
        if ".0." in module["name"] or ".15." in module["name"] or ".29." in module["name"]:
            m = module["metrics"]
            out[module["name"]] = {
                "phi_1_1": m["subspace_similarity_1_1"],
                "phi_delta_1_1": m["subspace_similarity_delta_1_1"],
            }
    for key in ("subspace_similarity_1_1", "subspace_similarity_delta_1_1"):
        values = [m["metrics"][key] for m in report["modules"] if module_type_of(m["name"]) == "q_proj"]
        out[f"q_proj mean {key}"] = sum(values) / len(values)
    return out


def module_type_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


if __name__ == "__main__":
    main()
