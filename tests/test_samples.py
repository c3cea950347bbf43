"""The shipped samples: small, loadable by PEFT, and regenerated identically by their script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasurgery.io import open_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
FOLDERS = ["base", "finetuned", "lora_qv_r8", "rslora_all_r16", "dora_qv_r8"]
ADAPTERS = ["lora_qv_r8", "rslora_all_r16", "dora_qv_r8"]


def weights_of(folder: Path) -> Path:
    return folder / (
        "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors"
    )


def normalized_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):  # PEFT writes a set: order varies by hash seed
        config["target_modules"] = sorted(config["target_modules"])
    return config


def test_samples_are_small_and_complete():
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total <= 10 * 2**20, total
    for name in FOLDERS:
        assert weights_of(SAMPLES / name).is_file(), name


@pytest.mark.parametrize("name", ADAPTERS)
def test_sample_adapters_load_in_peft_without_missing_keys(name):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(SAMPLES / "base")
    model = peft.PeftModel.from_pretrained(base, str(SAMPLES / name))
    ids = torch.arange(32).reshape(1, 32)
    with torch.no_grad():
        assert not torch.allclose(
            model(ids).logits, LlamaForCausalLM.from_pretrained(SAMPLES / "base")(ids).logits
        )


@pytest.mark.slow
def test_regenerating_the_samples_reproduces_them(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in FOLDERS:
        shipped, fresh = (
            open_checkpoint(weights_of(SAMPLES / name)),
            open_checkpoint(weights_of(tmp_path / name)),
        )
        assert shipped.tensors.keys() == fresh.tensors.keys(), name
        for key, info in shipped.tensors.items():
            assert (info.dtype, info.shape) == (fresh.tensors[key].dtype, fresh.tensors[key].shape)
            a, b = shipped.read(key).double(), fresh.read(key).double()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, key, float((a - b).abs().max()))
        config = "adapter_config.json" if name in ADAPTERS else "config.json"
        assert normalized_config(SAMPLES / name / config) == normalized_config(tmp_path / name / config)
