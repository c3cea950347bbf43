"""Each target's own formula, applied to what `export` writes for real SmolLM2-135M adapters, against PEFT.

For plain, rsLoRA + patterns, multi-rank and DoRA adapters (made by PEFT on the real model), export
--for vllm / sglang / llama.cpp, then apply vLLM's (global and pattern-aware), SGLang's and llama.cpp's
load formulas as their sources state them (tests/test_export.py) and compare with PEFT's ΔW per module:
`get_delta_weight` for LoRA, merged − base (`merge_and_unload`) for DoRA. Prints the worst relative
Frobenius error per adapter and target. DoRA is exported twice: at its own rank (the conversion error
is the optimum at that rank and is reported) and at full rank (--max-rank 576: exact).

    python benchmarks/export_check_smollm2.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import ADAPTER_KINDS, WORK, smollm2_checkpoint  # noqa: E402

KINDS = {
    "plain": (ADAPTER_KINDS["plain"], {}),
    # one pattern on a single layer too: a per-module rank the plain patterns do not reach
    "rslora_patterns": (
        {
            **ADAPTER_KINDS["rslora_patterns"],
            "rank_pattern": {"down_proj": 8, "layers.3.self_attn.q_proj": 4},
        },
        {},
    ),
    "multi_rank": (ADAPTER_KINDS["multi_rank"], {}),
    "dora": ({**ADAPTER_KINDS["dora"], "target_modules": ["q_proj", "v_proj", "down_proj"]}, {}),
    "dora_full_rank": (None, {"max_rank": 576}),
}


def main() -> None:
    import torch
    from factories import make_adapter, peft_delta_weights, peft_merged_state_dict, relative_error
    from safetensors.torch import load_file
    from test_export import _llama_expected, llamacpp_deltas, sglang_deltas, vllm_deltas

    from lorasurgery.commands.export.export import export_adapter

    base = smollm2_checkpoint()
    config = json.loads((base / "config.json").read_text())
    root = WORK / "export-check"
    base_sd = None
    print(f"{'adapter':16s} {'target':22s} {'worst rel. error':>16s} {'reported':>10s}")
    for name, (kwargs, options) in KINDS.items():
        folder = root / ("dora" if name.startswith("dora") else name)
        if kwargs is not None and not (folder / "adapter_model.safetensors").is_file():
            make_adapter(base, folder, seed=4, **kwargs)
        if name.startswith("dora"):
            merged = peft_merged_state_dict(base, [folder])
            base_sd = base_sd or load_file(base / "model.safetensors")
            lora_modules = {k[: -len(".weight")] for k in merged if k.endswith("_proj.weight")}
            expected = {
                m: merged[m + ".weight"].double() - base_sd[m + ".weight"].double()
                for m in lora_modules
                if not torch.equal(merged[m + ".weight"], base_sd[m + ".weight"])
            }
        else:
            expected, _ = peft_delta_weights(base, folder)
        outputs = {}
        for target in ("vllm", "sglang", "llama.cpp"):
            out = root / f"{name}-{target}" if target != "llama.cpp" else root / f"{name}.gguf"
            report = export_adapter(folder, target, out, base=base, force=True, **options)
            outputs[target] = (out, report.max_error)
        # one formula at a time: each dict holds every module's dense ΔW
        formulas = [
            ("vLLM (global scale)", vllm_deltas, (outputs["vllm"][0],), outputs["vllm"][1]),
            ("vLLM (pattern-aware)", vllm_deltas, (outputs["vllm"][0], True), outputs["vllm"][1]),
            ("SGLang", sglang_deltas, (outputs["sglang"][0],), outputs["sglang"][1]),
            ("llama.cpp", llamacpp_deltas, (outputs["llama.cpp"][0],), outputs["llama.cpp"][1]),
        ]
        for label, formula, formula_args, reported in formulas:
            got = formula(*formula_args)
            want = _llama_expected(base, expected, config) if label == "llama.cpp" else expected
            assert set(got) == set(want), (name, label, set(got) ^ set(want))
            worst = max(relative_error(got[n], want[n]) for n in want)
            print(f"{name:16s} {label:22s} {worst:16.3g} {reported:10.3g}", flush=True)
            del got, want


if __name__ == "__main__":
    main()
