"""`lorasurgery verify` of a merged GGUF model through the CLI (docs/verify.md "Merged GGUF").

The merged GGUF is made by llama.cpp's own convert_hf_to_gguf.py (LLAMA_CPP_DIR: llama.cpp's source,
e.g. llama-cpp-python's vendor/llama.cpp; the tests skip without it) from a tiny real Llama merged
with a real PEFT adapter by PEFT (merge_and_unload + save_pretrained), in f32, f16 and Q8_0: each
lands, q_proj / k_proj included (the converter permutes their rows; verify undoes it). The base
converted alone is `missing`, the adapter merged twice `applied twice`. And the GGUF LoRA llama.cpp's
convert_lora_to_gguf.py writes (another tool's conversion) lands by llama.cpp's rules.

Beyond Llama: tiny Qwen2 (q/k/v biases), Qwen3 (q_norm/k_norm) and GPT-2 (Conv1D weights the
converter transposes, c_attn fused) merged by PEFT and converted land, in f32 and Q8_0, and with
--fuse-qkv (q/k/v written as one attn_qkv, split back); one module dropped from the merge is
`missing`, the base converted alone too. `--text` runs the GGUF through transformers' GGUF loader:
within F32's tolerance for a correct merge, beyond it for the dropped module, skipped with the reason
where transformers leaves weights unread (a fused attn_qkv). Mistral (q/k permuted as Llama's) and
Phi-3 (qkv_proj / gate_up_proj stored fused) land in f32 (Mistral's --text skipped: transformers'
GGUF loader has no Mistral map). Another architecture is refused by name.
The converter's own code converts every tensor; only its BPE pre-tokenizer detection is answered
(the tiny tokenizer is no released model's, so its hash is unknown to the converter).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clihelp import DID_NOT_LAND, LANDED, assert_refused, run_cli, verify
from factories import (
    make_adapter,
    make_bert,
    make_causal_lm,
    make_gpt2,
    make_llama,
    merged_checkpoint,
    save_tiny_tokenizer,
)
from safetensors.torch import load_file, save_file

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def converter() -> Path:
    folder = os.environ.get("LLAMA_CPP_DIR")
    path = Path(folder) / "convert_hf_to_gguf.py" if folder else None
    if path is None or not path.is_file():
        pytest.skip("LLAMA_CPP_DIR (llama.cpp's source, e.g. llama-cpp-python's vendor/llama.cpp) not set")
    pytest.importorskip("sentencepiece")  # the converter imports it for every Llama
    return path


# convert_hf_to_gguf.py as a user runs it, its BPE pre-tokenizer detection answered "gpt-2": the tiny
# tokenizer's hash is no released model's (the Qwen and GPT-2 converters read a BPE vocabulary).
RUNNER = """
import os, runpy, sys
converter = sys.argv[1]
sys.path.insert(0, os.path.dirname(converter))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = sys.argv[1:]
runpy.run_path(converter, run_name="__main__")
"""


def to_gguf(model: Path, out: Path, outtype: str, *options: str) -> Path:
    """convert_hf_to_gguf.py of the safetensors folder `model` (the tiny tokenizer beside it)."""
    save_tiny_tokenizer(model, vocab_size=120)  # < the models' 128 rows: Qwen's tokenizer adds one
    config = json.loads((model / "config.json").read_text())
    if "n_positions" in config and "n_ctx" not in config:  # GPT-2's converter reads n_ctx, as gpt2's
        config["n_ctx"] = config["n_positions"]  # released config.json has it (transformers 5 drops it)
        (model / "config.json").write_text(json.dumps(config))
    if config.get("architectures") == ["Phi3ForCausalLM"]:  # its converter reads a sentencepiece
        tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())  # tokenizer.model
        tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"  # unless it names Phi-4's BPE tokenizer
        (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    command = [sys.executable, "-c", RUNNER, str(converter()), str(model), "--outtype", outtype]
    result = subprocess.run([*command, "--outfile", str(out), *options], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
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


# ------------------------------------------------------------------------- beyond Llama, and --text

ARCHS = {  # model_kind for factories, modules the adapter targets, the one dropped in the broken merge
    "qwen2": ("auto", TARGETS, "model.layers.1.self_attn.q_proj.weight"),
    "qwen3": ("auto", TARGETS, "model.layers.1.self_attn.k_proj.weight"),
    "gpt2": ("gpt2", ["c_attn", "c_proj", "c_fc"], "transformer.h.1.mlp.c_fc.weight"),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    """(root, base, adapter, merged, text) of a tiny base of that architecture, PEFT's merge of a real
    adapter (f32), and a text in the base's byte tokens."""
    converter()
    kind = request.param
    model_kind, targets, _ = ARCHS[kind]
    root = tmp_path_factory.mktemp(f"verify-gguf-{kind}")
    if kind == "gpt2":
        base = make_gpt2(root / "base")
    else:
        base = make_causal_lm(root / "base", kind)
    (base / "byte_tokens.json").write_text('{"byte_tokens": true}')  # ASCII bytes < the 128 rows
    options = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    adapter = make_adapter(
        base, root / "adapter", model_kind=model_kind, seed=2, target_modules=targets, **options
    )
    merged = merged_checkpoint(base, adapter, root / "merged", dtype=torch.float32, model_kind=model_kind)
    text = root / "text.txt"
    text.write_text("a surgeon folds the low-rank update into the weights, and the model speaks " * 2)
    return kind, root, base, adapter, merged, text


def dropped(merged: Path, base: Path, name: str, out: Path) -> Path:
    """A copy of the merged folder with tensor `name` back at the base's value: one module dropped."""
    shutil.copytree(merged, out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = load_file(base / "model.safetensors")[name]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_other_architectures_land(arch, outtype):
    """PEFT's merge converted by llama.cpp lands tensor by tensor, and --text through transformers'
    GGUF loader stays within the file type's tolerance (Q8_0: its codes' grid, as BF16)."""
    kind, root, base, adapter, merged, text = arch
    artifact = to_gguf(merged, root / f"merged-{outtype}.gguf", outtype)
    code, report = verify(base, adapter, artifact, "--text", text)
    assert code == LANDED and report["landed"], report
    assert report["artifact_kind"] == "merged GGUF" and not report["changed"] and not report["extra"]
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(ARCHS[kind][1])
    worst = {"f32": 1e-6, "q8_0": 3e-2}[outtype]
    for check in report["checks"]:
        assert check["relative_error"] < worst and abs(check["retention"] - 1) < worst, check
    logits = report["text"]
    assert logits["passed"] and not logits["skipped"] and logits["tokens"] == len(text.read_bytes())
    assert logits["dtype"] == {"f32": "F32", "q8_0": "BF16"}[outtype], logits
    assert logits["max_difference"] < (1e-5 if outtype == "f32" else 2e-2), logits


def test_other_architectures_dropped_module_is_missing(arch, tmp_path):
    """One module dropped from the merge: that tensor `missing`, every other landed; the logits of the
    GGUF beyond F32's tolerance."""
    kind, root, base, adapter, merged, text = arch
    name = ARCHS[kind][2]
    broken = dropped(merged, base, name, tmp_path / "broken")
    code, report = verify(base, adapter, to_gguf(broken, tmp_path / "broken.gguf", "f32"), "--text", text)
    assert code == DID_NOT_LAND and not report["landed"]
    verdicts = {c["tensor"]: c["verdict"] for c in report["checks"]}
    assert verdicts.pop(name) == "missing" and set(verdicts.values()) == {"landed"}, report["checks"]
    logits = report["text"]
    assert not logits["passed"] and logits["max_difference"] > logits["tolerance"], logits


def test_gpt2_base_converted_alone_is_missing(tmp_path):
    """GPT-2's base converted alone: every touched tensor `missing` (read transposed back, so the
    untouched Conv1D weights of an untargeted module compare equal, not `changed`)."""
    converter()
    base = make_gpt2(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", model_kind="gpt2", seed=2)  # c_attn only
    shutil.copytree(base, tmp_path / "copy")
    code, report = verify(base, adapter, to_gguf(tmp_path / "copy", tmp_path / "base.gguf", "f32"))
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {"missing"}, report
    assert not report["changed"] and not report["extra"], report


@pytest.mark.parametrize("kind", ["mistral", "phi3"])
def test_mistral_and_phi3_land(kind, tmp_path):
    """Mistral (converted by the converter's LlamaModel: q/k rows permuted) and Phi-3 (qkv_proj and
    gate_up_proj stored fused, as attn_qkv and ffn_up) land; --text runs Phi-3 through transformers'
    GGUF loader, and is skipped for Mistral, naming it: transformers' loader has no Mistral map."""
    converter()
    base = make_causal_lm(tmp_path / "base", kind)
    (base / "byte_tokens.json").write_text('{"byte_tokens": true}')
    targets = TARGETS if kind == "mistral" else ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    adapter = make_adapter(base, tmp_path / "adapter", model_kind="auto", seed=2, target_modules=targets)
    merged = merged_checkpoint(base, adapter, tmp_path / "merged", dtype=torch.float32, model_kind="auto")
    text = tmp_path / "text.txt"
    text.write_text("the update lands in every row " * 2)
    code, report = verify(base, adapter, to_gguf(merged, tmp_path / "merged.gguf", "f32"), "--text", text)
    assert code == LANDED and report["landed"] and not report["changed"] and not report["extra"], report
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(targets)
    assert all(c["relative_error"] < 1e-6 for c in report["checks"]), report["checks"]
    if kind == "phi3":
        assert report["text"]["passed"] and report["text"]["max_difference"] < 1e-5, report["text"]
    else:
        assert "mistral" in report["text"]["skipped"] and not report["text"]["passed"], report["text"]


@pytest.mark.parametrize("kind", ["qwen2", "llama-bias"])
def test_fused_qkv_is_split_back(kind, tmp_path):
    """convert_hf_to_gguf.py --fuse-qkv writes q, k and v (weights and biases: Qwen2's, a Llama's with
    attention_bias, whose q/k rows the converter permutes first) as one attn_qkv: read back row by
    row they land, every bias unchanged; transformers' GGUF loader does not split it, so --text is
    skipped with that reason (the tensor checks decide)."""
    converter()
    if kind == "qwen2":
        base, model_kind = make_causal_lm(tmp_path / "base", "qwen2"), "auto"
    else:
        base, model_kind = make_llama(tmp_path / "base", attention_bias=True), "llama"
        tensors = load_file(base / "model.safetensors")  # transformers initialises biases to 0:
        generator = torch.Generator().manual_seed(3)  # random ones, so that their row order shows
        for name in [n for n in tensors if n.endswith(".bias")]:
            tensors[name] = torch.randn(tensors[name].shape, generator=generator)
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (base / "byte_tokens.json").write_text('{"byte_tokens": true}')
    adapter = make_adapter(base, tmp_path / "adapter", model_kind=model_kind, seed=2, target_modules=TARGETS)
    merged = merged_checkpoint(base, adapter, tmp_path / "merged", dtype=torch.float32, model_kind=model_kind)
    artifact = to_gguf(merged, tmp_path / "fused.gguf", "f32", "--fuse-qkv")
    import gguf

    assert "blk.0.attn_qkv.weight" in {t.name for t in gguf.GGUFReader(artifact).tensors}
    text = tmp_path / "text.txt"
    text.write_text("the update lands in every row " * 2)
    code, report = verify(base, adapter, artifact, "--text", text)
    assert code == LANDED and report["landed"] and not report["changed"] and not report["extra"], report
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(TARGETS)
    assert "leaves" in report["text"]["skipped"] and "q_proj" in report["text"]["skipped"], report["text"]


def test_unsupported_architecture_and_wrong_base_are_refused(arch, llama, tmp_path):
    """A merged GGUF of an architecture verify does not undo the converter's transforms of is
    refused by name; a GGUF of another architecture than the base's too."""
    kind, root, base, adapter, merged, _ = arch
    artifact = root / "merged-f32.gguf"
    if not artifact.is_file():
        artifact = to_gguf(merged, artifact, "f32")
    bert = make_bert(tmp_path / "bert")
    bert_adapter = make_adapter(bert, tmp_path / "bert-adapter", model_kind="bert")
    assert_refused(
        ["verify", bert, bert_adapter, artifact], "BertModel", inputs=[bert, bert_adapter, artifact]
    )
    _, llama_base, llama_adapter, _ = llama
    assert_refused(
        ["verify", llama_base, llama_adapter, artifact],
        f"general.architecture is '{kind}', the base's is 'llama'",
        inputs=[llama_base, llama_adapter, artifact],
    )
