"""inspect against PEFT itself: scales, ‖ΔW‖ and shapes for every adapter kind, base checks, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import peft_adapter, tiny_bert, tiny_gpt2, tiny_llama

from lorasurgery.commands.inspect import inspect_adapter

ADAPTERS = {
    "patterns_rslora": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            r=4,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        ),
    ),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=4, use_dora=True)),
    "embeddings_and_modules_to_save": (
        tiny_llama,
        dict(target_modules=["embed_tokens", "o_proj"], r=2, modules_to_save=["lm_head"]),
    ),
    "lora_bias": (tiny_llama, dict(target_modules=["up_proj"], r=2, lora_bias=True)),
    "layers_to_transform": (tiny_llama, dict(target_modules=["q_proj"], r=2, layers_to_transform=[1])),
    "gpt2_fan_in_fan_out": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], r=3, fan_in_fan_out=True)),
    "gpt2_dora": (tiny_gpt2, dict(target_modules=["c_attn"], r=2, fan_in_fan_out=True, use_dora=True)),
    "bert_bias_all": (
        lambda: tiny_bert(head=True),
        dict(target_modules=["query", "value"], r=2, bias="all", modules_to_save=["classifier"]),
    ),
}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def made(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    build, lora = ADAPTERS[request.param]
    build().save_pretrained(root / "base")
    wrapped = peft_adapter(build(), root / "adapter", **lora)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in wrapped.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }
    return root, layers


def test_scales_and_norms_agree_with_peft(made):
    root, layers = made
    report = inspect_adapter(root / "adapter")
    lora = {m.name: m for m in report.modules if m.kind != "replaced"}
    assert set(lora) == set(layers)
    for name, layer in layers.items():
        delta = layer.get_delta_weight("default")  # PEFT's ΔW, in the base weight's layout
        assert lora[name].scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert lora[name].delta_fro_norm == pytest.approx(float(delta.double().norm()), rel=1e-5, abs=1e-9)
        assert lora[name].r == layer.r["default"]
        assert lora[name].dora == bool(getattr(layer, "use_dora", {}).get("default", False))
        out_in = delta.T if (lora[name].kind == "embedding" or layer.fan_in_fan_out) else delta
        assert lora[name].shape == list(out_in.shape)  # [out, in]
    assert report.totals["modules"] == len(layers)


def test_relative_norm_against_the_base(made):
    root, layers = made
    from lorasurgery.io import open_checkpoint

    base = open_checkpoint(root / "base")
    report = inspect_adapter(root / "adapter", base=root / "base")
    by_name = {m.name: m for m in report.modules}
    for name, layer in layers.items():
        candidates = [n for n in base.tensors if n.endswith(name.removeprefix("bert.") + ".weight")]
        w = base.read(candidates[0]).double()
        expected = float(layer.get_delta_weight("default").double().norm() / w.norm())
        assert by_name[name].relative_norm == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_bert_adapter_on_a_checkpoint_without_the_head_prefix(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "bertmodel")  # names encoder.…, no bert. prefix
    peft_adapter(tiny_bert(head=True), tmp_path / "adapter", target_modules=["query"], r=2)
    report = inspect_adapter(tmp_path / "adapter", base=tmp_path / "bertmodel")
    assert all(m.relative_norm and m.relative_norm > 0 for m in report.modules)


def test_dead_adapter_and_nonfinite_values_are_warned(tmp_path):
    import peft
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path / "base")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(
        tmp_path / "dead"
    )
    report = inspect_adapter(tmp_path / "dead")
    assert any(w.startswith("dead adapter") for w in report.warnings)
    tensors = load_file(tmp_path / "dead" / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, tmp_path / "dead" / "adapter_model.safetensors")
    report = inspect_adapter(tmp_path / "dead")
    bad = [m for m in report.modules if m.nonfinite]
    assert len(bad) == 1 and bad[0].nonfinite == 1 and bad[0].delta_fro_norm is None
    assert any("NaN/Inf" in w for w in report.warnings)


def test_json_schema_is_exactly_the_spec(made):
    root, _ = made
    result = run_cli("inspect", root / "adapter", "--base", root / "base", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {
        "path",
        "format",
        "peft_type",
        "base_model_name_or_path",
        "modules",
        "totals",
        "warnings",
    }
    assert data["format"] == "peft" and data["peft_type"] == "LORA"
    keys = {
        "name",
        "kind",
        "shape",
        "r",
        "alpha",
        "scale",
        "dora",
        "params",
        "delta_fro_norm",
        "relative_norm",
        "nonfinite",
    }
    assert all(set(m) == keys for m in data["modules"])
    assert {m["kind"] for m in data["modules"]} <= {"linear", "embedding", "conv", "replaced"}
    assert set(data["totals"]) == {"modules", "params", "bytes"}
    without_base = json.loads(run_cli("inspect", root / "adapter", "--json").stdout)
    assert all("relative_norm" not in m for m in without_base["modules"])


def test_table_names_module_types(made):
    root, layers = made
    result = run_cli("inspect", root / "adapter")
    assert result.exit_code == 0
    for name in layers:
        assert name.rsplit(".", 1)[-1] in result.stdout
    assert "total:" in result.stdout


def test_mismatched_bases_are_refused(tmp_path):
    peft_adapter(tiny_llama(), tmp_path / "adapter", target_modules=["q_proj"], r=2)
    tiny_llama(hidden=48).save_pretrained(tmp_path / "wide")
    assert_refused(
        ["inspect", tmp_path / "adapter", "--base", tmp_path / "wide"],
        "shape mismatch with the base",
        inputs=[tmp_path / "adapter", tmp_path / "wide"],
    )
    result = run_cli("inspect", tmp_path / "adapter", "--base", tmp_path / "wide")
    assert "model.layers.0.self_attn.q_proj (adapter expects [32, 32], base has [48, 48])" in result.stderr
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert_refused(
        ["inspect", tmp_path / "adapter", "--base", tmp_path / "gpt2"],
        "2 of 2 target modules are not in the base",
        inputs=[tmp_path / "adapter", tmp_path / "gpt2"],
    )


def test_kohya_file_is_named(tmp_path):
    from lorasurgery.io import save_tensors

    save_tensors(
        tmp_path,
        {"lora_te_x.lora_down.weight": torch.ones(2, 3), "lora_te_x.lora_up.weight": torch.ones(3, 2)},
        stem="kohya",
    )
    assert_refused(["inspect", tmp_path / "kohya.safetensors"], "kohya / sd-scripts LoRA", inputs=[tmp_path])


def test_base_decides_the_layout_not_the_adapter_flag(gpt2_base, tmp_path):
    """GPT-2 Conv1D (c_attn 32→96, c_proj square) with fan_in_fan_out saved false: against the base,
    inspect lays each module out from the model's structure, as PEFT does, and ‖ΔW‖/‖W‖ is PEFT's."""
    from factories import load_base, make_adapter, peft_delta_weights

    adapter = make_adapter(
        gpt2_base, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_proj"]
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = inspect_adapter(adapter, base=gpt2_base)
    deltas, _ = peft_delta_weights(gpt2_base, adapter, model_kind="gpt2")
    weights = dict(load_base(gpt2_base, "gpt2").named_parameters())
    modules = {m.name: m for m in report.modules}
    assert set(deltas) <= set(modules)
    for name, delta in deltas.items():
        expected = float(delta.double().norm() / weights[f"{name}.weight"].double().norm())
        assert modules[name].relative_norm == pytest.approx(expected, rel=1e-5), name
