"""Adapter config and key grammar: refusals and errors, on hand-built adapter folders."""

from __future__ import annotations

import json

import pytest
import torch
from clihelp import assert_refused, run_cli

from lorasurgery.adapter import load_adapter, pattern_key
from lorasurgery.errors import AdapterError, UnsupportedError
from lorasurgery.io import save_tensors

PREFIX = "base_model.model."


def write_adapter(folder, config: dict | str | None = None, tensors: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    base_config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    if config is not None:
        text = config if isinstance(config, str) else json.dumps({**base_config, **config})
        (folder / "adapter_config.json").write_text(text)
    if tensors is None:
        tensors = {
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(6, 2),
        }
    save_tensors(folder, tensors, stem="adapter_model")
    return folder


def test_pattern_key_follows_peft_first_match_in_dict_order():
    patterns = {"q_proj": 1, "layers.0.self_attn.q_proj": 2}
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"  # first match wins
    assert pattern_key({"layers.0.self_attn.q_proj": 2}, "model.layers.10.self_attn.q_proj") is None
    assert pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # whole components only
    assert pattern_key({r"layers\.\d\.self_attn\.q_proj": 3}, "model.layers.1.self_attn.q_proj") is not None


def test_module_layout_and_scale_from_a_hand_built_adapter(tmp_path):
    adapter = load_adapter(write_adapter(tmp_path / "a", {"use_rslora": True, "lora_alpha": 8}))
    module = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert (module.kind, module.r, module.shape) == ("linear", 2, (6, 8))
    assert module.scale == pytest.approx(8 / 2**0.5)
    assert module.base_weight_name == "model.layers.0.self_attn.q_proj.weight"
    A, B = adapter.read_factors(module.name)
    assert A.shape == (2, 8) and B.shape == (6, 2)


def test_fan_in_fan_out_gives_the_conv1d_layout(tmp_path):
    adapter = load_adapter(write_adapter(tmp_path / "a", {"fan_in_fan_out": True}))
    assert adapter.modules["model.layers.0.self_attn.q_proj"].shape == (8, 6)


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"peft_type": "IA3"}, UnsupportedError, "peft_type 'IA3' is not supported"),
        ({"alora_invocation_tokens": [1, 2]}, UnsupportedError, "aLoRA adapters are not supported"),
        ({"layer_replication": [[0, 1]]}, UnsupportedError, "layer_replication"),
        ({"init_lora_weights": "pissa_niter_4"}, UnsupportedError, "base that PEFT modified"),
        ({"r": 0}, AdapterError, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj(": 2}}, AdapterError, "malformed rank_pattern key 'q_proj('"),
        ({"rank_pattern": {"q_proj": "two"}}, AdapterError, "must be a positive integer"),
        ({"rank_pattern": {"q_proj": 4}}, AdapterError, "gives r = 4 for this module"),
        ({"bias": "some"}, AdapterError, "bias must be"),
    ],
)
def test_bad_configs_are_refused_naming_the_file(tmp_path, config, error, message):
    folder = write_adapter(tmp_path / "a", config)
    with pytest.raises(error, match=message.replace("(", r"\(")) as raised:
        load_adapter(folder)
    assert str(folder) in str(raised.value)


def test_trainable_tokens_and_kohya_files_are_named(tmp_path):
    tokens = write_adapter(
        tmp_path / "t",
        {},
        {f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta": torch.ones(2, 4)},
    )
    with pytest.raises(AdapterError, match="trainable_token_indices names no rows"):
        load_adapter(tokens)  # the delta's rows need the config's indices
    kohya = tmp_path / "k"
    kohya.mkdir()
    save_tensors(
        kohya,
        {"lora_unet_down.lora_down.weight": torch.ones(2, 4), "lora_unet_down.alpha": torch.tensor(2.0)},
        stem="lora",
    )
    with pytest.raises(UnsupportedError, match="kohya"):
        load_adapter(kohya)
    with pytest.raises(UnsupportedError, match="kohya"):
        load_adapter(kohya / "lora.safetensors")


def test_missing_factor_and_rank_disagreement_name_the_module(tmp_path):
    only_a = write_adapter(tmp_path / "a", {}, {f"{PREFIX}m.q_proj.lora_A.weight": torch.ones(2, 4)})
    with pytest.raises(AdapterError, match="module m.q_proj: has no lora_B"):
        load_adapter(only_a)
    uneven = write_adapter(
        tmp_path / "b",
        {},
        {
            f"{PREFIX}m.q_proj.lora_A.weight": torch.ones(2, 4),
            f"{PREFIX}m.q_proj.lora_B.weight": torch.ones(4, 3),
        },
    )
    with pytest.raises(AdapterError, match="lora_A has rank 2 but lora_B has shape"):
        load_adapter(uneven)


def test_cli_refuses_bad_adapters_with_exit_code_1(tmp_path):
    assert_refused(["inspect", tmp_path / "nowhere"], f"{tmp_path / 'nowhere'}: no such adapter folder")
    garbled = write_adapter(tmp_path / "garbled", "{not json")
    assert_refused(["inspect", garbled], "malformed adapter_config.json", inputs=[garbled])
    ia3 = write_adapter(tmp_path / "ia3", {"peft_type": "IA3"})
    assert_refused(["inspect", ia3], "peft_type 'IA3' is not supported; only LORA adapters are", inputs=[ia3])
    empty = write_adapter(tmp_path / "empty", {}, {})
    assert_refused(["inspect", empty], "the adapter holds no LoRA tensors", inputs=[empty])
    no_config = write_adapter(tmp_path / "noconfig", None)
    assert_refused(["inspect", no_config], "no adapter_config.json; not a PEFT adapter folder")


def test_cli_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "inspect", tmp_path / "nowhere")
    assert result.exit_code == 1 and isinstance(result.exception, AdapterError)
