"""extract --calibrate vs plain extract at the same --budget on the real SmolLM2-135M and a real full
fine-tune (benchmarks/extract_vs_mergekit.py's recipe), measured by the share of the fine-tune's
effect recovered on held-out text, 1 − KL(ft ‖ base+adapter) / KL(ft ‖ base).

The calibration text is the fine-tune's own training text (GPL-3, LGPL-3, GFDL-1.3 licences); the
held-out text is Apache-2.0 and MPL-2.0, as in extract_vs_mergekit.py.

Run: python benchmarks/calibrate_smollm2.py [--budget 5M] [--ft-steps 10] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402
from extract_vs_mergekit import TRAIN_TEXTS, make_finetune, read_texts, recovered_effect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", default="5M")
    parser.add_argument("--rank", type=int, help="a fixed rank instead of --budget (no allocation)")
    parser.add_argument("--ft-steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ridges", default="0.01", help="ridges λ to try, comma-separated")
    parser.add_argument(
        "--unscaled",
        dest="scaled",
        action="store_false",
        help="budget on the raw whitened spectra (not the default)",
    )
    parser.add_argument("--skip-plain", action="store_true", help="reuse the plain adapter of an earlier run")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter
    from lorasurgery.units import parse_count

    base = smollm2_checkpoint()
    finetuned = make_finetune(base, args.ft_steps)
    if not (finetuned / "tokenizer.json").is_file():  # --text is tokenised with the folder's tokenizer
        smollm2_tokenizer().save_pretrained(finetuned)
    text = WORK / "calibration.txt"
    text.write_text(read_texts(TRAIN_TEXTS), encoding="utf-8")
    budget = parse_count(args.budget)
    adapters, reports = {}, {}
    runs = [] if args.skip_plain else [("plain", None, None)]
    runs += [(f"calibrated λ={r}", text, float(r)) for r in args.ridges.split(",")]
    if args.skip_plain:
        adapters["plain"] = WORK / "calibrate-bench-plain"  # the --budget run's
    for label, calibrate, ridge in runs:
        policy_tag = (f"rank{args.rank}" if args.rank else args.budget) + ("-scaled" if args.scaled else "")
        out = WORK / f"calibrate-bench-{label.replace(' ', '-').replace('λ=', '')}-{args.tokens}-{policy_tag}"
        started = time.perf_counter()
        report = extract_adapter(
            ExtractRequest(
                base,
                finetuned,
                out,
                policy=Policy(rank=args.rank) if args.rank else Policy(budget=budget),
                calibrate=calibrate,
                calibrate_tokens=args.tokens,
                calibrate_ridge=ridge,
                calibrate_scaled_budget=args.scaled,
                force=True,
            ),
        )
        reports[label] = report.totals | {"seconds": time.perf_counter() - started}
        adapters[label] = out
    quality = recovered_effect(base, finetuned, adapters)
    result = {"budget": budget, "reports": reports, "recovered_effect": quality}
    print(json.dumps(result, indent=1))
    (
        WORK
        / f"calibrate_results_{args.ridges}_{args.tokens}_{args.rank or args.budget}{'_scaled' if args.scaled else ''}.json"
    ).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
