"""`lorasurgery extract` through the command line: the report's JSON, usage errors, and every bad
input of docs/design.md §7 (exact `Error:` text, exit code, no output folder, inputs byte-identical)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import make_gpt2, make_llama
from safetensors.torch import load_file, save_file

from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter
from lorasurgery.progress import Progress


def finetune_with(base: Path, out: Path, change) -> Path:
    tensors = {n: change(n, t.clone()) for n, t in load_file(base / "model.safetensors").items()}
    tensors = {n: t.contiguous() for n, t in tensors.items() if t is not None}
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def nudge(name: str, t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(name))
    return t + 0.01 * torch.randn(t.shape, generator=g) if t.dim() == 2 else t


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_pair")
    base = make_llama(root / "base")
    return base, finetune_with(base, root / "ft", nudge)


def test_report_json_has_the_spec_schema_and_matches_stdout(pair, tmp_path):
    base, ft = pair
    args = ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2", "--report", tmp_path / "r.json"]
    result = run_cli("--quiet", *args, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(result.stdout) == report
    assert set(report) == {"modules", "skipped", "totals"}
    assert len(report["modules"]) == 14 and report["modules"][0]["name"] == "model.layers.0.mlp.down_proj"
    assert set(report["modules"][0]) == {"name", "shape", "rank", "retained_energy", "relative_error"}
    assert {s["name"] for s in report["skipped"]} == {"model.embed_tokens", "lm_head"}
    assert set(report["skipped"][0]) == {"name", "reason", "relative_norm"}
    assert set(report["totals"]) == {"params", "bytes", "relative_error"}
    assert report["totals"]["params"] == sum(2 * sum(m["shape"]) for m in report["modules"])


def test_table_on_stdout_and_notes_on_stderr(pair, tmp_path, monkeypatch):
    from lorasurgery.cli import render

    monkeypatch.setattr(render.stdout, "width", 80)  # module names must survive a narrow terminal
    base, ft = pair
    result = run_cli("extract", base, ft, "-o", tmp_path / "out", "--energy", "0.5")
    assert result.exit_code == 0, result.stderr
    assert "model.layers.1.self_attn.v_proj" in result.stdout and "overall relative error" in result.stdout
    stderr = " ".join(result.stderr.split())  # rich wraps at the terminal width
    assert "--embeddings lora" in stderr and "wrote" in stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "2", "--energy", "0.9"], "choose exactly one rank policy"),
        (["--auto", "--budget", "1M"], "choose exactly one rank policy"),
        ([], "choose exactly one rank policy"),
        (["--energy", "1.5"], "--energy"),
        (["--ratio", "0"], "--ratio"),
        (["--rank", "0"], "--rank"),
        (["--budget", "lots"], "--budget"),
        (["--rank", "2", "--embeddings", "some"], "--embeddings"),
        (["--rank", "2", "--svd", "magic"], "--svd"),
    ],
)
def test_bad_options_are_usage_errors(pair, tmp_path, args, message):
    base, ft = pair
    result = run_cli("extract", base, ft, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_different_architectures_are_refused(pair, tmp_path):
    base, _ = pair
    gpt2 = make_gpt2(tmp_path / "gpt2")
    assert_refused(
        ["extract", base, gpt2, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {gpt2}: a gpt2 model cannot be a fine-tune of the llama model {base}",
        inputs=[base, gpt2],
        output=tmp_path / "out",
    )


def test_a_shape_mismatch_is_refused_naming_the_module(pair, tmp_path):
    base, _ = pair
    ft = finetune_with(
        base, tmp_path / "ft", lambda n, t: t[:, :16] if n.endswith("layers.1.mlp.up_proj.weight") else t
    )
    assert_refused(
        ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {ft}: module model.layers.1.mlp.up_proj: shapes differ ([64, 32] in the base, [64, 16] in the fine-tune)",
        inputs=[base, ft],
        output=tmp_path / "out",
    )


def test_a_vocabulary_mismatch_is_refused_unless_embeddings_full(pair, tmp_path):
    base, _ = pair
    ft = make_llama(tmp_path / "ft", vocab_size=136)
    assert_refused(
        ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {ft}: module lm_head: vocabulary sizes differ ([128, 32] in the base, [136, 32] in the "
        "fine-tune); --embeddings full saves the resized matrices",
        inputs=[base, ft],
        output=tmp_path / "out",
    )
    result = run_cli("-q", "extract", base, ft, "-o", tmp_path / "out", "--rank", "2", "--embeddings", "full")
    assert result.exit_code == 0, result.stderr


def test_a_missing_tensor_is_refused(pair, tmp_path):
    base, ft = pair
    short = finetune_with(
        base, tmp_path / "short", lambda n, t: None if "layers.0.self_attn.k_proj" in n else t
    )
    assert_refused(
        ["extract", base, short, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {short}: tensors of the base are missing from the fine-tune: model.layers.0.self_attn.k_proj.weight",
        inputs=[base, short],
        output=tmp_path / "out",
    )
    assert_refused(
        ["extract", short, ft, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {ft}: tensors not in the base {short}: model.layers.0.self_attn.k_proj.weight",
        inputs=[short, ft],
        output=tmp_path / "out",
    )


@pytest.mark.parametrize("where, value", [("ft", float("nan")), ("base", float("inf"))])
def test_nonfinite_weights_are_refused_unless_allowed(pair, tmp_path, where, value):
    base, ft = pair

    def poison(name, t):
        if name == "model.layers.1.self_attn.q_proj.weight":
            t[3, 5] = value
        return t

    bad = finetune_with(base if where == "base" else ft, tmp_path / "bad", poison)
    base_arg, ft_arg = (bad, ft) if where == "base" else (base, bad)
    assert_refused(
        ["extract", base_arg, ft_arg, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: {bad}: module model.layers.1.self_attn.q_proj: NaN/Inf in model.layers.1.self_attn.q_proj.weight; "
        "pass --allow-nonfinite to go on",
        inputs=[base_arg, ft_arg],
        output=tmp_path / "out",
    )
    result = run_cli("extract", base_arg, ft_arg, "-o", tmp_path / "out", "--rank", "2", "--allow-nonfinite")
    assert result.exit_code == 0, result.stderr
    assert (
        "model.layers.1.self_attn.q_proj: 1 NaN/Inf entries of ΔW were treated as 0"
        in result.stderr.replace("\n", " ")
    )
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_an_existing_or_nested_output_is_refused(pair, tmp_path):
    base, ft = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_refused(
        ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2"],
        f"Error: output {tmp_path / 'out'} already exists; pass --force to replace it",
        inputs=[base, ft, tmp_path / "out"],
    )
    assert_refused(
        ["extract", base, ft, "-o", ft / "adapter", "--rank", "2"],
        f"Error: output {ft / 'adapter'} is inside the input {ft}",
        inputs=[base, ft],
        output=ft / "adapter",
    )
    result = run_cli("-q", "extract", base, ft, "-o", tmp_path / "out", "--rank", "2", "--force")
    assert result.exit_code == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_nothing_selected_is_an_error(pair, tmp_path):
    base, ft = pair
    assert_refused(
        ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2", "--include", "no_such_module"],
        f"Error: {ft}: no module to extract (check --include/--exclude)",
        inputs=[base, ft],
        output=tmp_path / "out",
    )
    assert_refused(
        ["extract", base, ft, "-o", tmp_path / "out", "--rank", "2", "--include", "("],
        "Error: --include '(' is not a valid regular expression",
        output=tmp_path / "out",
    )


def test_progress_reports_every_module(pair, tmp_path):
    base, ft = pair
    events: list[Progress] = []
    report = extract_adapter(
        ExtractRequest(base, ft, tmp_path / "out", policy=Policy(budget=2000)), progress=events.append
    )
    stages = {e.stage for e in events}
    assert stages == {"extract: spectra", "extract"}
    assert [e.done for e in events] == list(range(1, len(events) + 1)) and events[-1].done == events[-1].total
    assert len(report.modules) + len(report.skipped) >= 14
    assert math.isclose(sum(m.params for m in report.modules), report.totals["params"])
