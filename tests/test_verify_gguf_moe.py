"""`lorasurgery verify` of a merged GGUF of an MoE model (docs/verify.md "Merged GGUF", "MoE experts").

Tiny real Qwen3-MoE, Qwen2-MoE (a shared expert beside the routed ones) and Mixtral (transformers 5:
fused 3-D expert parameters, saved split per expert as transformers writes them) with a real PEFT
adapter on q/k and on both fused expert parameters (target_parameters, every factor random), merged
by PEFT (merge_and_unload + save_pretrained) and converted by llama.cpp's own convert_hf_to_gguf.py,
which stacks each projection's experts into one ffn_{gate,up,down}_exps tensor (Mixtral's q/k rows
permuted as Llama's). verify reads every expert back under the base's names and the merge lands, in
f32 and Q8_0, against the base stored split per expert and the same base stored fused (gate_up_proj
read back as the gate and up stacks concatenated). The merge with the expert LoRA dropped is
`missing` on exactly the expert tensors; gpt-oss, whose converter's expert layout verify does not
undo, is refused by name. The converter and its runner are tests/test_verify_gguf.py's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import DID_NOT_LAND, LANDED, assert_refused, verify
from factories import randomize_adapter, save_tiny_tokenizer, tiny_moe
from safetensors.torch import load_file, save_file
from test_verify_gguf import RUNNER, converter

peft = pytest.importorskip("peft")


def to_gguf(model: Path, out: Path, outtype: str) -> Path:
    """convert_hf_to_gguf.py of `model`, with a tokenizer of fewer tokens than tiny_moe's 64 rows."""
    save_tiny_tokenizer(model, vocab_size=60)
    command = [sys.executable, "-c", RUNNER, str(converter()), str(model), "--outtype", outtype]
    result = subprocess.run([*command, "--outfile", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def peft_merge(kind: str, root: Path, model=None) -> tuple[Path, Path, Path]:
    """(base, adapter, merged) of a tiny MoE `kind` (or `model`): PEFT's adapter on q/k and the fused
    experts."""
    model = tiny_moe(kind) if model is None else model
    model.save_pretrained(root / "base")
    torch.manual_seed(2)
    config = peft.LoraConfig(
        target_modules=["q_proj", "k_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        r=3,
        lora_alpha=6,
    )
    wrapped = peft.get_peft_model(model, config)
    randomize_adapter(wrapped, seed=2, a_std=0.2)
    wrapped.save_pretrained(root / "adapter")
    wrapped.merge_and_unload().save_pretrained(root / "merged")
    return root / "base", root / "adapter", root / "merged"


@pytest.fixture(scope="module", params=["qwen3-moe", "qwen2-moe", "mixtral"])
def moe(request, tmp_path_factory):
    """(base, adapter, merged) of a tiny MoE of that kind, PEFT's merge saved split per expert."""
    converter()
    return peft_merge(request.param, tmp_path_factory.mktemp(f"verify-gguf-{request.param}"))


def fused_base(base: Path, out: Path) -> Path:
    """The base with its experts stored fused (gate_up_proj (E, 2·I, H), down_proj (E, H, I)): the
    state dict transformers 5 loads it into, saved as it is."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_moe_merge_lands_expert_by_expert(moe, tmp_path, outtype):
    base, adapter, merged = moe
    artifact = to_gguf(merged, tmp_path / f"merged-{outtype}.gguf", outtype)
    code, report = verify(base, adapter, artifact)
    assert code == LANDED and report["landed"], report
    assert not report["changed"] and not report["extra"], report
    experts = {c["tensor"] for c in report["checks"] if ".experts." in c["tensor"]}
    config = json.loads((base / "config.json").read_text())
    count = config.get("num_experts") or config["num_local_experts"]
    assert len(experts) == count * 3, experts  # every expert's gate, up and down
    worst = {"f32": 1e-6, "f16": 1e-3}[outtype]
    for check in report["checks"]:
        assert check["relative_error"] < worst and abs(check["retention"] - 1) < worst, check


def test_moe_fused_base_lands(moe, tmp_path):
    """The same GGUF against the base stored fused: gate_up_proj read back as the gate and up stacks
    concatenated (gate first), down_proj as its stack."""
    base, adapter, merged = moe
    fused = fused_base(base, tmp_path / "fused")
    code, report = verify(fused, adapter, to_gguf(merged, tmp_path / "merged.gguf", "f32"))
    assert code == LANDED and report["landed"] and not report["changed"] and not report["extra"], report
    names = {c["tensor"] for c in report["checks"] if ".experts." in c["tensor"]}
    assert names == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}


def test_moe_expert_lora_dropped_is_missing(moe, tmp_path):
    """The merge with every expert tensor back at the base's value: each expert `missing`, the
    attention landed, against both the split and the fused base."""
    base, adapter, merged = moe
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    tensors = load_file(broken / "model.safetensors")
    original = load_file(base / "model.safetensors")
    for name in [n for n in tensors if ".experts." in n]:
        tensors[name] = original[name]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    artifact = to_gguf(broken, tmp_path / "broken.gguf", "f32")
    for checked in (base, fused_base(base, tmp_path / "fused")):
        code, report = verify(checked, adapter, artifact)
        assert code == DID_NOT_LAND and not report["landed"], report
        verdicts = {c["tensor"]: c["verdict"] for c in report["checks"]}
        assert {v for n, v in verdicts.items() if ".experts." in n} == {"missing"}, verdicts
        assert {v for n, v in verdicts.items() if ".experts." not in n} == {"landed"}, verdicts


def test_qwen3_moe_q8_0_experts_land(tmp_path):
    """Q8_0 experts (rows of 32: tiny_moe's rows of 16 are written F16, llama.cpp's block is 32) are
    decoded and land within their codes' grid."""
    import gguf
    import transformers

    converter()
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    base, adapter, merged = peft_merge("qwen3-moe", tmp_path, model)
    artifact = to_gguf(merged, tmp_path / "merged.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(artifact).tensors}
    assert {types[f"blk.0.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")} == {"Q8_0"}, types
    # split per expert (each expert's rows of a stack, on that stack's grid), then stored fused (the
    # gate and up stacks rebuilt into gate_up_proj, each part on its own stack's grid)
    for checked, count in ((base, 4 * 3), (fused_base(base, tmp_path / "fused"), 2)):
        code, report = verify(checked, adapter, artifact)
        assert code == LANDED and report["landed"] and not report["changed"] and not report["extra"], report
        experts = [c for c in report["checks"] if ".experts." in c["tensor"]]
        assert len(experts) == count
        for check in experts:
            assert check["relative_error"] < 3e-2 and abs(check["retention"] - 1) < 3e-2, check


def test_gpt_oss_merged_gguf_is_refused_by_name(tmp_path):
    """gpt-oss's converter writes its interleaved gate_up_proj (and biases) in a layout verify does not
    undo: refused, naming the architecture, nothing written, inputs untouched."""
    converter()
    base, adapter, merged = peft_merge("gpt-oss", tmp_path)
    artifact = to_gguf(merged, tmp_path / "merged.gguf", "f32")
    assert_refused(["verify", base, adapter, artifact], "GptOssForCausalLM", inputs=[base, adapter, artifact])
