"""`lorasurgery verify` of adapter artifacts through the CLI (docs/verify.md "Adapter artifacts").

A tiny real Llama and real PEFT adapters (rank_pattern, alpha_pattern, rsLoRA, DoRA), every factor
randomised. Correct artifacts land (exit 0): `export --for vllm|sglang|peft|llama.cpp` outputs and
PEFT's own save_pretrained folder. Broken ones fail (exit 1) with the verdict that names the
failure; the expected factor c of "scaled by c" is PEFT's own scaling (LoraLayer.scaling) over the
target's formula, and GGUF files are read and rewritten with the `gguf` package itself.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelp import DID_NOT_LAND, LANDED, assert_refused, run_cli, verdicts, verify
from factories import make_adapter, make_llama, peft_delta_weights
from safetensors.torch import load_file, save_file

from lorasurgery.llamacpp import llama_unpermute

PATTERNS = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"down_proj": 3},
}


def export(adapter, target, out, base) -> Path:
    result = run_cli("export", adapter, "--for", target, "-o", out, "--base", base, "-q")
    assert result.exit_code == 0, result.stderr
    return Path(out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-adapter")
    base = make_llama(root / "base")
    adapter = make_adapter(base, root / "adapter", seed=3, **PATTERNS)
    _, scales = peft_delta_weights(base, adapter)  # PEFT's own scaling per module
    return root, base, adapter, {f"{k}.weight": v for k, v in scales.items()}


@pytest.mark.parametrize("target", ["vllm", "sglang", "peft", "llama.cpp"])
def test_exports_land_by_their_targets_rules(llama, target):
    root, base, adapter, scales = llama
    out = export(adapter, target, root / f"export-{target}{'.gguf' if target == 'llama.cpp' else ''}", base)
    args = [] if target == "llama.cpp" else ["--target", target]
    code, report = verify(base, adapter, out, *args)
    assert code == LANDED and report["landed"], report
    assert report["target"] == target and report["artifact_kind"] == f"adapter for {target}"
    assert set(verdicts(report)) == set(scales)
    for check in report["checks"]:
        assert check["relative_error"] < 1e-6 and abs(check["retention"] - 1) < 1e-6, check
    if target == "llama.cpp":
        assert "GGUF" in report["target_rule"]  # detected, and the rule said


def test_peft_save_pretrained_lands_and_is_the_default_target(llama):
    _, base, adapter, _ = llama
    code, report = verify(base, adapter, adapter)
    assert code == LANDED and report["target"] == "peft", report
    assert "without --target" in report["target_rule"]


def test_patterns_given_to_an_old_vllm_are_scaled(llama):
    """The adapter as trained, served by a vLLM that reads one lora_alpha/r (0.31 and older; 0.32 reads
    the patterns, tests/test_verify_releases.py): every module with a pattern is off by PEFT's scale
    over vLLM's, c = (α/r) / s_m."""
    _, base, adapter, scales = llama
    code, report = verify(base, adapter, adapter, "--target", "vllm==0.31")
    assert code == DID_NOT_LAND and not report["landed"]
    vllm_scale = PATTERNS["lora_alpha"] / PATTERNS["r"]
    for check in report["checks"]:
        c = vllm_scale / scales[check["tensor"]]
        assert check["verdict"] == label(c), check
        if check["verdict"] != "landed":
            assert check["scale"] == pytest.approx(c), check


def test_vllm_export_with_alpha_pattern_dropped_is_scaled(llama, tmp_path):
    """export --for vllm writes alpha_pattern for modules of another rank; a tool that drops it makes
    pattern-aware readers (PEFT, vLLM ≥ patterns) scale those modules by r/R."""
    root, base, adapter, scales = llama
    out = export(adapter, "vllm", tmp_path / "vllm", base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["alpha_pattern"], config  # v_proj has rank 2 against r = 4
    config["alpha_pattern"] = {}
    (out / "adapter_config.json").write_text(json.dumps(config))
    code, report = verify(base, adapter, out, "--target", "peft")
    assert code == DID_NOT_LAND
    theirs, _ = peft_delta_weights(base, out)  # what PEFT computes from the broken folder
    ours, _ = peft_delta_weights(base, adapter)
    for name, verdict in verdicts(report).items():
        module = name.removesuffix(".weight")
        c = float((theirs[module] * ours[module]).sum() / (ours[module] ** 2).sum())
        assert ".v_proj." in name or math.isclose(c, 1.0, rel_tol=1e-6)
        assert verdict == label(c), (name, verdict, c)


def label(c: float) -> str:
    """The verdict docs/verify.md names for an update landed c times."""
    if math.isclose(c, 1.0, rel_tol=1e-6):
        return "landed"
    return "applied twice" if abs(c - 2) < 0.01 else f"scaled by {c:.4g}"


def test_a_module_dropped_from_an_export_is_missing(llama, tmp_path):
    root, base, adapter, _ = llama
    out = export(adapter, "sglang", tmp_path / "sglang", base)
    tensors = load_file(out / "adapter_model.safetensors")
    dropped = [k for k in tensors if "layers.1.self_attn.o_proj" in k]
    assert dropped
    for key in dropped:
        del tensors[key]
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    code, report = verify(base, adapter, out, "--target", "sglang")
    assert code == DID_NOT_LAND
    found = verdicts(report)
    assert found.pop("model.layers.1.self_attn.o_proj.weight") == "missing"
    assert set(found.values()) == {"landed"}


def test_vllm_refuses_dora(tmp_path):
    base = make_llama(tmp_path / "base")
    dora = make_adapter(base, tmp_path / "dora", use_dora=True)
    code, report = verify(base, dora, dora)  # PEFT's rules: DoRA by the merge kernel, dense
    assert code == LANDED, report
    assert {c["kind"] for c in report["checks"]} == {"dora"}
    code, report = verify(base, dora, dora, "--target", "vllm")
    assert code == DID_NOT_LAND and any("use_dora" in p for p in report["config"]), report["config"]


# ------------------------------------------------------------------------------------ GGUF LoRA


def edited_gguf(source: Path, out: Path, edit) -> Path:
    """A copy of the GGUF LoRA `source` with its tensors passed through `edit({name: array})`, written
    by the gguf package's own writer with the source's architecture and alpha."""
    import gguf

    reader = gguf.GGUFReader(source)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    edit(tensors)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(
        gguf.Keys.Adapter.LORA_ALPHA, reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents()
    )
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def gguf_lora(llama):
    root, base, adapter, _ = llama
    return export(adapter, "llama.cpp", root / "lora.gguf", base)


O_PROJ = "model.layers.0.self_attn.o_proj.weight"  # square, rows not permuted


def test_gguf_with_a_and_b_transposed_and_swapped(llama, gguf_lora, tmp_path):
    root, base, adapter, _ = llama
    stem = "blk.0.attn_output.weight"

    def transposed(t):  # lora_a = Bᵀ, lora_b = Aᵀ: llama.cpp loads it and computes ΔWᵀ
        t[f"{stem}.lora_a"], t[f"{stem}.lora_b"] = t[f"{stem}.lora_b"].T, t[f"{stem}.lora_a"].T

    code, report = verify(base, adapter, edited_gguf(gguf_lora, tmp_path / "t.gguf", transposed))
    assert code == DID_NOT_LAND
    found = verdicts(report)
    assert found.pop(O_PROJ) == "transposed" and set(found.values()) == {"landed"}

    def swapped(t):  # lora_a = B, lora_b = A: llama.cpp refuses the file ('tensor has incorrect shape')
        t[f"{stem}.lora_a"], t[f"{stem}.lora_b"] = t[f"{stem}.lora_b"], t[f"{stem}.lora_a"]

    code, report = verify(base, adapter, edited_gguf(gguf_lora, tmp_path / "s.gguf", swapped))
    assert code == DID_NOT_LAND
    assert verdicts(report)[O_PROJ] == "refused"
    assert "incorrect shape" in next(c["detail"] for c in report["checks"] if c["tensor"] == O_PROJ)


def test_gguf_missing_module_and_unpermuted_q(llama, gguf_lora, tmp_path):
    root, base, adapter, _ = llama

    def broken(t):
        del t["blk.1.ffn_down.weight.lora_a"], t["blk.1.ffn_down.weight.lora_b"]
        # a converter that forgot LlamaModel.permute on q's lora_b: llama.cpp's rotary pairs get other rows
        b = torch.from_numpy(t["blk.1.attn_q.weight.lora_b"])
        t["blk.1.attn_q.weight.lora_b"] = llama_unpermute(b, 4, 4).numpy()

    code, report = verify(base, adapter, edited_gguf(gguf_lora, tmp_path / "m.gguf", broken))
    assert code == DID_NOT_LAND
    found = verdicts(report)
    assert found.pop("model.layers.1.mlp.down_proj.weight") == "missing"
    assert found.pop("model.layers.1.self_attn.q_proj.weight") in ("differs", "partly")
    assert set(found.values()) == {"landed"}


def test_gguf_alpha_doubled_is_applied_twice(llama, gguf_lora, tmp_path):
    import gguf

    root, base, adapter, _ = llama
    reader = gguf.GGUFReader(gguf_lora)
    alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
    out = tmp_path / "twice.gguf"

    def double_b(t):  # as if alpha were doubled: every lora_b twice
        for name in t:
            if name.endswith(".lora_b"):
                t[name] = 2 * t[name]

    edited_gguf(gguf_lora, out, double_b)
    code, report = verify(base, adapter, out)
    assert code == DID_NOT_LAND and alpha > 0
    assert set(verdicts(report).values()) == {"applied twice"}


def test_bad_input(llama, gguf_lora, tmp_path):
    root, base, adapter, _ = llama
    assert_refused(["verify", base, adapter, adapter, "--target", "llama.cpp"], "GGUF", inputs=[adapter])
    assert_refused(
        ["verify", base, adapter, gguf_lora, "--target", "vllm"], "only llama.cpp", inputs=[gguf_lora]
    )
    merged = tmp_path / "merged"
    assert run_cli("merge", base, adapter, "-o", merged, "-q").exit_code == 0
    assert_refused(
        ["verify", base, adapter, merged, "--target", "vllm"], "merged checkpoint", inputs=[merged]
    )
    import gguf

    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(model, arch="gpt2")  # a merged GGUF of another model
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_refused(["verify", base, adapter, model], "general.architecture is 'gpt2'", inputs=[model])
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 8)
    assert_refused(["verify", base, adapter, broken], "broken.gguf", inputs=[broken])
    shutil.rmtree(merged)


# ------------------------------------------------------------------------------------------- --text


@pytest.fixture(scope="module")
def text(llama):
    root, base, _, _ = llama
    (base / "byte_tokens.json").write_text('{"byte_tokens": true}')  # the tiny Llama's tokens: ASCII bytes
    path = root / "text.txt"
    path.write_text("a surgeon folds the low-rank update into the weights, and the model speaks " * 2)
    return path


def test_text_logits_of_correct_and_broken_artifacts(llama, text, tmp_path):
    """A merge and a vLLM export compute PEFT's logits within float32's tolerance; the adapter as
    trained, served by vLLM 0.31 (patterns ignored), does not, and by 0.32 (patterns read) does; GGUF
    is skipped with its reason."""
    root, base, adapter, _ = llama
    merged = tmp_path / "merged"
    assert run_cli("merge", base, adapter, "-o", merged, "-q").exit_code == 0
    vllm = export(adapter, "vllm", tmp_path / "vllm", base)
    for artifact, args in ((merged, []), (vllm, ["--target", "vllm"])):
        code, report = verify(base, adapter, artifact, "--text", text, *args)
        assert code == LANDED and report["text"]["passed"], report["text"]
        assert report["text"]["tokens"] == len(text.read_bytes()) and report["text"]["dtype"] == "F32"
        assert report["text"]["max_difference"] < 1e-5
    code, report = verify(base, adapter, adapter, "--text", text, "--target", "vllm==0.31")
    assert code == DID_NOT_LAND and not report["text"]["passed"]
    assert report["text"]["max_difference"] > report["text"]["tolerance"]
    code, report = verify(base, adapter, adapter, "--text", text, "--target", "vllm")
    assert code == LANDED and report["text"]["max_difference"] < 1e-5, report["text"]
    code, report = verify(
        base, adapter, export(adapter, "llama.cpp", tmp_path / "a.gguf", base), "--text", text
    )
    assert code == LANDED and "GGUF" in report["text"]["skipped"], report["text"]
    assert_refused(
        ["verify", base, adapter, merged, "--text", tmp_path / "none.txt"], "none.txt", inputs=[merged]
    )
