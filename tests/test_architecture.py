"""lorasurgery.model: module kinds, layouts and ties from a meta-device skeleton, and the layout
rules for bases without a config.json."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from lorasurgery.errors import CheckpointError, MismatchError, UnsupportedError
from lorasurgery.io import open_checkpoint
from lorasurgery.model import Layout, LinearTarget, Structure, linear_layouts, skeleton, structure_of


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(skeleton, "_MEMORY", {})


def test_llama_kinds_and_the_tie_from_the_config(llama_base_tied):
    structure = structure_of(open_checkpoint(llama_base_tied))
    assert structure.known and structure.architecture == "LlamaForCausalLM" and structure.causal_lm
    assert structure.kind_of("model.layers.0.self_attn.q_proj") == "linear"
    assert structure.kind_of("model.embed_tokens") == "embedding"
    assert structure.kind_of("lm_head") == "linear"
    assert structure.module("model.layers.1.mlp.down_proj").parameters == {"weight": (32, 64)}
    assert structure.tied == [("model.embed_tokens.weight", "lm_head.weight")]
    assert (structure.input_embedding, structure.output_embedding) == ("model.embed_tokens", "lm_head")
    assert "lm_head.weight" not in open_checkpoint(llama_base_tied).tensors  # stored once


def test_equal_shapes_are_not_a_tie(llama_base):
    structure = structure_of(open_checkpoint(llama_base))
    tensors = open_checkpoint(llama_base).tensors
    assert tensors["lm_head.weight"].shape == tensors["model.embed_tokens.weight"].shape
    assert structure.tied == []


def test_gpt2_conv1d_is_stored_in_out_and_tied(gpt2_base):
    structure = structure_of(open_checkpoint(gpt2_base))
    c_proj = structure.module("transformer.h.0.attn.c_proj")
    assert c_proj.kind == "conv1d" and c_proj.cls == "Conv1D" and c_proj.fan_in_fan_out
    assert c_proj.parameters["weight"] == (32, 32)
    assert structure.module("transformer.h.0.mlp.c_fc").parameters["weight"] == (32, 128)  # (in, out)
    assert structure.kind_of("transformer.wte") == "embedding"
    assert ("transformer.wte.weight", "lm_head.weight") in structure.tied


def test_bert_ties_the_decoder_bias_too(tmp_path):
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48
    )
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(tmp_path / "cfg")
    summary = skeleton.skeleton_of(json.loads((tmp_path / "cfg" / "config.json").read_text()))
    groups = [tuple(g) for g in summary["tied"]]
    assert ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight") in groups
    assert ("cls.predictions.bias", "cls.predictions.decoder.bias") in groups


def test_a_config_of_another_head_class_maps_onto_the_checkpoint_names(bert_base, tmp_path):
    """A BertModel checkpoint (encoder.…) described by a BertForSequenceClassification config (bert.…)."""
    config = json.loads((bert_base / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    structure = structure_of(open_checkpoint(bert_base), tmp_path / "config.json")
    assert structure.architecture == "BertForSequenceClassification"
    assert structure.kind_of("encoder.layer.0.attention.self.query") == "linear"
    assert structure.kind_of("embeddings.word_embeddings") == "embedding"
    assert "bert.encoder.layer.0.attention.self.query" not in structure.modules
    assert structure.source == str(tmp_path / "config.json")


def test_without_a_config_the_structure_is_unknown(llama_base, tmp_path):
    shutil.copy(llama_base / "model.safetensors", tmp_path / "model.safetensors")
    structure = structure_of(open_checkpoint(tmp_path))
    assert not structure.known and "has no config.json" in structure.source
    assert structure.modules == {} and structure.tied == []


def test_an_unknown_model_type_is_unknown_not_an_error(llama_base, tmp_path):
    shutil.copy(llama_base / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["X"]}))
    structure = structure_of(open_checkpoint(tmp_path))
    assert not structure.known and "no-such-model" in structure.source


def test_a_bad_config_option_is_refused(llama_base, tmp_path):
    with pytest.raises(CheckpointError, match="no such config.json"):
        structure_of(open_checkpoint(llama_base), tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        structure_of(open_checkpoint(llama_base), tmp_path / "list.json")


def test_the_skeleton_is_cached_in_memory_and_on_disk(llama_base, monkeypatch, tmp_path):
    checkpoint = open_checkpoint(llama_base)
    first = structure_of(checkpoint)
    assert list((tmp_path / "cache" / "structure").glob("*.json"))

    def no_build(config):
        raise AssertionError("built again")

    monkeypatch.setattr(skeleton, "_build", no_build)
    started = time.perf_counter()
    again = structure_of(checkpoint)
    assert time.perf_counter() - started < 0.05  # the in-memory cache
    monkeypatch.setattr(skeleton, "_MEMORY", {})
    from_disk = structure_of(checkpoint)
    assert again == first and from_disk == first


# --------------------------------------------------------------------------------------------------
# Layouts


def target(module, stored, features, hint=False, adapter="ad", weight=None):
    return LinearTarget(adapter, module, weight or f"{module}.weight", stored, features, hint)


UNKNOWN = Structure(known=False, source="base has no config.json")


def test_shapes_decide_non_square_weights_whatever_the_flag():
    layouts = linear_layouts(
        UNKNOWN, [target("a", (8, 5), (5, 8), hint=False), target("b", (5, 8), (5, 8), hint=True)]
    )
    assert layouts[("ad", "a")].fan_in_fan_out and layouts[("ad", "a")].reason == "shape"
    assert not layouts[("ad", "b")].fan_in_fan_out


def test_a_square_weight_follows_a_flag_nothing_contradicts():
    layouts = linear_layouts(
        UNKNOWN, [target("a", (8, 8), (8, 8), hint=True), target("b", (8, 5), (5, 8), hint=True)]
    )
    assert layouts[("ad", "a")] == Layout(True, "assumed")


def test_without_a_structure_a_false_flag_is_assumed_for_square_weights_of_any_name():
    """PEFT's flag is its last-created layer's: false is nn.Linear's (custom models' layers), so
    square targets of several names follow it as an assumption; true (a Conv1D's) does not say
    that targets of several names are all Conv1D, and is refused."""
    linear = [target("layers.0.lin0", (8, 8), (8, 8)), target("layers.0.lin1", (8, 8), (8, 8))]
    layouts = linear_layouts(UNKNOWN, linear)
    assert set(layouts.values()) == {Layout(False, "assumed")}
    conv1d = [
        target("h.0.attn.c_proj", (8, 8), (8, 8), hint=True),
        target("h.0.mlp.up", (8, 8), (8, 8), hint=True),
    ]
    with pytest.raises(UnsupportedError, match="square weights of several names"):
        linear_layouts(UNKNOWN, conv1d)


def test_a_square_weight_with_a_contradicted_flag_is_refused_naming_the_module_and_the_fix():
    # GPT-2 via add_adapter: c_proj square, c_attn (in, out), flag left at False
    targets = [target("h.0.attn.c_proj", (8, 8), (8, 8)), target("h.0.attn.c_attn", (8, 24), (24, 8))]
    with pytest.raises(UnsupportedError) as error:
        linear_layouts(UNKNOWN, targets)
    message = str(error.value)
    assert "module h.0.attn.c_proj" in message and "square (8×8)" in message
    assert "--config" in message and "--fan-in-fan-out REGEX" in message
    assert message.count("ad:") == 1


def test_adapters_disagreeing_on_a_square_weight_are_refused():
    targets = [
        target("p", (8, 8), (8, 8), hint=True, adapter="one"),
        target("p", (8, 8), (8, 8), adapter="two"),
    ]
    with pytest.raises(UnsupportedError, match="adapters that target it disagree"):
        linear_layouts(UNKNOWN, targets)


def test_the_option_decides_where_the_structure_does_not_know():
    targets = [target("h.0.attn.c_proj", (8, 8), (8, 8)), target("h.0.mlp.up", (8, 8), (8, 8), hint=True)]
    layouts = linear_layouts(UNKNOWN, targets, fan_in_fan_out="c_proj")
    assert layouts[("ad", "h.0.attn.c_proj")] == Layout(True, "option")
    assert layouts[("ad", "h.0.mlp.up")] == Layout(False, "option")
    with pytest.raises(UnsupportedError, match="not a regular expression"):
        linear_layouts(UNKNOWN, targets, fan_in_fan_out="(")


def test_the_structure_beats_the_flag_and_refuses_a_contradicting_option(gpt2_base):
    structure = structure_of(open_checkpoint(gpt2_base))
    c_proj = target("transformer.h.0.attn.c_proj", (32, 32), (32, 32), hint=False)
    assert linear_layouts(structure, [c_proj])[("ad", c_proj.module)] == Layout(True, "structure")
    with pytest.raises(MismatchError, match="makes transformer.h.0.attn.c_proj.weight a Conv1D"):
        linear_layouts(structure, [c_proj], fan_in_fan_out="c_attn")
