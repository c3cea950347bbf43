"""`lorasurgery resize` and `lorasurgery combine` through the command line: the JSON report, the
table, usage errors, and every bad input (exact `Error:` text, exit 1, no output, inputs unchanged)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import make_adapter, make_gpt2
from safetensors.torch import load_file, save_file


def test_resize_json_report_matches_the_file_and_the_output(llama_lora_qv, tmp_path):
    out, report_file = tmp_path / "out", tmp_path / "r.json"
    result = run_cli(
        "--quiet", "resize", llama_lora_qv, "-o", out, "--rank", "2", "--report", report_file, "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_file.read_text())
    assert json.loads(result.stdout) == report
    assert set(report) == {"inputs", "output", "policy", "modules", "skipped", "saved", "totals", "notes"}
    assert set(report["modules"][0]) == {
        "name",
        "kind",
        "shape",
        "original_rank",
        "rank",
        "retained_energy",
        "relative_error",
    }
    assert [m["rank"] for m in report["modules"]] == [2, 2, 2, 2]
    written = load_file(out / "adapter_model.safetensors")
    assert report["totals"]["params"] == sum(t.numel() for t in written.values())


def test_combine_table_on_stdout_and_log_on_stderr(llama_lora_qv, gpt2_lora, tmp_path):
    result = run_cli(
        "combine",
        llama_lora_qv,
        llama_lora_qv,
        "--weight",
        "0.25",
        "--weight",
        "0.75",
        "-o",
        tmp_path / "o",
        "--rank",
        "3",
    )
    assert result.exit_code == 0, result.stderr
    assert "model.layers.1.self_attn.v_proj" in result.stdout and "overall relative error" in result.stdout
    assert "wrote" in result.stderr
    report = json.loads(
        run_cli("--quiet", "combine", llama_lora_qv, "-o", tmp_path / "e", "--exact", "--json").stdout
    )
    assert report["weights"] == [1.0] and report["policy"] == "exact sum"


@pytest.mark.parametrize(
    "args, message",
    [
        (["resize", "{a}", "-o", "{o}"], "choose exactly one rank policy"),
        (["resize", "{a}", "-o", "{o}", "--rank", "2", "--auto"], "choose exactly one rank policy"),
        (["resize", "{a}", "-o", "{o}", "--rank", "0"], "--rank"),
        (["resize", "{a}", "-o", "{o}", "--budget", "lots"], "--budget"),
        (["combine", "{a}", "-o", "{o}"], "choose exactly one rank policy"),
        (["combine", "{a}", "-o", "{o}", "--exact", "--rank", "2"], "takes no rank policy"),
        (
            ["combine", "{a}", "{a}", "-o", "{o}", "--exact", "--weight", "1"],
            "1 --weight values for 2 adapters",
        ),
    ],
)
def test_usage_errors_exit_2(llama_lora_qv, tmp_path, args, message):
    args = [a.format(a=llama_lora_qv, o=tmp_path / "out") for a in args]
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert message in result.stderr and not (tmp_path / "out").exists()


def copy_adapter(source, target, change=None):
    shutil.copytree(source, target)
    if change is not None:
        file = target / "adapter_model.safetensors"
        tensors = {k: change(k, v.clone()) for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    return target


def test_dora_without_base_is_refused(llama_dora, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["resize", llama_dora, "-o", out, "--rank", "2"], "DoRA needs --base", inputs=[llama_dora], output=out
    )
    assert_refused(
        ["combine", llama_dora, "-o", out, "--exact"], "DoRA needs --base", inputs=[llama_dora], output=out
    )


def test_dora_with_the_wrong_base_is_refused(llama_dora, gpt2_base, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["resize", llama_dora, "-o", out, "--rank", "2", "--base", gpt2_base],
        "are not in the base",
        inputs=[llama_dora, gpt2_base],
        output=out,
    )


def test_nonfinite_factors_are_refused_naming_the_module(llama_lora_qv, tmp_path):
    def poison(key, tensor):
        if key.endswith("layers.1.self_attn.v_proj.lora_B.weight"):
            tensor[0, 0] = float("nan")
        return tensor

    bad = copy_adapter(llama_lora_qv, tmp_path / "bad", poison)
    out = tmp_path / "out"
    message = "module model.layers.1.self_attn.v_proj: lora_B holds NaN/Inf"
    assert_refused(["resize", bad, "-o", out, "--rank", "2"], message, inputs=[bad], output=out)
    assert_refused(
        ["combine", llama_lora_qv, bad, "-o", out, "--exact"],
        message,
        inputs=[bad, llama_lora_qv],
        output=out,
    )


def test_output_rules(llama_lora_qv, tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep").write_text("x")
    assert_refused(
        ["resize", llama_lora_qv, "-o", existing, "--rank", "2"],
        "already exists; pass --force",
        inputs=[llama_lora_qv, existing],
    )
    inside = llama_lora_qv / "sub"
    assert_refused(
        ["combine", llama_lora_qv, "-o", inside, "--exact"],
        "is inside the input",
        inputs=[llama_lora_qv],
        output=inside,
    )
    result = run_cli("--quiet", "resize", llama_lora_qv, "-o", existing, "--rank", "2", "--force")
    assert result.exit_code == 0 and not (existing / "keep").exists()


def test_not_an_adapter_is_refused(llama_base, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["resize", tmp_path / "missing", "-o", out, "--rank", "2"], "no such adapter folder", output=out
    )
    assert_refused(
        ["combine", llama_base, "-o", out, "--exact"],
        "no adapter_config.json",
        inputs=[llama_base],
        output=out,
    )


def test_adapters_of_different_models_are_refused(llama_lora_qv, tmp_path):
    gpt2 = make_gpt2(tmp_path / "gpt2", hidden_size=48)
    other = make_adapter(gpt2, tmp_path / "other", model_kind="gpt2", target_modules=["c_attn"], r=2)
    # rename its module onto a llama one with another shape: the same name, not the same model
    renamed = copy_adapter(
        other,
        tmp_path / "renamed",
    )
    file = renamed / "adapter_model.safetensors"
    tensors = {
        k.replace("transformer.h.0.attn.c_attn", "model.layers.0.self_attn.q_proj"): v
        for k, v in load_file(file).items()
    }
    save_file(tensors, file, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(
        ["combine", llama_lora_qv, renamed, "-o", out, "--exact"],
        "they are not adapters of the same model",
        inputs=[llama_lora_qv, renamed],
        output=out,
    )


def test_conflicting_saved_tensors_name_both_adapters_and_the_tensor(llama_base, tmp_path):
    a = make_adapter(
        llama_base, tmp_path / "a", target_modules=["o_proj"], modules_to_save=["model.norm"], r=2, seed=5
    )
    b = make_adapter(
        llama_base, tmp_path / "b", target_modules=["q_proj"], modules_to_save=["model.norm"], r=2, seed=6
    )
    out = tmp_path / "out"
    result = assert_refused(
        ["combine", a, b, "-o", out, "--rank", "2"],
        "both save the tensor model.norm.weight",
        inputs=[a, b],
        output=out,
    )
    assert str(a) in result.stderr and str(b) in result.stderr


def test_budget_smaller_than_the_saved_tensors_is_refused(llama_base, tmp_path):
    a = make_adapter(llama_base, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"], r=2)
    out = tmp_path / "out"
    assert_refused(
        ["resize", a, "-o", out, "--budget", "100"], "alone take 4,096 parameters", inputs=[a], output=out
    )


def test_everything_below_the_policy_is_refused(llama_lora_qv, tmp_path):
    def zero(key, tensor):
        return torch.zeros_like(tensor) if "lora_B" in key else tensor

    empty = copy_adapter(llama_lora_qv, tmp_path / "zero", zero)
    out = tmp_path / "out"
    assert_refused(
        ["resize", empty, "-o", out, "--rank", "2"], "every module has rank 0", inputs=[empty], output=out
    )
