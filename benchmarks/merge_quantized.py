"""`lorasurgery merge` into a fine-grained FP8 base (unquantized and --requantize) against the same merge
into bf16, and the peer route.

docs/design.md §8 targets for a quantized base: ≤ 1.3× the time of our own merge of the same model
stored in bf16, ≤ 0.3× the peer route (transformers' dequantizing load + PEFT `merge_and_unload` +
`save_pretrained`), peak RSS within the streaming bound (4 × the largest tensor + 0.5 GB).

Models (`--model`), random bf16 weights whose linear layers are quantized as transformers' and
DeepSeek's quantizers do (128×128 blocks, amax/448, e4m3 codes, weight_scale_inv: the library's own
requantizer, lorasurgery.io.fp8.quantize), `quantization_config` {"quant_method": "fp8",
"weight_block_size": [128, 128]}, and an all-linear r=16 PEFT adapter with random factors:
  1.1b     (default) merge_vs_peft.py's synthetic Llama with TinyLlama-1.1B's shapes (hidden 2048,
           intermediate 5632, 22 layers, vocab 32000, untied, 2 GB shards), built by its builder.
           Every dimension is a multiple of 128, so the peer route runs on the same FP8 model.
  smollm2  SmolLM2-135M's shapes (hidden 576, intermediate 1536, 30 layers, vocab 49152, tied).
           transformers cannot load it quantized on the CPU (576 is not a multiple of 128: its
           dequantizer refuses partial blocks), so the peer route runs on a twin with hidden 512,
           against our merge of that twin.

    python benchmarks/merge_quantized.py [--model 1.1b|smollm2] [--runs 5] [--layers N]

`--requantize` is timed beside the unquantized merge (SPEC §8 asks ≤ 1.3× of it too; it adds the
block amax, the encoding, a second decode and the retention's sums per merged element: docs/merge.md
has the argument), and again with LORASURGERY_NATIVE=0 (the torch code instead of the compiled
kernels of lorasurgery/native: the same bytes, checked after the runs). Besides the medians it prints each ratio's range over the runs (each run's own
ratio: the routes of one run ran back to back), the spread a loaded machine leaves. `--layers 2
--runs 1` is a smoke run.
After the runs, our FP8 merge is compared with the peer route's output on a few merged weights
(both bf16: max |difference|, and each one's distance to the float64 merge).

Inputs are built once under benchmarks/_work/ (git-ignored; the 1.1B bf16 model and adapter are
merge_vs_peft.py's own); each merge is a child process of its own (wall time and peak RSS), the
order reversed every other run, the inputs in the page cache before each.
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
from merge_vs_peft import (  # noqa: E402
    SYNTHETIC,
    _in_child,
    error_vs_exact,
    largest_tensor_bytes,
    make_adapter,
    make_synthetic,
    settle,
)

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = 128
QUANTIZATION_CONFIG = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}

PEER_CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, max_shard_size="2GB")
"""


def quantize(name: str, W) -> dict:
    """{name: e4m3 codes, name_scale_inv: float32 scales} of W in BLOCK×BLOCK blocks (edge blocks
    partial), by the library's FP8 quantizer (the one merge --requantize uses)."""
    from lorasurgery.io import fp8
    from lorasurgery.io.quantization import DequantizedInfo

    codes, scale = _fp8_infos(name, tuple(W.shape))
    info = DequantizedInfo(
        name, "F32", codes.shape, Path(name), -1, -1, format="fp8", codes=codes,
        parts=(("scale_inv", scale),), block=(BLOCK, BLOCK),
    )  # fmt: skip
    return fp8.quantize(info, W.float(), None)


def _fp8_infos(name: str, shape: tuple[int, ...]):
    """The stored codes and scale tensors of weight `name` (their file and offsets unused)."""
    from lorasurgery.io.safetensors_format import TensorInfo

    grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    return (
        TensorInfo(name, "F8_E4M3", shape, Path(name), 0, 0),
        TensorInfo(f"{name}_scale_inv", "F32", grid, Path(name), 0, 0),
    )


def to_fp8(plain: Path, out: Path) -> Path:
    """`plain` with its linear weights stored as block FP8 (the rest byte for byte), its sharding
    kept within 2 GB, one tensor in memory at a time."""
    from lorasurgery.io import SafetensorsWriter, TensorSpec, atomic_output_dir, open_checkpoint, plan_shards

    if (out / "config.json").is_file():
        return out
    base = open_checkpoint(plain)
    specs = []
    for name, info in base.tensors.items():
        if LINEAR.search(name):
            specs += [TensorSpec(i.name, i.dtype, i.shape) for i in _fp8_infos(name, info.shape)]
        else:
            specs.append(TensorSpec.like(info))
    with atomic_output_dir(out) as folder:
        with SafetensorsWriter(folder, plan_shards(specs, max_shard_bytes=2 * 10**9)) as writer:
            for name in base.tensors:
                tensors = quantize(name, base.read(name)) if LINEAR.search(name) else {name: base.read(name)}
                for key, tensor in tensors.items():
                    writer.write(key, tensor)
        config = json.loads((plain / "config.json").read_text())
        config["quantization_config"] = QUANTIZATION_CONFIG
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_1_1b(layers: int) -> tuple[Path, Path, Path]:
    """(bf16 model, its FP8 twin, an all-linear r=16 adapter): merge_vs_peft.py's synthetic 1.1B."""
    stem = "llama-1.1b" if layers == SYNTHETIC["num_hidden_layers"] else f"llama-1.1b-{layers}layers"
    plain = make_synthetic(WORK / f"{stem}-bf16", layers=layers)
    adapter = _in_child(make_adapter, plain, WORK / f"{stem}-lora-all-r16")
    return plain, to_fp8(plain, WORK / f"{stem}-fp8"), adapter


def build_smollm2(hidden: int, layers: int) -> tuple[Path, Path, Path]:
    """(bf16 model, its FP8 twin, an all-linear r=16 adapter) with SmolLM2-135M's shapes but hidden
    size `hidden`."""
    import torch
    import transformers
    from factories import make_adapter as make_test_adapter

    plain, adapter = (WORK / f"fp8-bench-{hidden}x{layers}-{kind}" for kind in ("bf16", "lora"))
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
    if not (adapter / "adapter_model.safetensors").is_file():
        make_test_adapter(plain, adapter, target_modules=TARGETS, r=16, lora_alpha=32)
    return plain, to_fp8(plain, WORK / f"fp8-bench-{hidden}x{layers}-fp8-128"), adapter


def cases(model: str, layers: int) -> tuple[dict, tuple[str, str], Path, Path]:
    """({label: (command, output folder, inputs)}, (our FP8 label, the peer route's label) compared,
    the bf16 base whose largest tensor sets the RSS bound, the FP8 base with its adapter)."""
    out = WORK / "fp8-bench-out"
    runs = {}

    def ours(label, base, adapter, *extra, env=()):
        folder = out / re.sub(r"\W+", "-", label).strip("-")
        command = lorasurgery("merge", base, adapter, "-o", folder, *extra)
        runs[label] = ([*(["env", *env] if env else []), *command], folder, (base, adapter))

    def peer(label, base, adapter):
        folder = out / re.sub(r"\W+", "-", label).strip("-")
        runs[label] = (
            [sys.executable, "-c", PEER_CHILD, str(base), str(adapter), str(folder)],
            folder,
            (base, adapter),
        )

    if model == "1.1b":
        plain, fp8, adapter = build_1_1b(layers)
        compared = ("fp8", "peer")
    else:
        plain, fp8, adapter = build_smollm2(576, layers)
        plain_512, fp8_512, adapter_512 = build_smollm2(512, layers)
        compared = ("fp8 (512)", "peer (512)")
    ours("bf16", plain, adapter)
    ours("fp8", fp8, adapter)
    ours("fp8 --requantize", fp8, adapter, "--requantize")
    # the same without the native kernels (lorasurgery/native): the torch code, the same bytes
    ours("fp8 --requantize, torch only", fp8, adapter, "--requantize", env=("LORASURGERY_NATIVE=0",))
    if model == "1.1b":
        peer("peer", fp8, adapter)
    else:
        ours("fp8 (512)", fp8_512, adapter_512)
        peer("peer (512)", fp8_512, adapter_512)
    return runs, compared, plain, fp8 if model == "1.1b" else fp8_512


def compare(ours: Path, peer: Path, count: int = 4) -> None:
    """Print max |ours − peer| on `count` merged weights spread over the layers (both bf16)."""
    from lorasurgery.io import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(peer)
    names = [n for n in a.tensors if LINEAR.search(n)]
    for name in names[:: max(1, len(names) // count)][:count]:
        x, y = a.read(name), b.read(name)
        d = float((x.float() - y.float()).abs().max())
        print(
            f"  {name}: {a.tensors[name].dtype} vs {b.tensors[name].dtype}, max |ours − peer| = {d:.3g} "
            f"(max |W'| {float(x.float().abs().max()):.3g}; {int((x != y).sum())} of {x.numel()} differ)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["1.1b", "smollm2"], default="1.1b")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, help="default: the model's own (22, 30); fewer for a smoke run")
    args = parser.parse_args()
    layers = args.layers or (SYNTHETIC["num_hidden_layers"] if args.model == "1.1b" else 30)
    runs, (ours_label, peer_label), plain, fp8 = cases(args.model, layers)
    for label, (command, _, _) in runs.items():  # fills the structure cache, unmeasured
        if not label.startswith("peer"):
            run_measured([*command, "--force"])
    results: dict[str, list] = {}
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        for label in list(runs)[:: -1 if run % 2 else 1]:
            command, folder, inputs = runs[label]
            shutil.rmtree(folder, ignore_errors=True)
            settle(*inputs)
            seconds, rss = run_measured(command)
            results.setdefault(label, []).append((seconds, rss))
            print(f"  {label}: {seconds:.2f} s, {rss / 1e9:.3f} GB", flush=True)
    per_run = {label: [s for s, _ in values] for label, values in results.items()}

    def spread(a: str, b: str) -> str:
        ratios = sorted(x / y for x, y in zip(per_run[a], per_run[b]))
        return f"per run {ratios[0]:.3f}–{ratios[-1]:.3f}"

    time = {label: median(s for s, _ in values) for label, values in results.items()}
    rss = {label: median(r for _, r in values) for label, values in results.items()}
    print(f"\n== {args.model}, {layers} layers, {args.runs} alternating runs (medians)")
    for label in results:
        times = sorted(per_run[label])
        print(
            f"{label:>20}: {time[label]:.2f} s (runs {times[0]:.2f}–{times[-1]:.2f}), {rss[label] / 1e9:.3f} GB"
        )
    print(f"FP8 / bf16 merge time: {time['fp8'] / time['bf16']:.3f} (target ≤ 1.3; {spread('fp8', 'bf16')})")
    print(
        f"FP8 --requantize / bf16 merge time: {time['fp8 --requantize'] / time['bf16']:.3f} "
        f"(target ≤ 1.3; {spread('fp8 --requantize', 'bf16')})"
    )
    print(
        f"FP8 / peer route ({ours_label} vs {peer_label}): time {time[ours_label] / time[peer_label]:.3f} "
        f"(target ≤ 0.3; {spread(ours_label, peer_label)}), peak RSS {rss[ours_label] / rss[peer_label]:.3f}"
    )
    print(
        f"FP8 --requantize without the native kernels / bf16 merge time: "
        f"{time['fp8 --requantize, torch only'] / time['bf16']:.3f} ({spread('fp8 --requantize, torch only', 'bf16')})"
    )
    if args.model == "1.1b":  # smollm2's peer runs on a hidden-512 twin: no such ratio
        print(
            f"FP8 --requantize / peer route: time {time['fp8 --requantize'] / time[peer_label]:.3f} "
            f"({spread('fp8 --requantize', peer_label)})"
        )
    largest = largest_tensor_bytes(plain)
    bound = 4 * largest + 500 * 10**6
    for label in ("bf16", "fp8", "fp8 --requantize"):
        print(
            f"peak RSS {label}: {rss[label] / 1e9:.3f} GB vs the streaming bound 4 × {largest / 1e9:.3f} GB "
            f"+ 0.5 GB = {bound / 1e9:.3f} GB ({'within' if rss[label] <= bound else 'OVER'})"
        )
    native, torch_only = (runs[label][1] for label in ("fp8 --requantize", "fp8 --requantize, torch only"))
    same = all(
        (native / f.name).read_bytes() == f.read_bytes() for f in sorted(torch_only.glob("*.safetensors"))
    )
    print(
        f"--requantize with and without the native kernels: {'the same bytes' if same else 'DIFFERENT BYTES'}"
    )
    ours_out, peer_out = runs[ours_label][1], runs[peer_label][1]
    print(f"our FP8 merge vs the peer route's (last run's outputs, {ours_label} vs {peer_label}):")
    compare(ours_out, peer_out)
    adapter = runs[peer_label][2][1]
    exact = error_vs_exact(fp8, adapter, {"ours": ours_out, "peer": peer_out})
    print(
        f"  Σ‖W' − W'_exact‖_F on sampled modules (float64 merge on the dequantized base): "
        f"ours {exact['ours']:.4g}, peer {exact['peer']:.4g}"
    )
    shutil.rmtree(WORK / "fp8-bench-out", ignore_errors=True)


if __name__ == "__main__":
    main()
