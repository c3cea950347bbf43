"""`lorasurgery verify` of a merged GGUF model through the CLI (docs/verify.md "Merged GGUF").

The merged GGUF is made by llama.cpp's own convert_hf_to_gguf.py (LLAMA_CPP_DIR: llama.cpp's source,
e.g. llama-cpp-python's vendor/llama.cpp; the tests skip without it) from a tiny real Llama merged
with a real PEFT adapter by PEFT (merge_and_unload + save_pretrained), in f32, f16 and Q8_0: each
lands, q_proj / k_proj included (the converter permutes their rows; verify undoes it). The base
converted alone is `missing`, the adapter merged twice `applied twice`. And the GGUF LoRA llama.cpp's
convert_lora_to_gguf.py writes (another tool's conversion) lands by llama.cpp's rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import DID_NOT_LAND, LANDED, run_cli, verify
from factories import make_adapter, make_llama, merged_checkpoint, save_tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def converter() -> Path:
    folder = os.environ.get("LLAMA_CPP_DIR")
    path = Path(folder) / "convert_hf_to_gguf.py" if folder else None
    if path is None or not path.is_file():
        pytest.skip("LLAMA_CPP_DIR (llama.cpp's source, e.g. llama-cpp-python's vendor/llama.cpp) not set")
    pytest.importorskip("sentencepiece")  # the converter imports it for every Llama
    return path


def to_gguf(model: Path, out: Path, outtype: str) -> Path:
    """convert_hf_to_gguf.py of the safetensors folder `model` (the tiny tokenizer beside it)."""
    save_tiny_tokenizer(model)
    subprocess.run(
        [sys.executable, str(converter()), str(model), "--outtype", outtype, "--outfile", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    converter()
    root = tmp_path_factory.mktemp("verify-gguf")
    base = make_llama(root / "base")
    adapter = make_adapter(base, root / "adapter", seed=2, target_modules=TARGETS)
    merged = merged_checkpoint(base, adapter, root / "merged", dtype=torch.float32)
    return root, base, adapter, merged


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_converted_peft_merge_lands(llama, outtype):
    root, base, adapter, merged = llama
    artifact = to_gguf(merged, root / f"merged-{outtype}.gguf", outtype)
    code, report = verify(base, adapter, artifact)
    assert code == LANDED and report["landed"], report
    assert report["artifact_kind"] == "merged GGUF" and not report["changed"] and not report["extra"]
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(TARGETS)
    worst = {"f32": 1e-6, "f16": 2e-3, "q8_0": 3e-2}[
        outtype
    ]  # the dtype's rounding of W + ΔW, relative to ΔW
    for check in report["checks"]:
        assert check["relative_error"] < worst and abs(check["retention"] - 1) < worst, check


def test_converted_base_is_missing_and_double_merge_twice(llama, tmp_path):
    root, base, adapter, merged = llama
    code, report = verify(base, adapter, to_gguf(base, tmp_path / "base.gguf", "f32"))
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {"missing"}
    twice = tmp_path / "twice"
    assert run_cli("merge", merged, adapter, "-o", twice, "-q").exit_code == 0
    shutil.copy(merged / "config.json", twice / "config.json")
    code, report = verify(base, adapter, to_gguf(twice, tmp_path / "twice.gguf", "f32"))
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {"applied twice"}, report


def test_llamacpp_converted_lora_lands(llama, tmp_path):
    """The GGUF LoRA llama.cpp's own convert_lora_to_gguf.py writes (q/k permuted by its converter)
    lands by llama.cpp's rules; the same file checked against another adapter does not."""
    root, base, adapter, _ = llama
    out = tmp_path / "theirs.gguf"
    subprocess.run(
        [
            sys.executable,
            str(converter().with_name("convert_lora_to_gguf.py")),
            str(adapter),
            "--base",
            str(base),
            "--outfile",
            str(out),
            "--outtype",
            "f32",
        ],
        check=True,
        capture_output=True,
    )
    code, report = verify(base, adapter, out)
    assert code == LANDED and report["target"] == "llama.cpp", report
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(TARGETS)
    other = make_adapter(base, tmp_path / "other", seed=9, target_modules=TARGETS)
    code, report = verify(base, other, out)
    assert code == DID_NOT_LAND and "landed" not in {c["verdict"] for c in report["checks"]}
