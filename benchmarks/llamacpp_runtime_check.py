"""Runtime check: llama.cpp itself (llama-cpp-python) runs our GGUF LoRA on real SmolLM2-135M and its
logits match PEFT's forward.

The base is converted to an f32 GGUF by llama.cpp's own convert_hf_to_gguf.py (from llama-cpp-python's
source package: --llama-cpp or LLAMA_CPP_DIR); the adapters are real PEFT adapters (plain; rsLoRA with
rank/alpha patterns; DoRA converted with --base at full rank) exported with `lorasurgery export --for
llama.cpp`. For each, the same token ids go through llama.cpp (base + LoRA) and through PEFT
(PeftModel.from_pretrained on the original adapter), both in float32.

Tolerance, dtype-aware: llama.cpp and torch sum in different orders, so even the base alone differs by
rounding (the KV cache is kept in f32 too: llama.cpp's default f16 cache alone moves the logits by 1e-2). The check passes when, for every adapter, max|logits_llama.cpp − logits_PEFT| is within
4× that base-only floor (plus 1e-4 of the logits' range), and far below the adapter's own effect
max|logits_PEFT − logits_base| (else the LoRA could be silently ignored and still "match").

    python benchmarks/llamacpp_runtime_check.py --llama-cpp /path/to/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import ADAPTER_KINDS, WORK, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402

TEXT = "The surgeon carefully folded the low-rank update into the weights, and the model"


def base_gguf(base: Path, llama_cpp: Path) -> Path:
    out = WORK / "smollm2-f32.gguf"
    if out.is_file():
        return out
    if not (base / "tokenizer.json").is_file():
        smollm2_tokenizer().save_pretrained(base)  # convert_hf_to_gguf.py needs the tokenizer
    subprocess.run(
        [
            sys.executable,
            str(llama_cpp / "convert_hf_to_gguf.py"),
            str(base),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def llamacpp_logits(model: Path, tokens: list[int], lora: Path | None):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model),
        lora_path=str(lora) if lora else None,
        n_ctx=128,
        logits_all=True,
        verbose=False,
        n_threads=2,
        n_batch=128,
        type_k=0,  # GGML_TYPE_F32: the default f16 KV cache alone moves SmolLM2's logits by 1e-2
        type_v=0,
    )
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return logits


def peft_logits(base: Path, tokens: list[int], adapter: Path | None):
    import torch
    from factories import load_base

    model = load_base(base, "llama")
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="vendor/llama.cpp folder"
    )
    args = parser.parse_args()
    if not args.llama_cpp:
        sys.exit("give llama.cpp's source folder via --llama-cpp or LLAMA_CPP_DIR")
    import numpy as np
    from factories import make_adapter

    from lorasurgery.commands.export.export import export_adapter

    base = smollm2_checkpoint()
    model = base_gguf(base, Path(args.llama_cpp))
    tokens = smollm2_tokenizer()(TEXT)["input_ids"]
    floor = float(np.abs(llamacpp_logits(model, tokens, None) - peft_logits(base, tokens, None)).max())
    plain_logits = peft_logits(base, tokens, None)
    print(f"{len(tokens)} tokens; base alone: max|llama.cpp - transformers| = {floor:.3g}")

    root = WORK / "runtime-adapters"
    kinds = {
        "plain": (ADAPTER_KINDS["plain"], {}),
        "rslora_patterns": (ADAPTER_KINDS["rslora_patterns"], {}),
        "dora": (ADAPTER_KINDS["dora"], {"max_rank": 576}),
    }
    passed = True
    for name, (kwargs, export_options) in kinds.items():
        folder = root / name
        if not (folder / "adapter_model.safetensors").is_file():
            make_adapter(base, folder, seed=2, **kwargs)
        gguf_path = root / f"{name}.gguf"
        report = export_adapter(folder, "llama.cpp", gguf_path, base=base, force=True, **export_options)
        ours = llamacpp_logits(model, tokens, gguf_path)
        reference = peft_logits(base, tokens, folder)
        diff = float(np.abs(ours - reference).max())
        effect = float(np.abs(reference - plain_logits).max())
        scale = float(reference.max() - reference.min())
        tolerance = 4 * floor + 1e-4 * scale
        ok = diff <= tolerance and diff < 0.05 * effect
        passed &= ok
        print(
            f"{name:16s} max|llama.cpp - PEFT| = {diff:.3g} (tolerance {tolerance:.3g}); adapter effect "
            f"{effect:.3g}; export error {report.max_error:.2g}; {'PASS' if ok else 'FAIL'}"
        )
    print("runtime check", "PASSED" if passed else "FAILED")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
