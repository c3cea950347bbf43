"""extract: recovering PEFT merges, PEFT round trips, policies, embeddings, report truth, bad input."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from clihelp import assert_refused, run_cli
from safetensors.torch import load_file, save_file
from tiny import peft_finetune, tiny_gpt2, tiny_llama

from lorasurgery.operations.extract import extract_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_pair")
    tiny_llama().save_pretrained(root / "base")
    ft = peft_finetune(
        tiny_llama(),
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
    )
    ft.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def load_with_peft(base_model, adapter):
    """PeftModel.from_pretrained, failing on any PEFT warning (missing/unexpected keys included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base_model, str(adapter))
    peft_warnings = [
        str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message).lower()
    ]
    assert not peft_warnings, peft_warnings
    return model


def logits(model, seed: int = 0):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_extracting_a_peft_merge_recovers_its_delta_and_logits(llama_pair, tmp_path):
    base, ft = llama_pair
    report = extract_adapter(base, ft, tmp_path / "out", energy=0.999999, svd="exact")
    ranks = {m.name.rsplit(".", 1)[-1]: m.rank for m in report.modules}
    assert ranks == {"down_proj": 4, "q_proj": 4, "v_proj": 2}  # the planted ranks, from the spectra
    assert report.totals["relative_error"] < 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["task_type"] == "CAUSAL_LM"
    assert set(config["rank_pattern"]) == {f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)}
    model = load_with_peft(transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "out")
    scalings = {
        m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)
    }
    assert scalings == {1.0}
    expected = logits(transformers.LlamaForCausalLM.from_pretrained(ft))
    assert torch.allclose(logits(model), expected, atol=1e-5)


def test_gpt2_conv1d_round_trip_uses_fan_in_fan_out(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    ft = peft_finetune(model, target_modules=["c_attn", "c_fc"], r=3, fan_in_fan_out=True)
    ft.save_pretrained(tmp_path / "ft")
    report = extract_adapter(
        tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=3, include=r"c_attn|c_fc"
    )
    assert {m.rank for m in report.modules} == {3} and report.totals["relative_error"] < 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert A.shape == (3, 32) and B.shape == (96, 3)  # PEFT's (r, in) and (out, r) for a (in, out) Conv1D
    model = load_with_peft(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "out")
    expected = logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ft"))
    assert torch.allclose(logits(model), expected, atol=1e-5)


def test_report_errors_are_the_true_errors_of_the_written_adapter(llama_pair, tmp_path):
    base, ft = llama_pair
    report = extract_adapter(base, ft, tmp_path / "out", rank=1, dtype="bf16")
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    from lorasurgery.io import open_checkpoint

    b, f = open_checkpoint(base), open_checkpoint(ft)
    total_err = total = 0.0
    for module in report.modules:
        delta = f.read(module.name + ".weight") - b.read(module.name + ".weight")
        A = written[f"base_model.model.{module.name}.lora_A.weight"]
        B = written[f"base_model.model.{module.name}.lora_B.weight"]
        assert A.dtype == torch.bfloat16
        err = float(torch.linalg.vector_norm(delta - B.float() @ A.float()))
        assert module.relative_error == pytest.approx(err / float(delta.norm()), rel=1e-4)
        total_err += err**2
        total += float(delta.norm()) ** 2
        S = torch.linalg.svdvals(delta.double())
        optimum = math.sqrt(float((S[1:] ** 2).sum())) / float(S.norm())
        assert module.relative_error <= optimum * 1.01 + 5e-3  # bf16 rounding on top of Eckart–Young
    assert report.totals["relative_error"] == pytest.approx(math.sqrt(total_err / total), rel=1e-4)


def test_budget_is_respected_and_spent_where_energy_is(llama_pair, tmp_path):
    base, ft = llama_pair
    report = extract_adapter(base, ft, tmp_path / "out", budget=700)
    assert report.totals["params"] <= 700
    assert sum(m.params for m in report.modules) == report.totals["params"]
    generous = extract_adapter(base, ft, tmp_path / "out2", budget=100_000)
    assert {m.name.rsplit(".", 1)[-1]: m.rank for m in generous.modules} == {
        "down_proj": 4,
        "q_proj": 4,
        "v_proj": 2,
    }


def test_tied_embeddings_as_lora_give_lm_head_the_same_factors(tmp_path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    ft = peft_finetune(model, target_modules=["embed_tokens", "q_proj"], r=2)
    ft.config.tie_word_embeddings = True
    ft.save_pretrained(tmp_path / "ft")
    skipped = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "skip", rank=2)
    assert any(s.name == "model.embed_tokens" and s.relative_norm > 0 for s in skipped.skipped)
    report = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=2, embeddings="lora")
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    A_emb = tensors["base_model.model.model.embed_tokens.lora_embedding_A"]
    B_emb = tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
    assert torch.equal(tensors["base_model.model.lm_head.lora_B.weight"], A_emb.T)
    assert torch.equal(tensors["base_model.model.lm_head.lora_A.weight"], B_emb.T)
    assert any("tied" in n for n in report.notes)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert config["ensure_weight_tying"] is True
    model = load_with_peft(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out")
    expected = logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ft"))
    assert torch.allclose(logits(model), expected, atol=1e-4)


def test_embeddings_full_saves_modules_to_save_once(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    ft = peft_finetune(model, target_modules=["q_proj"], r=2, modules_to_save=["lm_head"])
    with torch.no_grad():
        ft.lm_head.weight.add_(0.01)
    ft.save_pretrained(tmp_path / "ft")
    extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "out", rank=2, embeddings="full")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert [k for k in tensors if "lm_head" in k] == ["base_model.model.lm_head.weight"]
    model = load_with_peft(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out")
    expected = logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ft"))
    assert torch.allclose(logits(model), expected, atol=1e-5)


def test_cli_writes_the_report_json_with_the_spec_schema(llama_pair, tmp_path):
    base, ft = llama_pair
    result = run_cli(
        "--quiet",
        "extract",
        base,
        ft,
        "-o",
        tmp_path / "out",
        "--rank",
        "2",
        "--report",
        tmp_path / "r.json",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads(result.stdout) == report
    assert set(report) == {"modules", "skipped", "totals"}
    assert set(report["modules"][0]) == {"name", "shape", "rank", "retained_energy", "relative_error"}
    assert set(report["totals"]) == {"params", "bytes", "relative_error"}


def test_two_policies_or_none_are_usage_errors(llama_pair, tmp_path):
    base, ft = llama_pair
    for args in (["--rank", "2", "--energy", "0.9"], []):
        result = run_cli("extract", base, ft, "-o", tmp_path / "out", *args)
        assert result.exit_code == 2 and "choose exactly one rank policy" in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_with_nothing_written(llama_pair, tmp_path):
    base, ft = llama_pair
    out = tmp_path / "out"
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert_refused(
        ["extract", base, tmp_path / "gpt2", "-o", out, "--rank", "2"],
        "a gpt2 model cannot be a fine-tune of the llama model",
        inputs=[base, tmp_path / "gpt2"],
        output=out,
    )
    tiny_llama(vocab=80).save_pretrained(tmp_path / "bigvocab")
    assert_refused(
        ["extract", base, tmp_path / "bigvocab", "-o", out, "--rank", "2"],
        "vocabulary sizes differ ([64, 32] in the base, [80, 32] in the fine-tune); --embeddings full",
        inputs=[base],
        output=out,
    )
    tensors = load_file(ft / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(tensors, tmp_path / "nan" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "nan" / "config.json").write_text((ft / "config.json").read_text())
    assert_refused(
        ["extract", base, tmp_path / "nan", "-o", out, "--rank", "2"],
        "module model.layers.1.self_attn.q_proj: NaN/Inf",
        inputs=[base, tmp_path / "nan"],
        output=out,
    )
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, tmp_path / "nan" / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        ["extract", base, tmp_path / "nan", "-o", out, "--rank", "2"],
        "missing from the fine-tune: model.layers.1.self_attn.q_proj.weight",
        inputs=[base],
        output=out,
    )
    out.mkdir()
    assert_refused(
        ["extract", base, ft, "-o", out, "--rank", "2"], "already exists; pass --force", inputs=[base, ft]
    )
    assert_refused(
        ["extract", base, ft, "-o", ft / "adapter", "--rank", "2"],
        "is inside the input",
        inputs=[base, ft],
        output=ft / "adapter",
    )


def test_auto_recovers_a_planted_rank_under_noise_where_energy_counts_noise(tmp_path):
    from lorasurgery.io import save_tensors

    g = torch.Generator().manual_seed(0)
    d, n, planted = 96, 160, 5
    base, ft = {}, {}
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        base[name] = torch.randn(d, n, generator=g) * 0.05
        signal = torch.randn(d, planted, generator=g) @ torch.randn(planted, n, generator=g) * 0.02
        noise = torch.randn(d, n, generator=g) * 0.01
        ft[name] = base[name] + signal + noise
    for folder, tensors in (("base", base), ("ft", ft)):
        (tmp_path / folder).mkdir()
        save_tensors(tmp_path / folder, tensors)
        (tmp_path / folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    auto = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "auto", auto=True)
    assert [m.rank for m in auto.modules] == [planted, planted]
    energy = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "energy", energy=0.99)
    assert all(m.rank > 3 * planted for m in energy.modules)  # the noise floor holds > 1 % of the energy
    ratio = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "ratio", ratio=0.2)
    assert all(1 <= m.rank <= planted for m in ratio.modules)
    capped = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / "capped", auto=True, max_rank=3)
    assert [m.rank for m in capped.modules] == [3, 3]


def test_budget_counts_the_tied_lm_head_copy(tmp_path):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    ft = peft_finetune(model, target_modules=["embed_tokens", "q_proj"], r=2)
    ft.config.tie_word_embeddings = True
    ft.save_pretrained(tmp_path / "ft")
    for budget in (300, 600, 1000):
        report = extract_adapter(tmp_path / "base", tmp_path / "ft", tmp_path / f"b{budget}", budget=budget, embeddings="lora")
        assert report.totals["params"] <= budget, (budget, report.totals["params"])
