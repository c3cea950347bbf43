"""How much of a *trained* LoRA survives `merge --requantize` on the real SmolLM2-135M (docs/quantized.md).

The start of the study (lorasurgery issue #18 item 7): one r 8 LoRA on q_proj/v_proj (α 16, AdamW
lr 1e-3, batches of 2×128 tokens of the licence texts benchmarks/study_smollm2.py trains on, a few
dozen steps; trained on the bf16 SmolLM2 the quantized bases are made from), and four quantized
bases made by benchmarks/quantized_smollm2.py's quantizers: FP8 128×128 blocks (lorasurgery's),
FP8 per channel and INT4 in groups of 64 (compressed-tensors' own tools), NF4 with double
quantisation (transformers + bitsandbytes). Per format: retention ρ per module type and the share of
codes changed (`merge --requantize --json`), and the held-out loss (Apache-2.0 and MPL-2.0 texts,
4 batches of 4×128 tokens) of

- the dequantized base alone, and with the adapter unmerged (PEFT on the dequantized base);
- `lorasurgery merge` (unquantized, bf16);
- `merge --requantize` and `merge --requantize --min-retention 0.9`.

bitsandbytes bases cannot be merged with --requantize yet (refused by name): for NF4 the two
requantized rows are computed in this process by lorasurgery's own NF4 quantizer
(`lorasurgery.io.bnb.quantize`, bit for bit bitsandbytes' CPU quantize_4bit, docs/design.md §13) on
deq(W) + ΔW (ΔW from PEFT's get_delta_weight), marked "in-process".

Every model is evaluated with its weights as its loader holds them — each weight as lorasurgery
reads it (bit for bit each format's own decoder, benchmarks/quantized_smollm2.py) rounded to bf16 —
computed in float32.

    python benchmarks/requantize_study_smollm2.py [--steps 40] [--formats …]

Not done here (the full study): the r 8 and r 64 adapters of docs/study.md (300 steps, two seeds),
MXFP4 on a tiny gpt-oss.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]

import quantized_smollm2 as qs  # noqa: E402
from common import WORK, smollm2_checkpoint  # noqa: E402
from extract_vs_mergekit import HELD_OUT_TEXTS, read_texts, token_batches  # noqa: E402

FORMATS = ["fp8-block-ls", "ct-fp8-channel", "ct-w4a16-g64", "bnb-nf4"]
STUDY = WORK / "requantize-study"


def train(base: Path, steps: int) -> Path:
    """The r 8 q/v LoRA, trained as benchmarks/study_smollm2.py trains its adapters (cached)."""
    import study_smollm2

    study_smollm2.WORK = STUDY  # its cache name says nothing of the base: keep ours (bf16) apart
    return study_smollm2.train_adapter(base, 8, 0, steps)


def model_from(folder: Path, replace: dict | None = None):
    """The model of checkpoint `folder` with each weight as lorasurgery reads it (dequantized where
    quantized) rounded to bf16, in float32; `replace` overrides weights by name."""
    import torch
    import transformers

    from lorasurgery.io import open_checkpoint

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint = open_checkpoint(folder)
    state = {name: checkpoint.read(name).to(torch.bfloat16).float() for name in checkpoint.tensors}
    for name, W in (replace or {}).items():
        state[name] = W.to(torch.bfloat16).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def held_out_loss(model, batches) -> float:
    import torch

    with torch.no_grad():
        return statistics.mean(float(model(batch, labels=batch).loss) for batch in batches)


def with_adapter(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def nf4_requantized(Q: Path, D: Path, adapter: Path) -> tuple[dict, dict]:
    """In-process requantization of an NF4 base (merge refuses it): ({weight: deq(W′)}, {module:
    (ρ, codes changed)}) with lorasurgery's bitsandbytes quantizer."""
    from factories import peft_delta_weights

    from lorasurgery.io import bnb, open_checkpoint
    from lorasurgery.linalg.requantize import _changed, _sums

    deltas, _ = peft_delta_weights(D, adapter)
    checkpoint = open_checkpoint(Q)
    raw = checkpoint.raw
    weights, measured = {}, {}
    for module, delta in deltas.items():
        name = f"{module}.weight"
        info = checkpoint.tensors[name]
        W = checkpoint.read(name)
        merged = W + delta.float()
        stored = bnb.quantize(info, merged, lambda part: raw.read(part.name))
        after = bnb.dequantize(
            info,
            lambda part, stored=stored: stored[part.name] if part.name in stored else raw.read(part.name),
        )
        kept, update = _sums(W, merged, after)
        changed = _changed(stored[info.codes.name], raw.read(info.codes.name))
        measured[module] = (kept / update, changed / stored[info.codes.name].numel())
        weights[name] = after
    return weights, measured


def requantize_cli(Q: Path, adapter: Path, out: Path, *extra) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    result, seconds = qs.run("merge", Q, adapter, "-o", out, "--requantize", "--json", *extra)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout), seconds


def study(fmt: str, plain: Path, adapter: Path, batches, reference: dict) -> dict:
    Q, D, out = (STUDY / f"{fmt}{suffix}" for suffix in ("", "-dequantized", "-merged"))
    for folder in (Q, D, out):
        shutil.rmtree(folder, ignore_errors=True)
    qs.quantize(fmt, plain, Q)
    oracles = qs.compare_and_copy(fmt, Q, D)
    first = next(iter(oracles.values()))
    assert first[0] == first[1], (fmt, oracles)  # lorasurgery reads it as the format's library does
    row: dict = {"format": fmt}
    base = model_from(Q)
    row["base"] = held_out_loss(base, batches)
    row["unmerged"] = held_out_loss(with_adapter(base, adapter), batches)
    del base
    result, _ = qs.run("merge", Q, adapter, "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    row["merged"] = held_out_loss(model_from(out), batches)
    shutil.rmtree(out)
    if fmt == "bnb-nf4":
        weights, measured = nf4_requantized(Q, D, adapter)
        row["requantized"] = held_out_loss(model_from(Q, weights), batches)
        # --min-retention 0.9: the modules below it keep deq(W) + ΔW, rounded to bf16
        low = [m for m, (rho, _) in measured.items() if rho < 0.9]
        from factories import peft_delta_weights

        from lorasurgery.io import open_checkpoint

        deltas, _ = peft_delta_weights(D, adapter)
        checkpoint = open_checkpoint(Q)
        kept = dict(weights)
        for module in low:
            kept[f"{module}.weight"] = checkpoint.read(f"{module}.weight") + deltas[module].float()
        row["min_retention"] = held_out_loss(model_from(Q, kept), batches)
        row["unquantized_modules"] = len(low)
        row["how"] = "in-process (merge refuses bnb --requantize)"
        entries = [{"module": m, "retention": rho, "codes_changed": c} for m, (rho, c) in measured.items()]
    else:
        report, row["requantize_s"] = requantize_cli(Q, adapter, out)
        entries = report["retention"]
        row["requantized"] = held_out_loss(model_from(out), batches)
        report, _ = requantize_cli(Q, adapter, out, "--min-retention", "0.9")
        row["unquantized_modules"] = sum(1 for e in report["retention"] if (e["retention"] or 1) < 0.9)
        row["written"] = sorted({str(e["written"]) for e in report["retention"]})
        row["min_retention"] = held_out_loss(model_from(out), batches)
        row["how"] = "merge --requantize"
    row["retention"] = qs.retention_summary(entries)
    for folder in (Q, D, out):
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  {fmt}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    from factories import silence_libraries

    silence_libraries()
    plain = smollm2_checkpoint("bfloat16")
    start = time.perf_counter()
    adapter = train(plain, args.steps)
    print(f"adapter: {adapter} ({time.perf_counter() - start:.0f} s)", flush=True)
    losses = json.loads((adapter / "training_losses.json").read_text())
    batches = list(token_batches(read_texts(HELD_OUT_TEXTS), batch=4, length=128, count=4))
    base = model_from(plain)
    reference = {"bf16 base": held_out_loss(base, batches)}
    reference["bf16 base + adapter (unmerged)"] = held_out_loss(with_adapter(base, adapter), batches)
    del base
    print(f"training loss {losses[0]} → {losses[-1]}; held-out {reference}", flush=True)
    rows = [study(fmt, plain, adapter, batches, reference) for fmt in args.formats.split(",")]
    (STUDY / "results.json").write_text(json.dumps({"reference": reference, "rows": rows}, indent=2))
    print("\n| base | held-out loss |\n| --- | --- |")
    for label, value in reference.items():
        print(f"| {label} | {value:.4f} |")
    print(
        "\n| format | base | + adapter unmerged | merged | --requantize | --min-retention 0.9 "
        "(modules unquantized) | how |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['format']} | {r['base']:.4f} | {r['unmerged']:.4f} | {r['merged']:.4f} | "
            f"{r['requantized']:.4f} | {r['min_retention']:.4f} ({r['unquantized_modules']}) | {r['how']} |"
        )
    print(
        "\n| format | module | ρ median | ρ min | codes changed (median) |\n| --- | --- | --- | --- | --- |"
    )
    for r in rows:
        for kind, (med, low, changed) in r["retention"].items():
            print(f"| {r['format']} | {kind} | {med:.4f} | {low:.4f} | {100 * changed:.1f} % |")


if __name__ == "__main__":
    main()
