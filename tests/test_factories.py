"""The factories make what they claim: real bases, real PEFT adapters with ΔW ≠ 0, PEFT references."""

from __future__ import annotations

import json
import math
import re
import warnings

import peft
import pytest
import torch
from factories import (
    PREFIX,
    load_base,
    make_adapter,
    make_bert,
    make_gpt2,
    make_llama,
    peft_delta_weights,
    peft_merged_state_dict,
)
from safetensors.torch import load_file


def tensors_of(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    return load_file(folder / "model.safetensors")


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- bases


def test_llama_base(llama_base):
    config = json.loads((llama_base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is False
    tensors = tensors_of(llama_base)
    assert tensors["model.embed_tokens.weight"].shape == (128, 32)
    assert tensors["lm_head.weight"].shape == (128, 32)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # GQA: 2 of 4 heads
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (32, 64)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert not torch.equal(tensors[name], torch.ones_like(tensors[name])), name


def test_llama_sharded_has_an_index_and_the_same_tensors(llama_base, llama_base_sharded):
    index = json.loads((llama_base_sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert not (llama_base_sharded / "model.safetensors").exists()
    a, b = tensors_of(llama_base), tensors_of(llama_base_sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_llama_tied_saves_one_matrix(llama_base_tied):
    config = json.loads((llama_base_tied / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    tensors = tensors_of(llama_base_tied)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors


def test_gpt2_base_is_conv1d_and_tied(gpt2_base):
    tensors = tensors_of(gpt2_base)
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: in × out
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert "lm_head.weight" not in tensors
    assert not torch.equal(tensors["transformer.h.0.ln_1.weight"], torch.ones(32))
    assert not torch.equal(tensors["transformer.h.0.ln_1.bias"], torch.zeros(32))


def test_bert_bases_differ_by_prefix(bert_base, bert_cls_base):
    plain, cls = tensors_of(bert_base), tensors_of(bert_cls_base)
    assert "encoder.layer.0.attention.self.query.weight" in plain
    assert not any(k.startswith("bert.") for k in plain)
    assert "bert.encoder.layer.0.attention.self.query.weight" in cls
    assert cls["classifier.weight"].shape == (2, 32)
    ln = plain["encoder.layer.0.output.LayerNorm.bias"]
    assert not torch.equal(ln, torch.zeros_like(ln))


def test_bases_are_deterministic_and_seeded(tmp_path, llama_base):
    again = tensors_of(make_llama(tmp_path / "a"))
    assert all(torch.equal(v, again[k]) for k, v in tensors_of(llama_base).items())
    other = tensors_of(make_llama(tmp_path / "b", seed=1))
    assert not torch.equal(
        other["model.layers.0.self_attn.q_proj.weight"], again["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases(tmp_path, dtype):
    for make in (make_llama, make_gpt2, make_bert):
        tensors = tensors_of(make(tmp_path / make.__name__, dtype=dtype))
        assert {t.dtype for t in tensors.values()} == {dtype}, make.__name__


# ------------------------------------------------------------------------------------------- adapters

# name: (model kind, base fixture, LoraConfig kwargs, regexes some saved key must match)
CASES = {
    "lora_qv": (
        "llama",
        "llama_base",
        dict(target_modules=["q_proj", "v_proj"]),
        [r"q_proj\.lora_A\.weight$"],
    ),
    "all_linear_patterns": (
        "llama",
        "llama_base",
        dict(
            target_modules="all-linear",
            r=8,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"down_proj": 2},
            alpha_pattern={"down_proj": 4},
        ),
        [r"mlp\.gate_proj\.lora_B", r"self_attn\.o_proj\.lora_A"],
    ),
    "dora": ("llama", "llama_base", dict(use_dora=True), [r"q_proj\.lora_magnitude_vector$"]),
    "embedding": (
        "llama",
        "llama_base",
        dict(target_modules=["embed_tokens", "q_proj"]),
        [r"embed_tokens\.lora_embedding_A$", r"embed_tokens\.lora_embedding_B$"],
    ),
    "lora_bias": ("llama", "llama_base_bias", dict(lora_bias=True), [r"v_proj\.lora_B\.bias$"]),
    "modules_to_save": (
        "llama",
        "llama_base",
        dict(modules_to_save=["lm_head"]),
        [r"^base_model\.model\.lm_head\.weight$"],
    ),
    "layers_to_transform": (
        "llama",
        "llama_base",
        dict(layers_to_transform=[1]),
        [r"layers\.1\.self_attn\.q_proj\.lora_A"],
    ),
    "gpt2_fan_in_fan_out": (
        "gpt2",
        "gpt2_base",
        dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        [r"attn\.c_attn\.lora_A", r"mlp\.c_proj\.lora_B"],
    ),
    "gpt2_wte": ("gpt2", "gpt2_base", dict(target_modules=["wte", "c_attn"]), [r"wte\.lora_embedding_B$"]),
    "gpt2_bias_all": (
        "gpt2",
        "gpt2_base",
        dict(bias="all"),
        [r"h\.0\.ln_1\.bias$", r"c_attn\.base_layer\.bias$"],
    ),
    "bert_lora_only": ("bert", "bert_base", dict(bias="lora_only"), [r"self\.query\.base_layer\.bias$"]),
    "bert_cls_head": (
        "bert-cls",
        "bert_cls_base",
        dict(modules_to_save=["classifier"]),
        [
            r"^base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A",
            r"classifier\.weight$",
        ],
    ),
}


@pytest.fixture(scope="session")
def llama_base_bias(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_base_bias"), attention_bias=True)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, base_fixture, kwargs, patterns = CASES[request.param]
    base = request.getfixturevalue(base_fixture)
    adapter = make_adapter(base, tmp_path_factory.mktemp(request.param), model_kind=kind, seed=3, **kwargs)
    return request.param, kind, base, adapter, kwargs, patterns


def test_saved_keys_match_the_feature(case):
    name, _, _, adapter, kwargs, patterns = case
    keys = list(adapter_tensors(adapter))
    assert all(k.startswith(PREFIX) for k in keys)
    for pattern in patterns:
        assert any(re.search(pattern, k) for k in keys), (name, pattern, keys)
    if "layers_to_transform" in kwargs:
        assert not any(".layers.0." in k for k in keys)
    if kwargs.get("use_dora"):
        assert sum("lora_magnitude_vector" in k for k in keys) == sum(".lora_A." in k for k in keys)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    for field in (
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "bias",
        "lora_bias",
        "rank_pattern",
        "alpha_pattern",
    ):
        if field in kwargs:
            assert config[field] == kwargs[field], field


def test_no_zero_lora_b_and_peft_loads_without_key_warnings(case):
    name, kind, base, adapter, _, _ = case
    tensors = adapter_tensors(adapter)
    for key, value in tensors.items():
        if ".lora_B." in key or "lora_embedding_" in key:
            assert value.abs().max() > 0, key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(load_base(base, kind), str(adapter))
    key_warnings = [str(w.message) for w in caught if re.search(r"missing|unexpected", str(w.message), re.I)]
    assert not key_warnings, key_warnings
    # PEFT warns only about missing lora_* keys; check modules_to_save and unexpected keys as well
    model = peft.get_peft_model(load_base(base, kind), peft.LoraConfig.from_pretrained(str(adapter)))
    result = peft.set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if ".default" in k], result.missing_keys


def test_every_delta_is_nonzero_and_is_s_times_BA(case):
    name, kind, base, adapter, kwargs, _ = case
    deltas, scales = peft_delta_weights(base, adapter, model_kind=kind)
    assert deltas, name
    tensors = adapter_tensors(adapter)
    base_tensors = tensors_of(base)
    for module, delta in deltas.items():
        assert delta.abs().max() > 1e-3, module
        prefix = PREFIX + module
        r = kwargs.get("r", 4)
        alpha = kwargs.get("lora_alpha", 8)
        for key, value in kwargs.get("rank_pattern", {}).items():
            if module.endswith(key):
                r = value
        for key, value in kwargs.get("alpha_pattern", {}).items():
            if module.endswith(key):
                alpha = value
        scale = alpha / math.sqrt(r) if kwargs.get("use_rslora") else alpha / r
        assert scales[module] == pytest.approx(scale), module
        if prefix + ".lora_embedding_A" in tensors:
            a, b = tensors[prefix + ".lora_embedding_A"], tensors[prefix + ".lora_embedding_B"]
            expected = scale * (b @ a).T
        else:
            a, b = tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"]
            expected = scale * (b @ a)
            if kind == "gpt2":  # Conv1D weights are in × out; the factory defaults fan_in_fan_out=True
                assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
                expected = expected.T
        assert a.shape[0] == r, module
        assert delta.shape == base_tensors[module + ".weight"].shape, module
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_non_lora_tensors_are_perturbed(case):
    """modules_to_save copies, saved biases and DoRA magnitudes differ from what PEFT would start from."""
    name, kind, base, adapter, kwargs, _ = case
    base_tensors = tensors_of(base)
    tensors = adapter_tensors(adapter)
    for key, value in tensors.items():
        if (
            key.endswith(".base_layer.weight")
            and key.replace("base_layer.weight", "lora_embedding_A") in tensors
        ):
            # PEFT saves a targeted embedding's (frozen) base layer as is
            assert torch.equal(value, base_tensors[key.removeprefix(PREFIX).replace(".base_layer.", ".")]), (
                key
            )
        elif "lora_magnitude_vector" in key:
            module = key.removeprefix(PREFIX).removesuffix(".lora_magnitude_vector")
            norms = torch.linalg.norm(base_tensors[module + ".weight"], dim=1)  # PEFT's initial magnitude
            assert not torch.allclose(value, norms, rtol=1e-3), key
        elif "lora_" not in key:
            original = key.removeprefix(PREFIX).replace(".base_layer.", ".")
            assert original in base_tensors, key
            assert not torch.equal(value, base_tensors[original]), key


def test_adapters_are_deterministic(llama_base, tmp_path):
    a = adapter_tensors(make_adapter(llama_base, tmp_path / "a", seed=5, use_dora=True))
    b = adapter_tensors(make_adapter(llama_base, tmp_path / "b", seed=5, use_dora=True))
    c = adapter_tensors(make_adapter(llama_base, tmp_path / "c", seed=6, use_dora=True))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------------------- references


def test_merged_state_dict_is_base_plus_delta(llama_base, llama_lora_qv):
    base = tensors_of(llama_base)
    merged = peft_merged_state_dict(llama_base, [llama_lora_qv], model_kind="llama")
    deltas, _ = peft_delta_weights(llama_base, llama_lora_qv, model_kind="llama")
    assert set(deltas) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for name, tensor in base.items():
        module = name.removesuffix(".weight")
        if module in deltas:
            torch.testing.assert_close(merged[name], tensor + deltas[module], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor), name


def test_weighted_sequential_merge_is_the_weighted_sum(llama_base, llama_lora_qv, tmp_path):
    second = make_adapter(llama_base, tmp_path / "second", target_modules=["q_proj", "o_proj"], seed=7)
    base = tensors_of(llama_base)
    merged = peft_merged_state_dict(
        llama_base, [llama_lora_qv, second], model_kind="llama", weights=[0.5, -2.0]
    )
    d1, _ = peft_delta_weights(llama_base, llama_lora_qv, model_kind="llama")
    d2, _ = peft_delta_weights(llama_base, second, model_kind="llama")
    for name, tensor in base.items():
        module = name.removesuffix(".weight")
        expected = tensor + 0.5 * d1.get(module, 0) - 2.0 * d2.get(module, 0)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        merged["model.layers.0.self_attn.o_proj.weight"], base["model.layers.0.self_attn.o_proj.weight"]
    )


def test_dora_reference_merge_renormalises_rows(llama_base, llama_dora):
    base = tensors_of(llama_base)
    merged = peft_merged_state_dict(llama_base, llama_dora, model_kind="llama")
    deltas, _ = peft_delta_weights(llama_base, llama_dora, model_kind="llama")
    adapter = adapter_tensors(llama_dora)
    for module, delta in deltas.items():
        v = base[module + ".weight"] + delta
        m = adapter[PREFIX + module + ".lora_magnitude_vector"]
        expected = (m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v
        torch.testing.assert_close(merged[module + ".weight"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            torch.linalg.norm(merged[module + ".weight"], dim=1), m, rtol=1e-5, atol=1e-6
        )


def test_gpt2_reference_merge_transposes(gpt2_base, gpt2_lora):
    base = tensors_of(gpt2_base)
    merged = peft_merged_state_dict(gpt2_base, [gpt2_lora], model_kind="gpt2")
    adapter = adapter_tensors(gpt2_lora)
    module = "transformer.h.1.mlp.c_fc"
    a, b = adapter[PREFIX + module + ".lora_A.weight"], adapter[PREFIX + module + ".lora_B.weight"]
    expected = base[module + ".weight"] + 2.0 * (b @ a).T
    torch.testing.assert_close(merged[module + ".weight"], expected, rtol=1e-5, atol=1e-6)
