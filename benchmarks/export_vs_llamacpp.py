"""`export --for llama.cpp` next to llama.cpp's own convert_lora_to_gguf.py on real SmolLM2-135M adapters.

Both run as child processes on the same adapter, alternating, `--repeats` times; the medians and their
ratio are printed. Then both GGUF files are read back with gguf: same tensor names, bit-equal tensors
and the same adapter.lora.alpha for a plain adapter. For an rsLoRA + alpha_pattern adapter, llama.cpp's
formula (α / rank per tensor pair) is applied to both files and compared with PEFT's ΔW: the converter
writes lora_alpha as it is, so its file computes a different update; ours is exact.

The converter comes from llama-cpp-python's source package (vendor/llama.cpp, with gguf-py and
conversion/); give its folder with --llama-cpp or LLAMA_CPP_DIR.

    python benchmarks/export_vs_llamacpp.py --llama-cpp /path/to/llama_cpp_python-X/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import ADAPTER_KINDS, WORK, median, run_measured, smollm2_checkpoint  # noqa: E402


def make_adapters(base: Path) -> dict[str, Path]:
    from factories import make_adapter

    root = WORK / "export-adapters"
    kinds = {name: ADAPTER_KINDS[name] for name in ("plain", "rslora_patterns")}
    out = {}
    for name, kwargs in kinds.items():
        folder = root / name
        if not (folder / "adapter_model.safetensors").is_file():
            make_adapter(base, folder, seed=1, **kwargs)
        out[name] = folder
    return out


def read_gguf(path: Path):
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    alpha = float(fields["adapter.lora.alpha"].contents())
    return alpha, {t.name: np.array(t.data) for t in reader.tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), help="vendor/llama.cpp folder"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.llama_cpp or not (Path(args.llama_cpp) / "convert_lora_to_gguf.py").is_file():
        sys.exit(
            "give llama.cpp's source folder (with convert_lora_to_gguf.py) via --llama-cpp or LLAMA_CPP_DIR"
        )
    converter = Path(args.llama_cpp) / "convert_lora_to_gguf.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])

    base = smollm2_checkpoint()
    adapters = make_adapters(base)
    out = WORK / "export-gguf"
    out.mkdir(parents=True, exist_ok=True)

    def theirs(adapter: Path, name: str) -> list[str]:
        return [
            sys.executable,
            str(converter),
            str(adapter),
            "--base",
            str(base),
            "--outfile",
            str(out / f"{name}-llamacpp.gguf"),
            "--outtype",
            "f32",
        ]

    def ours(adapter: Path, name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "lorasurgery",
            "-q",
            "export",
            str(adapter),
            "--for",
            "llama.cpp",
            "--base",
            str(base),
            "-o",
            str(out / f"{name}-ours.gguf"),
            "--force",
        ]

    times = {"llama.cpp": [], "lorasurgery": []}
    for _ in range(args.repeats):
        times["llama.cpp"].append(run_measured(theirs(adapters["plain"], "plain"), env)[0])
        times["lorasurgery"].append(run_measured(ours(adapters["plain"], "plain"), env)[0])
    t_theirs, t_ours = median(times["llama.cpp"]), median(times["lorasurgery"])
    print(f"plain r=16 adapter on SmolLM2-135M (7 module types x 30 layers), median of {args.repeats}:")
    print(f"  convert_lora_to_gguf.py  {t_theirs:6.2f} s   {times['llama.cpp']}")
    print(f"  lorasurgery export       {t_ours:6.2f} s   {times['lorasurgery']}")
    print(f"  ratio ours/theirs        {t_ours / t_theirs:6.3f}")

    alpha_a, tensors_a = read_gguf(out / "plain-llamacpp.gguf")
    alpha_b, tensors_b = read_gguf(out / "plain-ours.gguf")
    import numpy as np

    same_names = set(tensors_a) == set(tensors_b)
    equal = same_names and all(
        tensors_a[n].dtype == tensors_b[n].dtype and np.array_equal(tensors_a[n], tensors_b[n])
        for n in tensors_a
    )
    print(
        f"  tensors: {len(tensors_a)} vs {len(tensors_b)}, same names {same_names}, bit-equal {equal}, alpha {alpha_a} vs {alpha_b}"
    )

    # Where the converter is wrong: rsLoRA and alpha_pattern.
    from factories import peft_delta_weights, relative_error
    from test_export import _llama_expected, llamacpp_deltas

    run_measured(theirs(adapters["rslora_patterns"], "rslora"), env)
    run_measured(ours(adapters["rslora_patterns"], "rslora"), env)
    import json

    config = json.loads((base / "config.json").read_text())
    expected, _ = peft_delta_weights(base, adapters["rslora_patterns"])
    want = _llama_expected(base, expected, config)
    for label, path in (
        ("convert_lora_to_gguf.py", out / "rslora-llamacpp.gguf"),
        ("lorasurgery export", out / "rslora-ours.gguf"),
    ):
        got = llamacpp_deltas(path)
        errors = [relative_error(got[n], want[n]) for n in want]
        print(
            f"  rsLoRA + patterns, llama.cpp's formula vs PEFT's ΔW, {label}: worst relative error {max(errors):.3g}"
        )


if __name__ == "__main__":
    main()
