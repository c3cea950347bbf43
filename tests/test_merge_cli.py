"""`lorasurgery merge` through the CLI: exit codes, JSON, and every bad input of docs/design.md §7.

Each refusal is checked by clihelp.assert_refused: exit 1, `Error: …` naming the module or file, no
traceback, no output folder (nor a temporary one) afterwards, inputs byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import assert_refused, run_cli, tree_digest

from lorasurgery.errors import LoraSurgeryError
from lorasurgery.io import open_checkpoint, save_tensors

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from factories import make_adapter, make_llama  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("cli") / "base", vocab_size=64)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return make_adapter(
        base, tmp_path_factory.mktemp("cli") / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"]
    )


def edited_adapter(adapter: Path, out: Path, edit) -> Path:
    """A copy of `adapter` whose tensors went through edit(dict) and whose config is kept."""
    out.mkdir()
    (out / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    checkpoint = open_checkpoint(adapter / "adapter_model.safetensors")
    tensors = {name: checkpoint.read(name) for name in checkpoint.tensors}
    edit(tensors)
    save_tensors(out, tensors, stem="adapter_model")
    return out


def test_merge_succeeds_and_prints_json(base, adapter, tmp_path):
    before = tree_digest(base, adapter)
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["adapters"][0]["modules_merged"] == 2
    assert summary["tensors_merged"] == 2 and summary["tensors_copied"] == summary["tensors"] - 2
    assert summary["bytes_written"] > 0 and summary["seconds"] > 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert tree_digest(base, adapter) == before


def test_merge_table_and_quiet(base, adapter, tmp_path):
    result = run_cli("--quiet", "merge", base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "modules" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_before_and_after_the_command(base, adapter, tmp_path, where):
    """Users put flags at the end: `lorasurgery merge … --quiet` must mean what `--quiet merge …` does."""
    args = ["merge", base, adapter, "-o", tmp_path / "out"]
    quiet = run_cli(*(["--quiet", *args] if where == "before" else [*args, "-q"]))
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == "" and "modules" in quiet.stdout
    missing = ["merge", base, tmp_path / "no-such-adapter", "-o", tmp_path / "out2"]
    debug = run_cli(*(["--debug", *missing] if where == "before" else [*missing, "--debug"]))
    assert debug.exit_code != 0 and isinstance(debug.exception, LoraSurgeryError)  # raised, not mapped
    plain = run_cli(*missing)
    assert (
        plain.exit_code == 1
        and plain.stderr.startswith("Error: ")
        and plain.exception.__class__ is SystemExit
    )
    assert not (tmp_path / "out2").exists()


def test_weight_count_must_match_adapters(base, adapter, tmp_path):
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--weight", "1", "--weight", "2")
    assert result.exit_code == 2
    assert "give one --weight per adapter" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_target_is_refused(base, adapter, tmp_path):
    def rename(tensors):
        for name in list(tensors):
            tensors[name.replace("q_proj", "qkv_proj")] = tensors.pop(name)

    bad = edited_adapter(adapter, tmp_path / "bad", rename)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(["merge", base, bad, "-o", out], "qkv_proj", inputs=[base, bad], output=out)


def test_shape_mismatch_names_module_and_both_shapes(base, adapter, tmp_path):
    def widen(tensors):
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[name] = torch.randn(4, 40)

    bad = edited_adapter(adapter, tmp_path / "bad", widen)
    out = tmp_path / "out"
    result = assert_refused(
        ["merge", base, bad, "-o", out], "model.layers.0.self_attn.q_proj", inputs=[base, bad], output=out
    )
    assert "40" in result.stderr and "32" in result.stderr  # both shapes


def test_nan_in_adapter_is_refused_unless_allowed(base, adapter, tmp_path):
    def poison(tensors):
        tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")

    bad = edited_adapter(adapter, tmp_path / "bad", poison)
    out = tmp_path / "out"
    result = assert_refused(
        ["merge", base, bad, "-o", out], "model.layers.1.self_attn.q_proj", inputs=[base, bad], output=out
    )
    assert "NaN" in result.stderr and "--allow-nonfinite" in result.stderr
    allowed = run_cli("--quiet", "merge", base, bad, "-o", out, "--allow-nonfinite")
    assert allowed.exit_code == 0, allowed.stderr


def test_existing_output_needs_force(base, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(
        ["merge", base, adapter, "-o", out], "already exists; pass --force", inputs=[base, adapter, out]
    )
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("--quiet", "merge", base, adapter, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("where", ["base", "inside-base", "adapter"])
def test_output_inside_an_input_is_refused(base, adapter, tmp_path, where):
    out = {"base": base, "inside-base": base / "merged", "adapter": adapter}[where]
    assert_refused(
        ["merge", base, adapter, "-o", out, "--force"], "choose a folder elsewhere", inputs=[base, adapter]
    )
    assert where != "inside-base" or not out.exists()


def test_subtract_dora_is_refused(base, tmp_path):
    dora = make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj"])
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, dora, "-o", out, "--subtract"],
        "--subtract is refused for DoRA",
        inputs=[base, dora],
        output=out,
    )


def test_cuda_without_a_gpu_is_refused(base, adapter, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    assert_refused(["merge", base, adapter, "-o", out, "--device", "cuda"], "no CUDA device", output=out)


def test_bad_shard_size_is_refused(base, adapter, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapter, "-o", out, "--max-shard-size", "lots"], "cannot parse size", output=out
    )


def test_verify_passes_and_reports(base, adapter, tmp_path):
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["verified"] is True and summary["max_logit_difference"] < 1e-4


def test_verify_without_peft_says_so(base, adapter, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapter, "-o", out, "--verify"], "--verify needs peft (pip install peft)", output=out
    )


def test_progress_reports_every_tensor_and_byte(base, adapter, tmp_path):
    from lorasurgery.commands.merge import MergeRequest, merge_checkpoint

    events = []
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"), events.append)
    assert [e.done for e in events] == list(range(1, summary.tensors + 1))
    assert events[-1].bytes_done == events[-1].bytes_total == summary.bytes_written
    assert {e.stage for e in events} == {"merge"}


@pytest.fixture(scope="module")
def bare_gpt2(tmp_path_factory):
    """A GPT-2 checkpoint without config.json (square Conv1D c_proj) and an adapter whose
    fan_in_fan_out flag says false (as an adapter made by add_adapter keeps it)."""
    from factories import make_adapter as make_peft_adapter
    from factories import make_gpt2

    root = tmp_path_factory.mktemp("gpt2-cli")
    base = make_gpt2(root / "base")
    adapter = make_peft_adapter(
        base, root / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_proj"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (root / "bare").mkdir()
    (root / "bare" / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes())
    return base, root / "bare", adapter


def test_an_ambiguous_layout_is_refused_with_the_way_out(bare_gpt2, tmp_path):
    _, bare, adapter = bare_gpt2
    out = tmp_path / "out"
    result = assert_refused(
        ["merge", bare, adapter, "-o", out],
        "module transformer.h.0.attn.c_proj: the base's transformer.h.0.attn.c_proj.weight is square (32×32)",
        inputs=[bare, adapter],
        output=out,
    )
    assert "--config" in result.stderr and "--fan-in-fan-out REGEX" in result.stderr
    assert result.stderr.count(str(adapter)) == 1  # each input named once


@pytest.mark.parametrize("option", ["config", "fan-in-fan-out"])
def test_config_or_fan_in_fan_out_resolve_the_layout(bare_gpt2, tmp_path, option):
    from factories import peft_merged_state_dict

    base, bare, adapter = bare_gpt2
    extra = (
        ["--config", base / "config.json"]
        if option == "config"
        else ["--fan-in-fan-out", r"\.c_(attn|proj)$"]
    )
    before = tree_digest(bare, adapter)
    result = run_cli("--quiet", "merge", bare, adapter, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.stderr
    assert tree_digest(bare, adapter) == before
    reference = peft_merged_state_dict(base, [adapter], model_kind="gpt2")
    merged = open_checkpoint(tmp_path / "out")
    for name in merged.tensors:
        ours, expected = merged.read(name).double(), reference[name].double()
        assert float((ours - expected).norm()) <= 1e-5 * float(expected.norm()), name  # zero biases too


def test_a_fan_in_fan_out_contradicting_the_config_is_refused(bare_gpt2, tmp_path):
    base, _, adapter = bare_gpt2
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapter, "-o", out, "--fan-in-fan-out", "c_attn"],
        "--fan-in-fan-out 'c_attn' does not match module transformer.h.0.attn.c_proj",
        inputs=[base, adapter],
        output=out,
    )


def test_a_missing_config_file_is_refused(base, adapter, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapter, "-o", out, "--config", tmp_path / "nope.json"],
        f"--config {tmp_path / 'nope.json'}: no such config.json",
        inputs=[base, adapter],
        output=out,
    )


def test_inspect_and_rank_report_take_the_same_options(bare_gpt2, tmp_path):
    base, bare, adapter = bare_gpt2
    assert_refused(["inspect", adapter, "--base", bare], "is square (32×32)", inputs=[bare, adapter])
    result = run_cli("inspect", adapter, "--base", bare, "--config", base, "--json")
    assert result.exit_code == 0, result.stderr
    by_config = {m["name"]: m["relative_norm"] for m in json.loads(result.stdout)["modules"]}
    result = run_cli("inspect", adapter, "--base", bare, "--fan-in-fan-out", "c_attn|c_proj", "--json")
    assert result.exit_code == 0, result.stderr
    assert {m["name"]: m["relative_norm"] for m in json.loads(result.stdout)["modules"]} == by_config
    assert_refused(["rank-report", adapter, "--base", bare], "is square (32×32)", inputs=[bare, adapter])
    result = run_cli("rank-report", adapter, "--base", bare, "--config", base, "--json", "-")
    assert result.exit_code == 0, result.stderr
