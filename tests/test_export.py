"""export --for: each target's load formula, applied as its source states it to what export writes,
gives PEFT's own ΔW for every adapter kind the factories make.

The formulas are written here from the targets' sources (docs/export.md cites them), not from
lorasurgery's code:
- vLLM (peft_helper.py): one scale lora_alpha/r (lora_alpha/√r with use_rslora) for every module;
  the pattern-aware release takes rank_pattern/alpha_pattern per module as PEFT does;
- SGLang (lora.py / lora_config.py): one scale lora_alpha/r, use_rslora not read; q/k/v (and
  gate/up) lora_A are concatenated, so one rank; target_modules reduced to leaf names;
- llama.cpp (llama-adapter.h get_scale, llama-graph.cpp): (adapter.lora.alpha / ne0(lora_b))·B@A,
  token_embd's lora_a transposed; q/k rows permuted by convert_hf_to_gguf's LlamaModel.permute.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from factories import (
    make_adapter,
    make_gpt2,
    make_llama,
    peft_delta_weights,
    peft_merged_state_dict,
    relative_error,
)
from safetensors.torch import load_file

from lorasurgery.commands.export.export import export_adapter

PREFIX = "base_model.model."
TOL = 1e-5


# ----------------------------------------------------------------------------------- target formulas


def _folder_factors(folder):
    """{module: (A, B, kind)} as vLLM's parse_fine_tuned_lora_name reads adapter_model.safetensors."""
    tensors = load_file(folder / "adapter_model.safetensors")
    found: dict[str, dict] = {}
    for name, t in tensors.items():
        name = name.removeprefix(PREFIX)
        if name.endswith(".lora_A.weight"):
            found.setdefault(name[: -len(".lora_A.weight")], {})["A"] = t
        elif name.endswith(".lora_B.weight"):
            found.setdefault(name[: -len(".lora_B.weight")], {})["B"] = t
        elif name.endswith(".lora_embedding_A"):
            found.setdefault(name[: -len(".lora_embedding_A")], {})["A"] = t
            found[name[: -len(".lora_embedding_A")]]["embedding"] = True
        elif name.endswith(".lora_embedding_B"):
            found.setdefault(name[: -len(".lora_embedding_B")], {})["B"] = t
        else:
            raise AssertionError(f"unexpected tensor {name} in an export for serving")
    return found


def _in_base_layout(delta_out_in, entry, fan_in_fan_out):
    # B@A is (out, in) for Linear/Conv1D, (dim, vocab) for an embedding; PEFT's ΔW is in the base layout
    return delta_out_in.T if entry.get("embedding") or fan_in_fan_out else delta_out_in


def vllm_deltas(folder, pattern_aware: bool = False):
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (
        not config.get("use_dora")
        and not config.get("modules_to_save")
        and config.get("bias", "none") == "none"
    )
    r, alpha = config["r"], config["lora_alpha"]

    def scaling(rank, a):
        return a / math.sqrt(rank) if config.get("use_rslora") else a / rank

    def match(pattern, name):  # vLLM's _match_pattern: PEFT's get_pattern_key rule
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    deltas = {}
    for module, e in _folder_factors(folder).items():
        scale = scaling(r, alpha)
        if pattern_aware and (config.get("rank_pattern") or config.get("alpha_pattern")):
            rank = match(config.get("rank_pattern") or {}, module) or r
            a = match(config.get("alpha_pattern") or {}, module)
            scale = scaling(rank, alpha if a is None else a)
        assert e["A"].shape[0] <= max(
            [r, *(config.get("rank_pattern") or {}).values()]
        )  # max_lora_rank check
        deltas[module] = _in_base_layout(
            scale * (e["B"].double() @ e["A"].double()), e, config["fan_in_fan_out"]
        )
    return deltas


def sglang_deltas(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]  # LoRAAdapter.scaling; use_rslora never read
    leaves = {name.split(".")[-1] for name in config["target_modules"]}
    deltas = {}
    for module, e in _folder_factors(folder).items():
        assert e["A"].shape[0] == config["r"], "stacked q/k/v and gate/up buffers need one rank"
        assert module.rsplit(".", 1)[-1] in leaves
        deltas[module] = _in_base_layout(
            scale * (e["B"].double() @ e["A"].double()), e, config["fan_in_fan_out"]
        )
    return deltas


def hf_permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llamacpp_deltas(path):
    """{llama.cpp tensor name: ΔW in GGUF's row layout} as llama.cpp applies the file."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    alpha = float(value("adapter.lora.alpha"))
    tensors = {t.name: torch.from_numpy(np.array(t.data)).double() for t in reader.tensors}
    deltas = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rank = b.shape[-1]  # ne[0] of lora_b
        scale = alpha / rank
        if name.startswith("token_embd"):
            deltas[name] = scale * (a @ b.T)  # (vocab, dim): row t is B @ a[t]
        else:
            deltas[name] = scale * (b @ a)  # (out, in)
    return deltas


def _llama_expected(base, expected, config):
    """PEFT's ΔW renamed and permuted the way llama.cpp stores the base weights."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    out = {}
    for module, delta in expected.items():
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        leaf = module.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            delta = hf_permute(delta, config["num_attention_heads"], config["num_attention_heads"])
        elif leaf == "k_proj":
            delta = hf_permute(delta, config["num_attention_heads"], config["num_key_value_heads"])
        out[name] = delta
    return out


# ------------------------------------------------------------------------------------------- cases

LLAMA_CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora_patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"],
        rank_pattern={"k_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "lm_head": 5},
    ),
    "multi_rank": dict(
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 7, "up_proj": 2},
    ),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_every_target_formula_gives_peft_delta(llama, tmp_path, case):
    adapter = make_adapter(llama, tmp_path / "adapter", seed=3, **LLAMA_CASES[case])
    expected, _ = peft_delta_weights(llama, adapter)
    config = json.loads((llama / "config.json").read_text())
    for target in ("vllm", "sglang", "peft", "llama.cpp"):
        out = tmp_path / ("x.gguf" if target == "llama.cpp" else target)
        report = export_adapter(adapter, target, out, base=llama)
        assert report.max_error < 1e-6
        if target == "llama.cpp":
            got, want = llamacpp_deltas(out), _llama_expected(llama, expected, config)
        elif target == "sglang":
            got, want = sglang_deltas(out), expected
        elif target == "vllm":
            got, want = vllm_deltas(out), expected
            for module, delta in vllm_deltas(out, pattern_aware=True).items():
                assert relative_error(delta, expected[module]) < TOL, (target, module)
        else:  # PEFT itself reloads the normalised folder
            got, _ = peft_delta_weights(llama, out)
            want = expected
        assert set(got) == set(want), target
        for name in want:
            assert relative_error(got[name], want[name]) < TOL, (target, name)


def test_gpt2_conv1d_folders(tmp_path):
    base = make_gpt2(tmp_path / "gpt2")
    adapter = make_adapter(
        base,
        tmp_path / "a",
        model_kind="gpt2",
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["c_attn", "c_proj"],
        rank_pattern={"c_proj": 2},
    )
    expected, _ = peft_delta_weights(base, adapter, model_kind="gpt2")
    for target, formula in (("vllm", vllm_deltas), ("sglang", sglang_deltas)):
        export_adapter(adapter, target, tmp_path / target)
        got = formula(tmp_path / target)
        assert set(got) == set(expected)
        for name, delta in expected.items():
            assert relative_error(got[name], delta) < TOL, (target, name)
    export_adapter(adapter, "peft", tmp_path / "peft")
    got, _ = peft_delta_weights(base, tmp_path / "peft", model_kind="gpt2")
    for name, delta in expected.items():
        assert relative_error(got[name], delta) < TOL


def test_dora_with_base_is_the_effective_update(llama, tmp_path):
    adapter = make_adapter(
        llama, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]
    )
    merged = peft_merged_state_dict(llama, [adapter])
    base_sd = load_file(llama / "model.safetensors")
    report = export_adapter(adapter, "vllm", tmp_path / "v", base=llama)
    got = vllm_deltas(tmp_path / "v")
    for m in report.modules:
        assert m.method == "dora→lora"
        true = merged[m.name + ".weight"].double() - base_sd[m.name + ".weight"].double()
        # the reported error is the exact error of what vLLM computes against PEFT's W' − W
        assert relative_error(got[m.name], true) == pytest.approx(m.relative_error, rel=1e-3, abs=1e-7)
        # and it is the optimum at this rank (Eckart–Young)
        S = torch.linalg.svdvals(true)
        assert m.relative_error == pytest.approx(
            float(S[4:].square().sum().sqrt() / S.square().sum().sqrt()), rel=1e-3
        )
    # the plain LoRA at full rank carries W' − W exactly
    full = export_adapter(adapter, "peft", tmp_path / "p")
    assert full.max_error == 0.0
    export_adapter(adapter, "llama.cpp", tmp_path / "d.gguf", base=llama, max_rank=32)
    config = json.loads((llama / "config.json").read_text())
    exact = {
        m.name: merged[m.name + ".weight"].double() - base_sd[m.name + ".weight"].double()
        for m in report.modules
    }
    want = _llama_expected(llama, exact, config)
    got = llamacpp_deltas(tmp_path / "d.gguf")
    for name in want:
        assert relative_error(got[name], want[name]) < TOL


def test_max_rank_truncates_optimally(llama, tmp_path):
    adapter = make_adapter(
        llama,
        tmp_path / "a",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
    )
    expected, _ = peft_delta_weights(llama, adapter)
    report = export_adapter(adapter, "vllm", tmp_path / "v", max_rank=3)
    got = vllm_deltas(tmp_path / "v")
    for m in report.modules:
        S = torch.linalg.svdvals(expected[m.name].double())
        optimum = float(S[3:].square().sum().sqrt() / S.square().sum().sqrt())
        assert m.rank_out == min(m.rank_in, 3)
        assert m.relative_error == pytest.approx(optimum, rel=1e-4, abs=1e-6)
        assert relative_error(got[m.name], expected[m.name]) == pytest.approx(optimum, rel=1e-4, abs=1e-6)
    # SGLang: one rank for all, the rank-2 modules padded exactly
    export_adapter(adapter, "sglang", tmp_path / "s", max_rank=3)
    got = sglang_deltas(tmp_path / "s")
    for m in report.modules:
        if m.rank_in == 2:
            assert relative_error(got[m.name], expected[m.name]) < TOL


def test_plain_factors_are_kept_byte_for_byte(llama, tmp_path):
    adapter = make_adapter(llama, tmp_path / "a", r=4, lora_alpha=8)
    export_adapter(adapter, "vllm", tmp_path / "v")
    source, out = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "v" / "adapter_model.safetensors"),
    )
    assert set(source) == set(out)
    for key in source:
        assert torch.equal(source[key], out[key])
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == 2.0


def _vendored_converter():
    import os
    from pathlib import Path

    folder = os.environ.get("LLAMA_CPP_DIR")
    path = Path(folder) / "convert_lora_to_gguf.py" if folder else None
    if path is None or not path.is_file():
        pytest.skip("LLAMA_CPP_DIR (llama.cpp's source, e.g. llama-cpp-python's vendor/llama.cpp) not set")
    return path


@pytest.mark.parametrize("case", ["plain", "multi_rank"])
def test_gguf_equals_llamacpp_converter(llama, tmp_path, case):
    """For adapters the converter handles, our GGUF's tensors and alpha equal what it writes."""
    import subprocess
    import sys

    converter = _vendored_converter()
    adapter = make_adapter(llama, tmp_path / "a", seed=5, **LLAMA_CASES[case])
    theirs = tmp_path / "theirs.gguf"
    subprocess.run(
        [
            sys.executable,
            str(converter),
            str(adapter),
            "--base",
            str(llama),
            "--outfile",
            str(theirs),
            "--outtype",
            "f32",
        ],
        check=True,
        capture_output=True,
    )
    export_adapter(adapter, "llama.cpp", tmp_path / "ours.gguf", base=llama)
    import gguf

    readers = [gguf.GGUFReader(p) for p in (theirs, tmp_path / "ours.gguf")]
    tensors = [{t.name: np.array(t.data) for t in r.tensors} for r in readers]
    assert set(tensors[0]) == set(tensors[1])
    for name in tensors[0]:
        assert tensors[0][name].dtype == tensors[1][name].dtype and np.array_equal(
            tensors[0][name], tensors[1][name]
        ), name
    alphas = [float(r.get_field("adapter.lora.alpha").contents()) for r in readers]
    assert alphas[0] == alphas[1]
