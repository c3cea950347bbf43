"""`lorasurgery verify` through the CLI (docs/verify.md, docs/design.md §14).

Tiny real models (Llama, GPT-2's Conv1D, a tied-embedding Llama, gpt-oss's fused experts) with real
PEFT adapters, every factor randomised. Artifacts made by PEFT (merge_and_unload + save_pretrained)
and by `lorasurgery merge` must pass (exit 0); artifacts broken on purpose must fail (exit 1) with
the verdict that names the failure: ΔW for the broken ones is PEFT's own (get_delta_weight).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clihelp import DID_NOT_LAND, LANDED, assert_refused, run_cli, verdicts, verify
from factories import (
    _quiet,
    load_base,
    make_adapter,
    make_gpt2,
    make_gpt_oss,
    make_llama,
    peft_delta_weights,
    quantize_fp8,
)
from safetensors.torch import load_file, save_file


def peft_artifact(base, adapter, out, model_kind="llama") -> Path:
    """PEFT's route: merge_and_unload, then save_pretrained."""
    import peft

    model = load_base(base, model_kind)
    with _quiet():
        merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(out)
    return Path(out)


def edited_copy(source, out, edit) -> Path:
    """A copy of the checkpoint folder `source` with model.safetensors passed through `edit(dict)`."""
    shutil.copytree(source, out)
    tensors = load_file(Path(out) / "model.safetensors")
    edit(tensors)
    save_file(tensors, Path(out) / "model.safetensors", metadata={"format": "pt"})
    return Path(out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = make_llama(root / "base")
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    deltas, _ = peft_delta_weights(base, adapter)
    return root, base, adapter, {f"{k}.weight": v for k, v in deltas.items()}


def test_peft_and_lorasurgery_merges_land(llama):
    root, base, adapter, deltas = llama
    made_by_peft = peft_artifact(base, adapter, root / "peft")
    code, report = verify(base, adapter, made_by_peft)
    assert code == LANDED and report["landed"], report
    assert set(verdicts(report)) == set(deltas)
    for check in report["checks"]:
        assert check["relative_error"] < 1e-5 and abs(check["retention"] - 1) < 1e-5
    merged = root / "ours-bf16"
    assert run_cli("merge", base, adapter, "-o", merged, "--dtype", "bf16", "-q").exit_code == 0
    code, report = verify(base, adapter, merged)
    assert code == LANDED, report
    # bf16 rounding shows in the error, within the dtype's tolerance
    assert all(0 < c["relative_error"] <= c["tolerance"] for c in report["checks"])
    table = run_cli("verify", base, adapter, merged)
    assert table.exit_code == LANDED and "everything landed" in table.stdout


def test_copy_of_the_base_is_missing(llama):
    root, base, adapter, deltas = llama
    code, report = verify(base, adapter, base)
    assert code == DID_NOT_LAND and not report["landed"]
    assert set(verdicts(report).values()) == {"missing"}
    assert all(c["retention"] == 0 for c in report["checks"])


def test_broken_artifacts_name_the_failure(llama):
    root, base, adapter, deltas = llama
    W = load_file(base / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"  # square: 32 × 32
    v = "model.layers.1.self_attn.v_proj.weight"
    r, alpha = 4, 8

    def broken(edit_name, edit):
        out = edited_copy(peft_artifact(base, adapter, root / f"peft-{edit_name}"), root / edit_name, edit)
        return verify(base, adapter, out)

    def dropped(t):
        t[v] = W[v].clone()

    def transposed(t):
        t[q] = W[q] + deltas[q].T

    def alpha_not_over_r(t):  # the scale α instead of α/r: r times the update
        t[v] = W[v] + r * deltas[v]

    def untouched_changed(t):
        t["model.norm.weight"] = t["model.norm.weight"] + 1e-3

    code, report = broken("dropped", dropped)
    assert code == DID_NOT_LAND and verdicts(report)[v] == "missing"
    assert [n for n, x in verdicts(report).items() if x != "landed"] == [v]
    code, report = broken("transposed", transposed)
    assert verdicts(report)[q] == "transposed" and code == DID_NOT_LAND
    code, report = broken("alpha", alpha_not_over_r)
    check = next(c for c in report["checks"] if c["tensor"] == v)
    assert check["verdict"] == f"scaled by {r}" and check["scale"] == pytest.approx(r, rel=1e-4)
    assert alpha / r != alpha  # the scale verify finds is the factor the wrong formula introduces
    code, report = broken("norm", untouched_changed)
    assert code == DID_NOT_LAND and [c["tensor"] for c in report["changed"]] == ["model.norm.weight"]
    assert set(verdicts(report).values()) == {"landed"}


def test_double_merge_is_applied_twice(llama):
    root, base, adapter, deltas = llama
    once = root / "once"
    assert run_cli("merge", base, adapter, "-o", once, "-q").exit_code == 0
    twice = root / "twice"
    assert run_cli("merge", once, adapter, "-o", twice, "-q").exit_code == 0
    result = run_cli("verify", base, adapter, twice)
    assert result.exit_code == DID_NOT_LAND
    assert "applied twice" in result.stdout
    code, report = verify(base, adapter, twice)
    assert all(c["verdict"] == "applied twice" for c in report["checks"])
    assert all(c["scale"] == pytest.approx(2, rel=1e-4) for c in report["checks"])
    # --weight 2 says that was meant
    assert verify(base, adapter, twice, "--weight", "2")[0] == LANDED


def test_gpt2_conv1d(tmp_path):
    base = make_gpt2(tmp_path / "base")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        model_kind="gpt2",
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
    )
    code, report = verify(base, adapter, peft_artifact(base, adapter, tmp_path / "peft", "gpt2"))
    assert code == LANDED, report
    deltas, _ = peft_delta_weights(base, adapter, model_kind="gpt2")
    name = "transformer.h.0.attn.c_proj"  # Conv1D (in, out), square
    W = load_file(base / "model.safetensors")
    key = next(k for k in W if k.endswith(f"{name.removeprefix('transformer.')}.weight"))

    def wrong_orientation(t):  # ΔW added as nn.Linear would store it
        t[key] = W[key] + deltas[name].T

    out = edited_copy(tmp_path / "peft", tmp_path / "transposed", wrong_orientation)
    code, report = verify(base, adapter, out)
    assert code == DID_NOT_LAND and verdicts(report)[key] == "transposed"

    # an artifact that unties lm_head from wte and stores it changed: the tied member is checked too
    def untied_lm_head(t):
        t["lm_head.weight"] = W["transformer.wte.weight"] + 1e-2

    out = edited_copy(tmp_path / "peft", tmp_path / "untied", untied_lm_head)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    code, report = verify(base, adapter, out)
    assert code == DID_NOT_LAND and [c["tensor"] for c in report["changed"]] == ["lm_head.weight"]
    assert any("tied" in issue for issue in report["config"])


def test_tied_lm_head(tmp_path):
    base = make_llama(tmp_path / "base", tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    ours = tmp_path / "ours"
    assert run_cli("merge", base, adapter, "-o", ours, "-q").exit_code == 0
    code, report = verify(base, adapter, ours)
    assert code == LANDED, report
    # PEFT's merge writes lm_head's update into the tensor it shares with embed_tokens, saved tied
    code, report = verify(base, adapter, peft_artifact(base, adapter, tmp_path / "peft"))
    assert code == DID_NOT_LAND
    assert verdicts(report)["lm_head.weight"] == "wrong side of a tie", report
    assert verdicts(report)["model.embed_tokens.weight"] == "wrong side of a tie"
    # lorasurgery's untied output with config.json still saying tie_word_embeddings: true
    kept = tmp_path / "kept-tied"
    shutil.copytree(ours, kept)
    config = json.loads((kept / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (kept / "config.json").write_text(json.dumps(config))
    code, report = verify(base, adapter, kept)
    assert code == DID_NOT_LAND and verdicts(report)["lm_head.weight"] == "wrong side of a tie"
    assert any("tie" in issue for issue in report["config"])


def test_gpt_oss_experts(tmp_path):
    base = make_gpt_oss(tmp_path / "base")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        model_kind="auto",
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    ours = tmp_path / "ours"
    assert run_cli("merge", base, adapter, "-o", ours, "-q").exit_code == 0
    code, report = verify(base, adapter, ours)
    assert code == LANDED, report
    experts = [n for n in verdicts(report) if ".experts." in n]
    assert len(experts) == 2
    W = load_file(base / "model.safetensors")

    def experts_dropped(t):
        for name in experts:
            t[name] = W[name].clone()

    code, report = verify(base, adapter, edited_copy(ours, tmp_path / "dropped", experts_dropped))
    assert code == DID_NOT_LAND
    assert {n: v for n, v in verdicts(report).items() if v != "landed"} == dict.fromkeys(experts, "missing")


def _fp8_checkpoint(folder: Path, tensors: dict, config: dict, block=(16, 16)) -> None:
    """`tensors` saved with every 2-D projection stored as fine-grained FP8 (factories.quantize_fp8)."""
    folder.mkdir()
    stored = {}
    for name, W in tensors.items():
        if name.endswith("_proj.weight"):
            codes, scale = quantize_fp8(W, block)
            stored[name], stored[f"{name}_scale_inv"] = codes, scale
        else:
            stored[name] = W
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    (folder / "config.json").write_text(json.dumps(config))


def test_fp8_artifact_rounding_the_update_away(tmp_path):
    base = make_llama(tmp_path / "base")
    tiny = make_adapter(base, tmp_path / "tiny", target_modules=["q_proj"], lora_alpha=0.004)
    large = make_adapter(base, tmp_path / "large", target_modules=["q_proj"])
    config = json.loads((base / "config.json").read_text())
    W = load_file(base / "model.safetensors")
    fp8_base = tmp_path / "fp8-base"
    _fp8_checkpoint(fp8_base, W, config)
    # an FP8 artifact of base + ΔW quantized again: a large update lands within e4m3's rounding,
    # a tiny one is rounded away (the codes barely move)
    for name, adapter in (("large", large), ("tiny", tiny)):
        deltas, _ = peft_delta_weights(base, adapter)
        merged = {
            k: v + deltas[k.removesuffix(".weight")] if k.removesuffix(".weight") in deltas else v
            for k, v in W.items()
        }
        _fp8_checkpoint(tmp_path / f"fp8-{name}", merged, config)
    code, report = verify(base, large, tmp_path / "fp8-large")
    assert code == LANDED, report
    # lorasurgery's merge into the FP8 base writes it dequantized: that lands against the FP8 base
    ours = tmp_path / "ours"
    assert run_cli("merge", fp8_base, large, "-o", ours, "-q").exit_code == 0
    code, report = verify(fp8_base, large, ours)
    assert code == LANDED, report
    code, report = verify(base, tiny, tmp_path / "fp8-tiny")
    assert code == DID_NOT_LAND
    for check in report["checks"]:
        # ρ is rounding noise here: e4m3's rounding cannot show the update, never `landed`
        assert check["verdict"] in ("missing", "cannot tell at this quantization"), check
    # against the FP8 base itself, the tiny update's codes are those of the base: nothing landed
    code, report = verify(fp8_base, tiny, tmp_path / "fp8-tiny")
    assert code == DID_NOT_LAND and set(verdicts(report).values()) <= {
        "missing",
        "cannot tell at this quantization",
    }


def test_bad_input(llama, tmp_path):
    root, base, adapter, _ = llama
    # an adapter as ARTIFACT is checked by its target's rules: tests/test_verify_adapter.py
    assert_refused(["verify", base, adapter, tmp_path / "nowhere"], "nowhere", inputs=[base, adapter])
    result = run_cli("verify", base, adapter)
    assert result.exit_code == 2 and "ARTIFACT" in result.stderr
    result = run_cli("verify", base, adapter, base, "--weight", "1", "--weight", "2")
    assert result.exit_code == 2 and "2 --weight values for 1 adapters" in result.stderr
    other = make_gpt2(tmp_path / "gpt2")
    assert_refused(["verify", other, adapter, other], str(adapter), inputs=[other, adapter])


def test_dora_embedding_saved_tensor_sharded(tmp_path):
    base = make_llama(tmp_path / "base", max_shard_size="20KB")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        target_modules=["q_proj", "o_proj", "embed_tokens"],
        use_dora=True,
        modules_to_save=["lm_head"],
    )
    code, report = verify(base, adapter, peft_artifact(base, adapter, tmp_path / "peft"))
    assert code == LANDED, report
    kinds = {c["tensor"]: c["kind"] for c in report["checks"]}
    assert kinds["lm_head.weight"] == "replaced" and kinds["model.layers.0.self_attn.o_proj.weight"] == "dora"
    assert kinds["model.embed_tokens.weight"] == "dora"
    ours = tmp_path / "ours"
    assert run_cli("merge", base, adapter, "-o", ours, "--max-shard-size", "30KB", "-q").exit_code == 0
    assert len(list(ours.glob("*.safetensors"))) > 1
    code, report = verify(base, adapter, ours)
    assert code == LANDED, report
    # the saved lm_head left out: the base's comes through
    plain = make_adapter(
        base, tmp_path / "plain", target_modules=["q_proj", "o_proj", "embed_tokens"], use_dora=True
    )
    made_without = tmp_path / "without"
    assert run_cli("merge", base, plain, "-o", made_without, "-q").exit_code == 0
    code, report = verify(base, adapter, made_without)
    assert code == DID_NOT_LAND and verdicts(report)["lm_head.weight"] != "landed"


def _matrix_cases():
    """PEFT's LoRA test matrix (tests/test_peft_matrix.py) where merge equals PEFT: every layer kind,
    layout and option merge supports."""
    from test_peft_matrix import _params

    for param in _params():
        case = param.values[0]
        if case.expect == "merge" and not case.forward_input and not case.option:
            yield param


@pytest.fixture(scope="module")
def matrix_bases(tmp_path_factory):
    from peft_matrix import Bases

    return Bases(tmp_path_factory.mktemp("matrix-bases"))


@pytest.mark.parametrize("case", list(_matrix_cases()))
def test_every_merge_of_the_peft_matrix_verifies(case, matrix_bases, tmp_path):
    from peft_matrix import make_peft

    bases = matrix_bases
    adapters, _, _ = make_peft(bases, case, tmp_path / "adapter")
    base = bases.get(case.model, case.dtype, case.config_json)
    out = tmp_path / "out"
    assert run_cli("--quiet", "merge", base, *adapters, "-o", out).exit_code == 0
    result = run_cli("verify", base, *adapters, out, "--json")
    assert result.exit_code == LANDED, (result.exit_code, result.stdout[-3000:], result.stderr)


@pytest.mark.parametrize("case", list(_matrix_cases()))
def test_every_peft_merge_of_the_matrix_verifies(case, matrix_bases, tmp_path):
    """PEFT's own merge_and_unload of each case, saved under the base's tensor names as
    save_pretrained does (through save_pretrained itself where the base stores experts split), lands within the tolerance (in fp16/bf16 PEFT rounds ΔW before adding it:
    the tolerance allows that second rounding) — except where a LoRA touches a tied embedding:
    PEFT's merge writes it into the shared tensor, or the reference unties it under a config that
    still ties, and verify must say so."""
    from peft_matrix import make_peft
    from safetensors import safe_open

    adapters, _, expected = make_peft(matrix_bases, case, tmp_path / "adapter")
    base = matrix_bases.get(case.model, case.dtype, case.config_json)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    out = tmp_path / "peft"
    shutil.copytree(base, out)
    if set(expected) & stored >= {k for k in stored if ".experts." in k}:
        tensors = {k: v.contiguous() for k, v in expected.items() if k in stored}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:  # the base stores its experts split, PEFT's merged state dict fuses them: save_pretrained
        # writes them split again (transformers' conversion mapping reversed), as a user's merge does
        model = load_base(base, "auto")
        model.load_state_dict(expected, strict=True)
        (out / "model.safetensors").unlink()
        with _quiet():
            model.save_pretrained(out)
    result = run_cli("verify", base, *adapters, out, "--json")
    if "tied" in case.id and "trainable-tokens" not in case.id:  # token rows keep the tie
        assert result.exit_code == DID_NOT_LAND, result.stdout[-3000:]
        report = json.loads(result.stdout)
        assert report["config"] or "wrong side of a tie" in verdicts(report).values(), report
        return
    assert result.exit_code == LANDED, (result.exit_code, result.stdout[-3000:], result.stderr)
