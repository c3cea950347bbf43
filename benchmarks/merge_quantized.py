"""`lorasurgery merge` into a fine-grained FP8 base (unquantized and --requantize) against the same merge
into bf16, and the peer route.

docs/design.md §8 targets for a quantized base: ≤ 1.3× the time of our own merge of the same model
stored in bf16, ≤ 0.3× the peer route (transformers' dequantizing load + PEFT `merge_and_unload` +
`save_pretrained`), peak RSS within the streaming bound.

The models are Llamas with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, vocab
49152, tied embeddings) and random bf16 weights, their linear layers quantized as transformers' and
DeepSeek's quantizers do (128×128 blocks, amax/448, e4m3 codes, weight_scale_inv: the library's
own requantizer, lorasurgery.io.fp8.quantize); an all-linear
r=16 PEFT adapter with random factors. transformers cannot load the 576-wide model quantized on the
CPU (576 is not a multiple of 128: its dequantizer refuses partial blocks), so the peer route runs
on a twin with hidden 512, against our merge of that twin.

    python benchmarks/merge_quantized.py [--runs 5] [--layers 30]

`--requantize` is timed beside the unquantized merge (docs/design.md §8 has no target for it yet; it
adds a quantization and a second decode per merged tensor). `--layers 2 --runs 1` is a smoke run.

Inputs are built once under benchmarks/_work/ (git-ignored); each merge is a child process of its
own (wall time and peak RSS), the runs alternating.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import WORK, lorasurgery, median, run_measured  # noqa: E402

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 128

PEER_CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def quantize(name: str, W) -> dict:
    """{name: e4m3 codes, name_scale_inv: float32 scales} of W in BLOCK×BLOCK blocks (edge blocks
    partial), by the library's FP8 quantizer (the one merge --requantize uses)."""
    from lorasurgery.io import fp8
    from lorasurgery.io.quantization import DequantizedInfo
    from lorasurgery.io.safetensors_format import TensorInfo

    shape = tuple(W.shape)
    grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    codes = TensorInfo(name, "F8_E4M3", shape, Path(name), 0, 0)
    scale = TensorInfo(f"{name}_scale_inv", "F32", grid, Path(name), 0, 0)
    info = DequantizedInfo(
        name, "F32", shape, Path(name), -1, -1, format="fp8", codes=codes, parts=(("scale_inv", scale),),
        block=(BLOCK, BLOCK),
    )  # fmt: skip
    return fp8.quantize(info, W.float(), None)


def build(hidden: int, layers: int) -> tuple[Path, Path, Path]:
    """(bf16 model, its FP8 twin, an all-linear r=16 adapter) with hidden size `hidden`."""
    import torch
    import transformers
    from factories import make_adapter
    from safetensors.torch import load_file, save_file

    plain, fp8, adapter = (WORK / f"fp8-bench-{hidden}x{layers}-{kind}" for kind in ("bf16", "fp8", "lora"))
    if not (plain / "model.safetensors").is_file():
        torch.manual_seed(0)
        heads = hidden // 64
        config = transformers.LlamaConfig(
            vocab_size=49152,
            hidden_size=hidden,
            intermediate_size=1536,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=3 if heads % 3 == 0 else 4,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        )
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(plain)
    if not (fp8 / "model.safetensors").is_file():
        shutil.rmtree(fp8, ignore_errors=True)
        fp8.mkdir(parents=True)
        stored = {}
        for name, W in load_file(plain / "model.safetensors").items():
            if LINEAR.search(name):
                stored.update(quantize(name, W))
            else:
                stored[name] = W
        save_file(stored, fp8 / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((plain / "config.json").read_text())
        config["quantization_config"] = transformers.FineGrainedFP8Config(
            weight_block_size=(BLOCK, BLOCK)
        ).to_dict()
        (fp8 / "config.json").write_text(json.dumps(config, indent=2))
    if not (adapter / "adapter_model.safetensors").is_file():
        make_adapter(plain, adapter, target_modules=TARGETS, r=16, lora_alpha=32)
    return plain, fp8, adapter


def measure(label: str, command: list[str], out: Path, results: dict) -> None:
    shutil.rmtree(out, ignore_errors=True)
    seconds, rss = run_measured(command)
    results.setdefault(label, []).append((seconds, rss))
    print(f"  {label}: {seconds:.2f} s, {rss / 1e9:.3f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="30: SmolLM2-135M's; fewer for a smoke run")
    args = parser.parse_args()
    plain, fp8, adapter = build(576, args.layers)
    plain_512, fp8_512, adapter_512 = build(512, args.layers)
    out = WORK / "fp8-bench-out"
    results: dict[str, list] = {}
    for base, lora in ((fp8, adapter), (fp8_512, adapter_512)):  # fills the structure cache, unmeasured
        run_measured(lorasurgery("merge", base, lora, "-o", out, "--force"))
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        measure("bf16 (576)", lorasurgery("merge", plain, adapter, "-o", out), out, results)
        measure("fp8 (576)", lorasurgery("merge", fp8, adapter, "-o", out), out, results)
        requantize = lorasurgery("merge", fp8, adapter, "-o", out, "--requantize")
        measure("fp8 requantize (576)", requantize, out, results)
        measure("fp8 (512)", lorasurgery("merge", fp8_512, adapter_512, "-o", out), out, results)
        peer = [sys.executable, "-c", PEER_CHILD, str(fp8_512), str(adapter_512), str(out)]
        measure("peer fp8 (512)", peer, out, results)
    shutil.rmtree(out, ignore_errors=True)
    time = {label: median(s for s, _ in values) for label, values in results.items()}
    rss = {label: median(r for _, r in values) for label, values in results.items()}
    for label in results:
        print(f"{label:>20}: {time[label]:.2f} s, {rss[label] / 1e9:.3f} GB (medians)")
    print(f"FP8 / bf16 merge time: {time['fp8 (576)'] / time['bf16 (576)']:.3f} (target ≤ 1.3)")
    print(f"FP8 --requantize / bf16 merge time: {time['fp8 requantize (576)'] / time['bf16 (576)']:.3f}")
    print(
        f"ours / peer route: time {time['fp8 (512)'] / time['peer fp8 (512)']:.3f} (target ≤ 0.3), "
        f"peak RSS {rss['fp8 (512)'] / rss['peer fp8 (512)']:.3f}"
    )


if __name__ == "__main__":
    main()
