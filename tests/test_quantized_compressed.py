"""compressed-tensors checkpoints (llm-compressor's output, vLLM's native format) are read dequantized
by every command, through the compressed-tensors package, and merged into an unquantized checkpoint
(docs/design.md §13).

A tiny real Llama saved in bf16 (hidden 48, intermediate 96: the 32×32 FP8 blocks have partial edge
blocks, every row splits into groups of 16) is quantized by compressed-tensors' own tools
(factories.quantize_compressed: apply_quantization_config, calculate_qparams, ModelCompressor) in
each scheme llm-compressor ships — FP8 per tensor (with static activation scales), per channel and
per block (float-quantized), INT8 per channel and asymmetric per group (int-quantized), INT4
asymmetric per group and symmetric per channel (pack-quantized), NVFP4 (nvfp4-pack-quantized). The
adapter is a real PEFT LoRA with every factor randomised.

The references: the package's own decompression in float32 (its compressor's `decompress`, its
NVFP4 unpack + `dequantize`, called with float32 scales) bit for bit; transformers' dequantizing
load (`CompressedTensorsConfig(dequantize=True)`, the model's bf16) bit for bit once ours is rounded
to bf16; PEFT's merge on the dequantized base; every other command on a dequantized copy of the
checkpoint saved as plain float32 safetensors.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from clihelp import assert_refused, run_cli, tree_digest
from factories import make_adapter, make_llama, peft_merged_state_dict, quantize_compressed
from quantized_checks import (
    assert_broken_base_refused,
    assert_loads_unquantized,
    broken_copy,
    cli_json,
    same_json,
)
from safetensors.torch import load_file, save_file

from lorasurgery.io import open_checkpoint

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # k, o and up stay untouched
FP8_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}

# name: (weights, input_activations, the format the package writes, how far W may be from the weight)
SCHEMES = {
    "fp8-tensor-static": (
        {"num_bits": 8, "type": "float", "strategy": "tensor"},
        {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "float-quantized",
        0.06,
    ),
    "fp8-channel": (
        {"num_bits": 8, "type": "float", "strategy": "channel"},
        FP8_TOKEN,
        "float-quantized",
        0.06,
    ),
    "fp8-block": (
        {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]},
        {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 16, "dynamic": True},
        "float-quantized",
        0.06,
    ),
    "int8-channel": (
        {"num_bits": 8, "type": "int", "strategy": "channel"},
        INT8_TOKEN,
        "int-quantized",
        0.02,
    ),
    "int8-group-asym": (
        {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False},
        INT8_TOKEN,
        "int-quantized",
        0.02,
    ),
    "w4a16-group-asym": (
        {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False},
        None,
        "pack-quantized",
        0.2,
    ),
    "w4a16-channel": ({"num_bits": 4, "type": "int", "strategy": "channel"}, None, "pack-quantized", 0.25),
    "nvfp4": (
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "scale_dtype": torch.float8_e4m3fn,
        },
        None,
        "nvfp4-pack-quantized",
        0.2,
    ),
}
COMPARED = ["fp8-block", "w4a16-group-asym", "nvfp4"]  # every other command, on one of each family


def package_float32(raw: dict, module: str, fmt: str, scheme) -> torch.Tensor:
    """compressed-tensors' own decompression of `module`'s weight, computed in float32."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {p: raw[f"{module}.{p}"] for p in compressor.compression_param_names(scheme)}
    state["weight_scale"] = state["weight_scale"].float()
    if fmt == "nvfp4-pack-quantized":
        packed = state["weight_packed"]
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        return dequantize(
            codes,
            state["weight_scale"],
            args=scheme.weights,
            dtype=torch.float32,
            global_scale=state["weight_global_scale"],
        )
    return compressor.decompress(state, scheme)["weight"]


def scheme_of(folder: Path):
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(
        json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    return config.config_groups["group_0"]


def dequantized_copy(Q: Path, folder: Path) -> Path:
    """Q decoded by the package (float32) and saved as plain float32 safetensors, without its qparams."""
    from compressed_tensors.quantization import QuantizationMetadata

    folder.mkdir(parents=True)
    raw = load_file(Q / "model.safetensors")
    scheme = scheme_of(Q)
    qparams = set(QuantizationMetadata.all_qparam_names()) | {"weight_packed", "weight_shape"}
    quantized = {name.rpartition(".")[0] for name in raw if name.endswith(".weight_scale")}
    plain = {}
    for name, tensor in raw.items():
        module, _, param = name.rpartition(".")
        if module in quantized and param == "weight_scale":
            plain[f"{module}.weight"] = package_float32(raw, module, scheme.format, scheme).contiguous()
        elif param not in qparams and not (module in quantized and param == "weight"):
            plain[name] = tensor.float()
    save_file(plain, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Q / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    plain = make_llama(root / "plain", hidden_size=48, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    Q = {name: quantize_compressed(plain, root / name, w, a) for name, (w, a, _, _) in SCHEMES.items()}
    return {"root": root, "plain": plain, "adapter": adapter, "Q": Q, "D": {}}


def copy_of(models, scheme: str) -> Path:
    if scheme not in models["D"]:  # built once, by the first test that needs it
        models["D"][scheme] = dequantized_copy(models["Q"][scheme], models["root"] / f"{scheme}-dequantized")
    return models["D"][scheme]


# ------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantization_equals_the_package_and_transformers_bit_for_bit(models, scheme):
    Q = models["Q"][scheme]
    _, _, fmt, tolerance = SCHEMES[scheme]
    config = json.loads((Q / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", fmt)  # what the package wrote
    raw = load_file(Q / "model.safetensors")
    ct_scheme = scheme_of(Q)
    checkpoint = open_checkpoint(Q)
    plain = load_file(models["plain"] / "model.safetensors")
    assert sorted(checkpoint.tensors) == sorted(plain)  # codes and qparams hidden, weights under <m>.weight
    assert open_checkpoint(Q).quantization.format == "compressed-tensors"
    quantized = [name for name in checkpoint.tensors if LINEAR.search(name)]
    assert len(quantized) == 14
    with warnings.catch_warnings():  # "the model already has a quantization_config": ours adds dequantize
        warnings.simplefilter("ignore", UserWarning)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            Q, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        ).state_dict()
    for name in quantized:
        info = checkpoint.tensors[name]
        assert (info.dequantized, info.dtype, info.start, info.plain_dtype) == (True, "F32", -1, "BF16")
        W = checkpoint.read(name)
        assert W.dtype == torch.float32 and W.shape == plain[name].shape
        expected = package_float32(raw, name.removesuffix(".weight"), fmt, ct_scheme)
        assert torch.equal(W, expected), name
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(W.to(torch.bfloat16), loaded[name]), (
            name
        )  # transformers' load, in the model's dtype
        original = plain[name].float()
        assert float((W - original).norm() / original.norm()) < tolerance, name  # the quantization is real
    for name in set(checkpoint.tensors) - set(quantized):  # plain tensors: as stored
        assert torch.equal(checkpoint.read(name), raw[name]), name


def test_a_mixed_precision_checkpoint_decodes_each_module_in_its_group(models, tmp_path):
    """Attention in FP8 blocks, the MLP in W4A16 (llm-compressor's "mixed-precision"): each module's
    scheme is its group's, matched by the package's own `re:` targets."""
    from compressed_tensors.quantization import QuantizationConfig

    fp8_block = {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]}
    int4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False}
    groups = {
        "attention": {"targets": ["re:.*self_attn.*"], "weights": fp8_block, "input_activations": FP8_TOKEN},
        "mlp": {"targets": ["re:.*mlp.*"], "weights": int4},
    }
    Q = quantize_compressed(models["plain"], tmp_path / "mixed", groups=groups)
    config = json.loads((Q / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    parsed = {  # the package names the groups it saves itself: found by their targets
        "attention" if group.targets == ["re:.*self_attn.*"] else "mlp": group
        for group in QuantizationConfig.model_validate(config).config_groups.values()
    }
    raw = load_file(Q / "model.safetensors")
    checkpoint = open_checkpoint(Q)
    formats = set()
    for name, info in checkpoint.tensors.items():
        if info.dequantized:
            group = parsed["attention" if "self_attn" in name else "mlp"]
            formats.add(group.format)
            expected = package_float32(raw, name.removesuffix(".weight"), group.format, group)
            assert torch.equal(checkpoint.read(name), expected), name
    assert formats == {"float-quantized", "pack-quantized"}


def test_recognition_names_codes_and_qparams(models):
    q = open_checkpoint(models["Q"]["w4a16-group-asym"], raw=True).quantization
    t = next(t for t in q.tensors if t.logical == "model.layers.0.self_attn.k_proj.weight")
    module = "model.layers.0.self_attn.k_proj"
    assert (q.format, q.quant_method, t.codes) == (
        "compressed-tensors",
        "compressed-tensors",
        f"{module}.weight_packed",
    )
    assert dict(t.parts) == {
        "scale": f"{module}.weight_scale",
        "zero_point": f"{module}.weight_zero_point",
        "shape": f"{module}.weight_shape",
    }
    static = open_checkpoint(models["Q"]["fp8-tensor-static"])  # static activation scales: hidden too
    assert not any(name.endswith(("input_scale", "weight_scale")) for name in static.tensors)
    assert any(
        name.endswith("input_scale")
        for name in open_checkpoint(models["Q"]["fp8-tensor-static"], raw=True).tensors
    )


# ----------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_writes_an_unquantized_checkpoint_equal_to_peft_on_the_dequantized_base(
    models, scheme, tmp_path
):
    Q, adapter = models["Q"][scheme], models["adapter"]
    D = copy_of(models, scheme)
    out = tmp_path / "merged"
    result = run_cli("merge", Q, adapter, "-o", out)
    assert result.exit_code == 0, result.stderr
    note = " ".join(result.stderr.split())
    assert (
        "compressed-tensors-quantized: its 14 quantized tensors are written dequantized as bfloat16" in note
    )
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(load_file(models["plain"] / "model.safetensors"))  # no codes, no qparams
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    peft32 = peft_merged_state_dict(D, [adapter])  # PEFT on the float32 dequantized base
    dequantized = load_file(D / "model.safetensors")
    stored = load_file(Q / "model.safetensors")
    merged = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        if not torch.equal(peft32[name], dequantized[name]):  # merged: ΔW added in float32, rounded once
            merged += 1
            assert torch.equal(tensor, peft32[name].to(torch.bfloat16)) or torch.all(
                (tensor.float() - peft32[name]).abs() <= 2**-8 * peft32[name].abs()
            ), name
        elif LINEAR.search(name):  # untouched quantized: dequantized, rounded once
            assert torch.equal(tensor, dequantized[name].to(torch.bfloat16)), name
        else:  # untouched plain: byte for byte
            assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name
    assert merged == 8  # q, v, gate, down in two layers

    assert_loads_unquantized(out, ours)


# --------------------------------------------- every other command: as on a dequantized copy


@pytest.mark.parametrize("scheme", COMPARED)
def test_inspect_rank_report_and_extract_read_it_as_its_dequantized_copy(models, scheme, tmp_path):
    Q, A, plain = models["Q"][scheme], models["adapter"], models["plain"]
    D = copy_of(models, scheme)
    swap = (str(Q), str(D))
    inspected = cli_json("inspect", A, "--base", Q, "--json")
    for module in inspected["modules"]:  # what merge --requantize would keep (test_quantized_requantize.py)
        assert module.pop("retention") is not None and module.pop("codes_changed") >= 0
    same_json(inspected, cli_json("inspect", A, "--base", D, "--json"), swap)
    report = cli_json("rank-report", Q, "--json", "-")
    same_json(report, cli_json("rank-report", D, "--json", "-"), swap)
    weights = [m for m in report["modules"] if m["name"].endswith("q_proj")]
    assert weights and all(m["metrics"]["stable_rank"] > 1 for m in weights)  # spectra of W, not of codes
    ours, theirs = tmp_path / "from-quantized", tmp_path / "from-copy"
    a = cli_json("extract", Q, plain, "-o", ours, "--rank", "4", "--json")
    b = cli_json("extract", D, plain, "-o", theirs, "--rank", "4", "--json")
    for key in ("modules", "totals"):
        same_json(a[key], b[key], swap, key)
    x, y = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- bad input

MODULE = "model.layers.1.self_attn.q_proj"
FIRST = "model.layers.0.mlp.down_proj"  # the first quantized weight in file order: a config error names it


def _broken(models, tmp_path, scheme, change_tensors=None, change_config=None) -> Path:
    return broken_copy(models["Q"][scheme], tmp_path / "broken", change_tensors, change_config)


def _set_scale(value):
    def change(tensors):
        tensors[f"{MODULE}.weight_scale"].view(-1)[3] = value

    return change


def _qc(change):
    return lambda config: change(config["quantization_config"])


# case: (scheme, change tensors, change config, found at open?, what the message says after the file)
BAD = {
    "missing scale": (
        "fp8-channel",
        lambda t: t.pop(f"{MODULE}.weight_scale"),
        None,
        True,
        f"model.safetensors: tensor {MODULE}.weight: {MODULE}.weight_scale is missing",
    ),
    "missing zero point": (
        "w4a16-group-asym",
        lambda t: t.pop(f"{MODULE}.weight_zero_point"),
        None,
        True,
        f"model.safetensors: tensor {MODULE}.weight: {MODULE}.weight_zero_point is missing",
    ),
    "missing global scale": (
        "nvfp4",
        lambda t: t.pop(f"{MODULE}.weight_global_scale"),
        None,
        True,
        f"{MODULE}.weight_global_scale is missing",
    ),
    "scale shape": (
        "fp8-block",
        lambda t: t.update({f"{MODULE}.weight_scale": torch.ones(3, 3, dtype=torch.bfloat16)}),
        None,
        True,
        f"model.safetensors: tensor {MODULE}.weight_scale: shape [3, 3] does not match the block scales of "
        f"{MODULE}.weight (logical [48, 48]) under config_groups.group_0: it needs [2, 2]",
    ),
    "group scale shape": (
        "w4a16-group-asym",
        lambda t: t.update({f"{MODULE}.weight_scale": t[f"{MODULE}.weight_scale"][:, :2].clone()}),
        None,
        True,
        f"tensor {MODULE}.weight_scale: shape [48, 2] does not match the group scales",
    ),
    "weight_shape": (
        "w4a16-channel",
        lambda t: t.update({f"{MODULE}.weight_shape": torch.tensor([48, 96])}),
        None,
        True,
        f"tensor {MODULE}.weight_shape is [48, 96], which does not match {MODULE}.weight_packed [48, 6]",
    ),
    "codes against the config": (
        "fp8-channel",
        None,
        _qc(lambda q: q["config_groups"]["group_0"]["weights"].update(type="int")),
        True,
        f"tensor {FIRST}.weight holds float8_e4m3fn codes of shape [48, 96], but config_groups.group_0 "
        '("float-quantized", 8-bit int) stores int8 codes',
    ),
    "int codes where float declared": (
        "int8-channel",
        None,
        _qc(lambda q: q["config_groups"]["group_0"]["weights"].update(type="float")),
        True,
        f'tensor {FIRST}.weight holds int8 codes of shape [48, 96], but config_groups.group_0 ("int-quantized", '
        "8-bit float) stores float8_e4m3fn codes",
    ),
    "format against the weights": (
        "int8-channel",
        None,
        _qc(
            lambda q: [
                q.update(format="float-quantized"),
                q["config_groups"]["group_0"].update(format="float-quantized"),
            ]
        ),
        True,
        'config_groups.group_0 declares 8-bit int weights but format "float-quantized"',
    ),
    "float weight where codes belong": (
        "fp8-channel",
        lambda t: t.update({f"{MODULE}.weight": t[f"{MODULE}.weight"].to(torch.bfloat16)}),
        None,
        True,
        f"tensor {MODULE}.weight holds bfloat16 values, but quantization_config quantizes {MODULE} and "
        f"{MODULE}.weight_scale beside it says they are codes",
    ),
    "scale without codes": (
        "fp8-channel",
        lambda t: t.update({"model.layers.1.mlp.extra.weight_scale": torch.ones(1, dtype=torch.bfloat16)}),
        None,
        True,
        "tensor model.layers.1.mlp.extra.weight_scale is the scale of model.layers.1.mlp.extra.weight, which "
        "the checkpoint does not have",
    ),
    "unknown format": (
        "fp8-channel",
        None,
        _qc(lambda q: q.update(format="fp8-quantized")),
        True,
        "config.json: quantization_config: format 'fp8-quantized' is not a compressed-tensors format",
    ),
    "a format not read yet": (
        "fp8-channel",
        None,
        _qc(lambda q: q.update(format="mxfp4-pack-quantized")),
        True,
        "config.json: quantization_config: format 'mxfp4-pack-quantized': lorasurgery reads the "
        "compressed-tensors formats",
    ),
    "not a quantization config": (
        "fp8-channel",
        None,
        _qc(lambda q: q.update(config_groups=[1, 2])),
        True,
        "config.json: quantization_config: is not a compressed-tensors quantization config: config_groups",
    ),
    "ignored yet quantized": (
        "fp8-channel",
        None,
        _qc(lambda q: q["ignore"].append(MODULE)),
        True,
        f"tensor {MODULE}.weight is stored quantized (float8_e4m3fn codes with weight_scale), but no "
        f"config_groups entry of quantization_config targets {MODULE} (or `ignore` names it)",
    ),
    "activation-ordered groups": (
        "w4a16-group-asym",
        lambda t: t.update({f"{MODULE}.weight_g_idx": torch.arange(48, dtype=torch.int32) // 16}),
        None,
        True,
        f"tensor {MODULE}.weight_g_idx: activation-ordered groups",
    ),
    "no quantization_config": (
        "nvfp4",
        None,
        lambda config: config.pop("quantization_config"),
        True,
        "is compressed-tensors-quantized (uint8 codes in weight_packed with weight_scale, "
        "weight_global_scale), but",
    ),
    "NaN scale": (
        "fp8-block",
        _set_scale(float("nan")),
        None,
        False,
        f"tensor {MODULE}.weight_scale: 1 of 4 scales are NaN, infinite or zero (the first at [1, 1]: "
        f"nan); {MODULE}.weight cannot be decoded",
    ),
    "infinite scale": (
        "int8-channel",
        _set_scale(float("inf")),
        None,
        False,
        "scales are NaN, infinite or zero (the first at [3, 0]: inf)",
    ),
    "zero scale": (
        "w4a16-group-asym",
        _set_scale(0.0),
        None,
        False,
        "scales are NaN, infinite or zero (the first at [1, 0]: 0.0)",
    ),
    "NaN global scale": (
        "nvfp4",
        lambda t: t[f"{MODULE}.weight_global_scale"].fill_(float("nan")),
        None,
        False,
        f"tensor {MODULE}.weight_global_scale: 1 of 1 scales are NaN",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_compressed_checkpoints_are_refused_naming_file_and_tensor(models, tmp_path, case):
    scheme, change_tensors, change_config, at_open, expected = BAD[case]
    folder = _broken(models, tmp_path, scheme, change_tensors, change_config)
    before = tree_digest(folder)
    assert_broken_base_refused(folder, models["adapter"], tmp_path / "out", expected, at_open=at_open)
    assert tree_digest(folder) == before


def test_without_the_package_the_reader_says_how_to_install_it(models, monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == "compressed_tensors" or name.startswith("compressed_tensors."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    Q, out = models["Q"]["fp8-channel"], tmp_path / "out"
    result = assert_refused(
        ["merge", Q, models["adapter"], "-o", out],
        "reading a compressed-tensors checkpoint needs the compressed-tensors package, the format's own "
        "implementation: pip install compressed-tensors (or lorasurgery[quantized])",
        inputs=[Q, models["adapter"]],
        output=out,
    )
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------- requantize


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_writes_what_the_package_writes_from_the_same_weights(models, scheme):
    """The requantizer on the plain weights gives, byte for byte, the tensors the package's own
    quantizer stored from them (factories.quantize_compressed: calculate_qparams + compress)."""
    from lorasurgery.io.compressed import quantize

    Q = models["Q"][scheme]
    checkpoint = open_checkpoint(Q)
    stored = load_file(Q / "model.safetensors")
    plain = load_file(models["plain"] / "model.safetensors")
    for name, info in checkpoint.tensors.items():
        if not info.dequantized:
            continue
        ours = quantize(info, plain[name].float(), checkpoint._read_stored)
        expected = {info.codes.name} | {i.name for role, i in info.parts if role.startswith("weight_")}
        assert set(ours) == expected, name
        for key, tensor in ours.items():
            assert tensor.dtype == stored[key].dtype and tensor.shape == stored[key].shape, key
            assert torch.equal(tensor.view(torch.uint8), stored[key].view(torch.uint8)), key


@pytest.mark.parametrize("scheme", ["fp8-block", "w4a16-group-asym", "nvfp4"])
def test_requantizing_a_dequantized_weight_changes_few_codes(models, scheme):
    """deq → quantize is close to the identity: the scales recomputed from the decoded weight give
    back most codes (the range's extremes decode to within a step of the original ones, so each scale
    comes back close: 91–100 % of the codes on these weights)."""
    from lorasurgery.io.compressed import quantize

    Q = models["Q"][scheme]
    checkpoint = open_checkpoint(Q)
    stored = load_file(Q / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    info = checkpoint.tensors[name]
    ours = quantize(info, checkpoint.read(name), checkpoint._read_stored)
    codes = info.codes.name
    same = (ours[codes].view(torch.uint8) == stored[codes].view(torch.uint8)).float().mean()
    assert same > 0.9, float(same)
