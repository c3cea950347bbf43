"""The shipped samples: small, loadable by PEFT, and still what their script makes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
FOLDERS = ["base", "finetuned", "lora_qv_r8", "rslora_all_r16", "dora_qv_r8"]
ADAPTERS = ["lora_qv_r8", "rslora_all_r16", "dora_qv_r8"]
CHECK = SAMPLES / "regeneration_check.json"


def weights_of(folder: Path) -> Path:
    return folder / (
        "adapter_model.safetensors" if (folder / "adapter_config.json").exists() else "model.safetensors"
    )


def test_samples_are_small_and_complete():
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total <= 10 * 2**20, total
    for name in FOLDERS:
        assert weights_of(SAMPLES / name).is_file(), name


EXPECTED_CONFIG = {
    "lora_qv_r8": {"r": 8, "lora_alpha": 16, "use_rslora": False, "use_dora": False},
    "rslora_all_r16": {
        "r": 16,
        "use_rslora": True,
        "use_dora": False,
        "rank_pattern": {"down_proj": 4},
        "alpha_pattern": {"down_proj": 8},
    },
    "dora_qv_r8": {"r": 8, "lora_alpha": 16, "use_dora": True},
}
EXPECTED_TARGETS = {
    "lora_qv_r8": {"q_proj", "v_proj"},
    "rslora_all_r16": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "dora_qv_r8": {"q_proj", "v_proj"},
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_sample_adapter_configs_are_as_documented(name):
    config = json.loads((SAMPLES / name / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "sample_adapters/base"
    for key, value in EXPECTED_CONFIG[name].items():
        assert config[key] == value, key
    tensors = load_file(SAMPLES / name / "adapter_model.safetensors")
    targets = {k.split(".")[-3] for k in tensors if k.endswith(".lora_A.weight")}
    assert targets == EXPECTED_TARGETS[name]
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in tensors}
    assert layers == {0, 1, 2, 3}
    for key, value in tensors.items():
        if ".lora_A." in key:
            rank = 4 if ".down_proj." in key else config["r"]
            assert value.shape == (rank, 64 if ".down_proj." not in key else 176), key
        if ".lora_B." in key:
            assert value.abs().max() > 1e-3, key  # trained: PEFT initialises B to zero
    assert name in (SAMPLES / "README.md").read_text()


def test_base_is_a_gqa_llama_and_the_finetune_changed_every_weight():
    config = json.loads((SAMPLES / "base" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (256, 64, 4)
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    base = load_file(SAMPLES / "base" / "model.safetensors")
    tuned = load_file(SAMPLES / "finetuned" / "model.safetensors")
    assert base.keys() == tuned.keys()
    assert all(v.dtype == torch.float32 for v in base.values())
    for key, value in base.items():
        assert not torch.equal(value, tuned[key]), key


@pytest.mark.parametrize("name", ADAPTERS)
def test_sample_adapters_load_in_peft_without_missing_keys(name):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(SAMPLES / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(SAMPLES / name))
    key_warnings = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert not key_warnings, key_warnings
    with warnings.catch_warnings():  # base_model_name_or_path 'renamed' to the absolute path
        warnings.simplefilter("ignore")
        fresh = peft.get_peft_model(
            LlamaForCausalLM.from_pretrained(SAMPLES / "base"),
            peft.LoraConfig.from_pretrained(str(SAMPLES / name)),
        )

    result = peft.set_peft_model_state_dict(fresh, load_file(SAMPLES / name / "adapter_model.safetensors"))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".default" in k]
    ids = torch.arange(32).reshape(1, 32)
    with torch.no_grad():
        assert not torch.allclose(
            model(ids).logits, LlamaForCausalLM.from_pretrained(SAMPLES / "base")(ids).logits
        )


def _sample_module(name: str):
    spec = importlib.util.spec_from_file_location(name, SAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# make_samples.py --check (the recipe, 5 steps per model in float64, saved in float32) against the
# record. Measured across CPU kernels (ATEN_CPU_CAPABILITY=default, avx2, avx512; MKL_CBWR=COMPATIBLE
# and AVX2; ONEDNN_MAX_CPU_ISA=AVX2) and 1, 2 and 3 threads: losses within 2.1e-16 (relative), saved
# tensors bit-identical. Every real change of the recipe tried moved some loss by 1.2e-4 or more
# and some tensor norm by 4.7e-3 or more (sample_adapters/README.md).
CHECK_RTOL = 1e-7


def test_the_recipe_still_makes_these_samples(tmp_path):
    """make_samples.py still makes these samples, checked where rounding cannot grow.

    A full regeneration (300 float32 AdamW steps) amplifies another CPU's rounding to a few percent
    of every weight (sample_adapters/check_full_regeneration.py compares that one, for
    maintainers). --check runs the same recipe for a few steps in float64: the files it writes
    match the shipped folders in names, shapes, dtypes and configs exactly, and its losses and
    per-tensor sums and norms match the record within CHECK_RTOL."""
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), "--check", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _sample_module("make_samples").structure_differences(SAMPLES, tmp_path) == []
    found, expected = json.loads(result.stdout), json.loads(CHECK.read_text())
    assert found["steps"] == expected["steps"] == 5
    assert found["losses"].keys() == expected["losses"].keys() == set(FOLDERS)
    assert found["tensors"].keys() == expected["tensors"].keys() == set(FOLDERS)
    for name in FOLDERS:
        assert found["losses"][name] == pytest.approx(expected["losses"][name], rel=CHECK_RTOL, abs=0), name
        assert found["tensors"][name].keys() == load_file(weights_of(SAMPLES / name)).keys(), name
        for key, (total, norm) in expected["tensors"][name].items():
            fresh_total, fresh_norm = found["tensors"][name][key]
            assert abs(fresh_norm - norm) <= CHECK_RTOL * norm, (name, key, fresh_norm, norm)
            assert abs(fresh_total - total) <= CHECK_RTOL * norm, (name, key, fresh_total, total)
    assert found["losses"]["base"][-1] < found["losses"]["base"][0] - 0.5  # it trains


def _copy_samples(root: Path) -> Path:
    for name in FOLDERS:
        shutil.copytree(SAMPLES / name, root / name)
    return root


def test_structure_differences_names_each_kind_of_difference(tmp_path):
    make_samples = _sample_module("make_samples")
    copy = _copy_samples(tmp_path / "copy")
    config = copy / "dora_qv_r8" / "adapter_config.json"
    document = json.loads(config.read_text())
    document["target_modules"].reverse()  # a set: order is PEFT's hash order
    document.update(peft_version="9.9.9", some_new_option=None)  # a newer PEFT's stamp and defaults
    config.write_text(json.dumps(document))
    assert make_samples.structure_differences(SAMPLES, copy) == []

    document.update(lora_alpha=17, use_dora=False)
    config.write_text(json.dumps(document))
    tensors = load_file(copy / "lora_qv_r8" / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key.replace("q_proj", "k_proj")] = tensors.pop(key)
    tensors[next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))] = torch.zeros(3, 3)
    save_file(tensors, copy / "lora_qv_r8" / "adapter_model.safetensors")
    tensors = load_file(copy / "base" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].double()
    save_file(tensors, copy / "base" / "model.safetensors")
    (copy / "finetuned" / "byte_tokens.json").unlink()
    problems = make_samples.structure_differences(SAMPLES, copy)
    assert len(problems) == 7, problems
    assert [p.split(":")[0] for p in problems] == ["base"] + ["lora_qv_r8"] * 3 + [
        "dora_qv_r8/adapter_config.json"
    ] * 2 + ["finetuned"], problems


def test_the_full_regeneration_check_tells_changed_samples_and_curves_apart(tmp_path):
    """check_full_regeneration.py (for maintainers) passes the shipped samples and their README
    curves, and names an adapter that learned nothing and a curve off the README's."""
    full = _sample_module("check_full_regeneration")
    documented = full.documented_curves()
    assert set(documented) == set(FOLDERS)
    curves = {name: [first, *[last] * 10] for name, (first, last) in documented.items()}
    assert full.curve_problems(curves, documented) == []
    curves["dora_qv_r8"][-1] += 0.6  # the mean of the last ten moves by 0.06
    assert [p.split(":")[0] for p in full.curve_problems(curves, documented)] == ["dora_qv_r8"]

    copy = _copy_samples(tmp_path)
    problems, losses = full.model_problems(SAMPLES, copy)
    assert problems == [] and losses.keys() == set(FOLDERS)
    assert all(shipped == fresh for by_text in losses.values() for shipped, fresh in by_text.values())
    tensors = load_file(copy / "rslora_all_r16" / "adapter_model.safetensors")
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in tensors.items()}, copy / "rslora_all_r16" / "adapter_model.safetensors")  # fmt: skip
    problems, _ = full.model_problems(SAMPLES, copy)
    assert [p.split(":")[0] for p in problems] == ["rslora_all_r16"] * 3, problems
    assert [re.search(r"loss on (\w+) ", p)[1] for p in problems] == ["gpl", "apache", "apache"]
    assert problems[2].endswith(f"base {losses['base']['apache'][0]:.4f}"), problems  # learned nothing
