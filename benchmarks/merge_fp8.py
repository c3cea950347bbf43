"""`lorasurgery merge` into a fine-grained FP8 base against the same merge into bf16, and the peer route.

docs/design.md §8 targets for a quantized base: ≤ 1.3× the time of our own merge of the same model
stored in bf16, ≤ 0.3× the peer route (transformers' dequantizing load + PEFT `merge_and_unload` +
`save_pretrained`), peak RSS within the streaming bound.

The models are Llamas with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, vocab
49152, tied embeddings) and random bf16 weights, their linear layers quantized as transformers' and
DeepSeek's quantizers do (128×128 blocks, amax/448, e4m3 codes, weight_scale_inv); an all-linear
r=16 PEFT adapter with random factors. transformers cannot load the 576-wide model quantized on the
CPU (576 is not a multiple of 128: its dequantizer refuses partial blocks), so the peer route runs
on a twin with hidden 512, against our merge of that twin.

    python benchmarks/merge_fp8.py [--runs 5]

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


def quantize(W):
    """(e4m3 codes, float32 weight_scale_inv) of W in BLOCK×BLOCK blocks, edge blocks partial."""
    import torch

    W = W.float()
    out, inner = W.shape
    rows, cols = -(-out // BLOCK), -(-inner // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK)
    padded[:out, :inner] = W
    blocks = padded.reshape(rows, BLOCK, cols, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    codes = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(padded.shape)[:out, :inner]
    return codes.to(torch.float8_e4m3fn), scale


def build(hidden: int) -> tuple[Path, Path, Path]:
    """(bf16 model, its FP8 twin, an all-linear r=16 adapter) with hidden size `hidden`."""
    import torch
    import transformers
    from factories import make_adapter
    from safetensors.torch import load_file, save_file

    plain, fp8, adapter = (WORK / f"fp8-bench-{hidden}-{kind}" for kind in ("bf16", "fp8", "lora"))
    if not (plain / "model.safetensors").is_file():
        torch.manual_seed(0)
        heads = hidden // 64
        config = transformers.LlamaConfig(
            vocab_size=49152,
            hidden_size=hidden,
            intermediate_size=1536,
            num_hidden_layers=30,
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
                stored[name], stored[f"{name}_scale_inv"] = quantize(W)
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
    args = parser.parse_args()
    plain, fp8, adapter = build(576)
    plain_512, fp8_512, adapter_512 = build(512)
    out = WORK / "fp8-bench-out"
    results: dict[str, list] = {}
    for base, lora in ((fp8, adapter), (fp8_512, adapter_512)):  # fills the structure cache, unmeasured
        run_measured(lorasurgery("merge", base, lora, "-o", out, "--force"))
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        measure("bf16 (576)", lorasurgery("merge", plain, adapter, "-o", out), out, results)
        measure("fp8 (576)", lorasurgery("merge", fp8, adapter, "-o", out), out, results)
        measure("fp8 (512)", lorasurgery("merge", fp8_512, adapter_512, "-o", out), out, results)
        peer = [sys.executable, "-c", PEER_CHILD, str(fp8_512), str(adapter_512), str(out)]
        measure("peer fp8 (512)", peer, out, results)
    shutil.rmtree(out, ignore_errors=True)
    time = {label: median(s for s, _ in values) for label, values in results.items()}
    rss = {label: median(r for _, r in values) for label, values in results.items()}
    for label in results:
        print(f"{label:>16}: {time[label]:.2f} s, {rss[label] / 1e9:.3f} GB (medians)")
    print(f"FP8 / bf16 merge time: {time['fp8 (576)'] / time['bf16 (576)']:.3f} (target ≤ 1.3)")
    print(
        f"ours / peer route: time {time['fp8 (512)'] / time['peer fp8 (512)']:.3f} (target ≤ 0.3), "
        f"peak RSS {rss['fp8 (512)'] / rss['peer fp8 (512)']:.3f}"
    )


if __name__ == "__main__":
    main()
