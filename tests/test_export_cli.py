"""`lorasurgery export` and `inspect --for` through the CLI: refusals write nothing, exit codes."""

from __future__ import annotations

import json

import pytest
from clihelp import assert_refused, run_cli, tree_digest
from factories import make_adapter, make_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("export") / "base", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": make_adapter(base, root / "plain", r=4, lora_alpha=4),
        "rslora": make_adapter(base, root / "rslora", r=4, lora_alpha=8, use_rslora=True),
        "dora": make_adapter(base, root / "dora", r=4, lora_alpha=8, use_dora=True),
        "saved": make_adapter(base, root / "saved", r=4, lora_alpha=8, modules_to_save=["model.norm"]),
        "bias": make_adapter(
            base, root / "bias", r=4, lora_alpha=8, lora_bias=True, target_modules=["down_proj"]
        ),
        "head": make_adapter(base, root / "head", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    }


def test_dora_without_base_is_refused(adapters, base, tmp_path):
    for target, out in (("vllm", tmp_path / "v"), ("llama.cpp", tmp_path / "x.gguf")):
        extra = ["--base", base / "config.json"] if target == "llama.cpp" else []
        assert_refused(
            ["export", adapters["dora"], "--for", target, "-o", out, *extra],
            "pass --base BASE to convert it",
            inputs=[adapters["dora"]],
            output=out,
        )


def test_modules_to_save_refused_for_vllm_with_the_alternative(adapters, tmp_path):
    result = assert_refused(
        ["export", adapters["saved"], "--for", "vllm", "-o", tmp_path / "v"],
        "model.norm.weight",
        inputs=[adapters["saved"]],
        output=tmp_path / "v",
    )
    assert "lorasurgery merge" in result.stderr and "--drop-saved" in result.stderr


def test_drop_saved_reports_the_norm(adapters, tmp_path):
    result = run_cli(
        "export", adapters["saved"], "--for", "vllm", "-o", tmp_path / "v", "--drop-saved", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dropped"]["model.norm.weight"] > 0
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None


def test_lora_bias_and_tied_lm_head_are_impossible(adapters, base, tmp_path):
    assert_refused(
        ["export", adapters["bias"], "--for", "sglang", "-o", tmp_path / "s"],
        "lora_bias",
        inputs=[adapters["bias"]],
        output=tmp_path / "s",
    )
    assert_refused(
        ["export", adapters["head"], "--for", "llama.cpp", "-o", tmp_path / "h.gguf", "--base", base],
        "tied lm_head",
        inputs=[adapters["head"], base],
        output=tmp_path / "h.gguf",
    )
    assert_refused(
        ["export", adapters["plain"], "--for", "llama.cpp", "-o", tmp_path / "n.gguf"],
        "pass --base BASE",
        inputs=[adapters["plain"]],
        output=tmp_path / "n.gguf",
    )


def test_existing_output_needs_force(adapters, tmp_path):
    out = tmp_path / "v"
    assert run_cli("export", adapters["plain"], "--for", "vllm", "-o", out).exit_code == 0
    before = tree_digest(out)
    result = run_cli("export", adapters["plain"], "--for", "vllm", "-o", out)
    assert result.exit_code == 1 and "--force" in result.stderr and tree_digest(out) == before
    assert run_cli("export", adapters["plain"], "--for", "vllm", "-o", out, "--force").exit_code == 0
    assert_refused(
        ["export", adapters["plain"], "--for", "peft", "-o", adapters["plain"] / "inside"],
        "inside the input",
        inputs=[adapters["plain"]],
        output=adapters["plain"] / "inside",
    )


def test_inspect_for_exit_codes(adapters, base):
    plain = run_cli("inspect", adapters["plain"], "--for", "vllm")
    assert plain.exit_code == 0, plain.stdout
    assert all(line.startswith("pass") for line in plain.stdout.splitlines()[:-1])
    rslora = run_cli("inspect", adapters["rslora"], "--for", "sglang", "--json")
    assert rslora.exit_code == 3
    rules = {r["id"]: r for r in json.loads(rslora.stdout)["rules"]}
    assert rules["scale"]["status"] == "fixed" and len(rules["scale"]["modules"]) == 4
    dora = run_cli("inspect", adapters["dora"], "--for", "vllm")
    assert dora.exit_code == 4 and "impossible" in dora.stdout and "--base" in dora.stdout
    assert run_cli("inspect", adapters["dora"], "--for", "vllm", "--base", base).exit_code == 3
    assert run_cli("inspect", adapters["plain"], "--for", "llama.cpp", "--base", base).exit_code == 0


def test_embedding_lora_on_a_tied_base_is_refused_for_llamacpp(base, tmp_path):
    adapter = make_adapter(
        base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]
    )
    assert_refused(
        ["export", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "e.gguf"],
        "tied embeddings",
        inputs=[adapter, base],
        output=tmp_path / "e.gguf",
    )
    assert run_cli("export", adapter, "--for", "vllm", "-o", tmp_path / "v").exit_code == 0
