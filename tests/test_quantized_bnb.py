"""bitsandbytes NF4 / FP4 (with and without double quantisation) and int8 checkpoints, as transformers
saves them, are read dequantized by every command and merged into an unquantized checkpoint
(docs/design.md §13).

A tiny real Llama saved in bf16 (hidden 40: k/v_proj hold 800 values, 12.5 blocks of 64, so the last
block is partial) is loaded by transformers with a real `BitsAndBytesConfig` on the CPU —
bitsandbytes quantizes it as it loads — and saved with `save_pretrained`: the serialized layout
exactly as users meet it (packed codes, absmax, quant_map, nested_absmax/nested_quant_map, the
quant_state JSON; int8 codes, SCB, weight_format). The adapter is a real PEFT LoRA with every factor
randomised.

The references: `bitsandbytes.functional.dequantize_4bit` and `int8_vectorwise_dequant` on the
stored tensors (bit for bit in float32), transformers' own load of the saved checkpoint and its
`dequantize_bnb_weight`, PEFT's merge_and_unload on the dequantized base, and every other command on
a dequantized copy of the checkpoint saved as plain float32 safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import run_cli
from factories import load_base, make_adapter, make_llama, peft_merged_state_dict, quantize_bnb
from quantized_checks import (
    assert_broken_base_refused,
    assert_loads_unquantized,
    broken_copy,
    cli_json,
    merge_fp32_verified,
    same_json,
    save_dequantized_copy,
)
from safetensors.torch import load_file, save_file

from lorasurgery.io import open_checkpoint

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # k, o and up stay untouched

# name: BitsAndBytesConfig keyword arguments
VARIANTS = {
    "nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-bf16-storage": {  # FSDP's QLoRA: the packed codes stored as bfloat16 words
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": torch.bfloat16,
    },
    "int8": {"load_in_8bit": True},
}
FORMATS = {"nf4": "bitsandbytes-nf4", "fp4": "bitsandbytes-fp4", "int8": "bitsandbytes-int8"}


def fmt_of(variant: str) -> str:
    return FORMATS[variant.split("-")[0]]


def state_of(stored: dict, name: str):
    """bitsandbytes' QuantState of 4-bit weight `name`, from the stored tensors as Linear4bit loads it."""
    parts = {key[len(name) + 1 :]: value for key, value in stored.items() if key.startswith(name + ".")}
    return F.QuantState.from_dict(parts, torch.device("cpu"))


def oracle(stored: dict, name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of stored weight `name`, in float32."""
    if f"{name.removesuffix('.weight')}.SCB" in stored:
        return F.int8_vectorwise_dequant(stored[name], stored[f"{name.removesuffix('.weight')}.SCB"])
    state = state_of(stored, name)
    state.dtype = torch.float32  # decode into float32 (the quant_state says bfloat16: see below)
    return F.dequantize_4bit(stored[name], state)


def dequantized_copy(Q: Path, folder: Path) -> Path:
    """The bnb checkpoint dequantized by bitsandbytes, saved as plain float32 safetensors."""
    folder.mkdir(parents=True)
    stored = load_file(Q / "model.safetensors")
    plain = {}
    for name, tensor in stored.items():
        if LINEAR.search(name):
            plain[name] = oracle(stored, name)
        elif tensor.is_floating_point() and not re.search(r"\.(absmax|quant_map|nested_\w+|SCB)$", name):
            plain[name] = tensor.float()
    return save_dequantized_copy(plain, Q, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    plain = make_llama(root / "plain", hidden_size=40, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    quantized = {name: quantize_bnb(plain, root / name, **config) for name, config in VARIANTS.items()}
    return {"root": root, "plain": plain, "adapter": adapter, "Q": quantized, "D": {}}


def copy_of(models, variant: str) -> Path:
    if variant not in models["D"]:
        models["D"][variant] = dequantized_copy(
            models["Q"][variant], models["root"] / f"{variant}-dequantized"
        )
    return models["D"][variant]


# ------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantization_equals_bitsandbytes_bit_for_bit(models, variant):
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    Q = models["Q"][variant]
    checkpoint = open_checkpoint(Q)
    stored = load_file(Q / "model.safetensors")
    plain = load_file(models["plain"] / "model.safetensors")
    assert checkpoint.quantization.format == fmt_of(variant)
    assert sorted(checkpoint.tensors) == sorted(plain)  # the parts hidden, each weight under its name
    quantized = [name for name in checkpoint.tensors if LINEAR.search(name)]
    assert len(quantized) == 14 and all(checkpoint.tensors[n].dequantized for n in quantized)
    # transformers' own load of the saved checkpoint: its dequantization in the model's dtype
    loaded = load_base(Q, dtype=torch.bfloat16)
    modules = dict(loaded.named_modules())
    for name in quantized:
        info = checkpoint.tensors[name]
        assert (info.dtype, info.start, info.plain_dtype, info.shape) == (
            "F32",
            -1,
            "BF16",
            plain[name].shape,
        )
        W = checkpoint.read(name)
        assert W.dtype == torch.float32 and W.shape == plain[name].shape
        reference = oracle(stored, name)
        assert torch.equal(W.view(torch.int32), reference.view(torch.int32)), name  # -0.0 too
        module = modules[name.removesuffix(".weight")]
        theirs = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
        if variant == "int8":  # computed in float32: bit for bit
            assert theirs.dtype == torch.float32 and torch.equal(W, theirs), name
        else:  # bitsandbytes rounds the same float32 product once to the quant_state's bfloat16
            assert theirs.dtype == torch.bfloat16 and torch.equal(W.to(torch.bfloat16), theirs), name
        # and the quantization is real: W is the bf16 weight to within a 4-bit (8-bit) step
        bound = 0.02 if variant == "int8" else 0.2
        assert float((W - plain[name].float()).norm() / plain[name].float().norm()) < bound, name
    for name in set(checkpoint.tensors) - set(quantized):  # plain tensors: as stored
        assert torch.equal(checkpoint.read(name), stored[name])


def _pack(tmp_path: Path, W: torch.Tensor, **quantize) -> tuple[Path, dict]:
    """W quantized by bitsandbytes and saved as Linear4bit saves it (QuantState.as_dict(packed=True))."""
    codes, state = F.quantize_4bit(W, **quantize)
    stored = {"layer.weight": codes}
    stored.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    tmp_path.mkdir(exist_ok=True)
    save_file(stored, tmp_path / "model.safetensors")
    return tmp_path, stored


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    ("shape", "blocksize", "dtype"),
    [
        ((300, 200), 64, torch.bfloat16),  # 938 blocks: four nested blocks of 256, the last partial
        ((96, 130), 32, torch.float16),
        ((40, 50), 128, torch.float32),  # 2000 values: a partial block
        ((129, 64), 4096, torch.bfloat16),  # one block larger than the tensor… and its rest
        ((3, 33), 64, torch.float32),  # an odd width: bitsandbytes' pure-torch path
        ((1, 7), 32, torch.float32),  # an odd count: half a byte of padding
    ],
)
@pytest.mark.parametrize("double", [False, True], ids=["single", "double"])
def test_every_block_size_shape_and_dtype_decodes_as_bitsandbytes(
    tmp_path, quant_type, shape, blocksize, dtype, double
):
    torch.manual_seed(0)
    W = (torch.randn(shape) * 0.05).to(dtype)
    folder, stored = _pack(
        tmp_path, W, blocksize=blocksize, quant_type=quant_type, compress_statistics=double
    )
    ours = open_checkpoint(folder).read("layer.weight")
    state = state_of(stored, "layer.weight")
    native = F.dequantize_4bit(stored["layer.weight"], state)  # in the quant_state's dtype
    state.dtype = torch.float32
    reference = F.dequantize_4bit(stored["layer.weight"], state)
    assert ours.shape == shape and torch.equal(ours.to(dtype), native)
    if shape[-1] % 2 and quant_type == "fp4":
        # bitsandbytes' fallback for odd widths decodes FP4's code 0b1000 to +0.0 (its stored
        # quant_map's value), its kernels to −0.0 as we do: equal, and the signs differ only there
        assert torch.equal(ours, reference)
        differ = ours.view(torch.int32) != reference.view(torch.int32)
        assert torch.all(ours[differ] == 0) and torch.all(torch.signbit(ours[differ]))
    else:
        assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))


def test_a_pickled_checkpoint_reads_as_its_safetensors(models, tmp_path):
    Q = models["Q"]["nf4-double"]
    folder = shutil.copytree(Q, tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(Q / "model.safetensors"), folder / "pytorch_model.bin")
    ours, theirs = open_checkpoint(folder), open_checkpoint(Q)
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for name in ours.tensors:
        assert torch.equal(ours.read(name), theirs.read(name)), name


@pytest.mark.parametrize(
    ("variant", "roles", "scheme"),
    [
        ("nf4-double", ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state"], "nf4"),
        ("fp4", ["absmax", "quant_map", "quant_state"], "fp4"),
        ("int8", ["SCB", "weight_format"], "int8"),
    ],
)
def test_recognition_names_codes_and_parts(models, variant, roles, scheme):
    q = open_checkpoint(models["Q"][variant], raw=True).quantization
    assert (q.format, q.quant_method, q.source) == (fmt_of(variant), "bitsandbytes", "quantization_config")
    t = next(t for t in q.tensors if t.logical == "model.layers.0.self_attn.q_proj.weight")
    assert (t.codes, [role for role, _ in t.parts], t.scheme) == (t.logical, roles, scheme)


# ----------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("variant", ["nf4-double", "fp4", "int8"])
def test_merge_writes_an_unquantized_checkpoint_equal_to_peft_on_the_dequantized_base(
    models, variant, tmp_path
):

    Q, D, adapter = models["Q"][variant], copy_of(models, variant), models["adapter"]
    out = tmp_path / "merged"
    result = run_cli("merge", Q, adapter, "-o", out)
    assert result.exit_code == 0, result.stderr
    note = " ".join(result.stderr.split())
    assert "-quantized: its 14 quantized tensors are written dequantized as bfloat16" in note
    assert "config.json: quantization_config removed" in result.stdout
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(load_file(models["plain"] / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    peft32 = peft_merged_state_dict(D, [adapter])  # PEFT on the float32 dequantized base
    dequantized = load_file(D / "model.safetensors")
    stored = load_file(Q / "model.safetensors")
    merged = {
        k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        for k in load_file(adapter / "adapter_model.safetensors")
        if ".lora_A." in k
    }
    assert len(merged) == 8
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in merged:  # ΔW added in float32 to the dequantized W, rounded once
            expected = peft32[name]
            assert torch.all((tensor.float() - expected).abs() <= 2**-8 * expected.abs() + 1e-30), name
        elif LINEAR.search(name):  # untouched quantized: dequantized, rounded once
            assert torch.equal(tensor, dequantized[name].to(torch.bfloat16)), name
        else:  # untouched plain: byte for byte
            assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name

    assert_loads_unquantized(out, ours)


def test_merge_dtype_fp32_equals_peft_to_float32_rounding(models, tmp_path):
    Q, D, adapter = models["Q"]["nf4-double"], copy_of(models, "nf4-double"), models["adapter"]
    ours = merge_fp32_verified(Q, adapter, tmp_path / "merged32")
    peft32 = peft_merged_state_dict(D, [adapter])
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, peft32[name], rtol=2e-6, atol=1e-7)


# --------------------------------------------- every other command: as on a dequantized copy


@pytest.mark.parametrize("variant", ["nf4-double", "int8"])
def test_inspect_and_rank_report_read_bnb_as_its_dequantized_copy(models, variant):
    Q, D, A = models["Q"][variant], copy_of(models, variant), models["adapter"]
    swap = (str(Q), str(D))
    inspected = cli_json("inspect", A, "--base", Q, "--json")
    for module in inspected[
        "modules"
    ]:  # what merge --requantize would keep (test_quantized_requantize_formats.py)
        assert module.pop("retention") is not None and module.pop("codes_changed") >= 0
    same_json(inspected, cli_json("inspect", A, "--base", D, "--json"), swap)
    same_json(cli_json("rank-report", Q, "--json", "-"), cli_json("rank-report", D, "--json", "-"), swap)
    same_json(
        cli_json("rank-report", A, "--base", Q, "--json", "-"),
        cli_json("rank-report", A, "--base", D, "--json", "-"),
        swap,
    )
    weights = [
        m for m in cli_json("rank-report", Q, "--json", "-")["modules"] if m["name"].endswith("q_proj")
    ]
    assert weights and all(m["metrics"]["stable_rank"] > 1 for m in weights)  # spectra of W, not of codes


def test_extract_from_a_bnb_base_equals_the_dequantized_copy(models, tmp_path):
    Q, D = models["Q"]["nf4-double"], copy_of(models, "nf4-double")
    ft = tmp_path / "ft"
    assert run_cli("merge", D, models["adapter"], "-o", ft, "--dtype", "fp32").exit_code == 0
    a = cli_json("extract", Q, ft, "-o", tmp_path / "ours", "--rank", "4", "--json")
    b = cli_json("extract", D, ft, "-o", tmp_path / "theirs", "--rank", "4", "--json")
    for key in ("modules", "totals"):
        same_json(a[key], b[key], (str(Q), str(D)), key)
    q = [m for m in a["modules"] if m["name"].endswith("layers.0.self_attn.q_proj")]
    assert q and q[0]["relative_error"] < 1e-3  # the adapter's update, taken against the dequantized W


# ------------------------------------------------------------------------------------- bad input

NAME = "model.layers.1.self_attn.q_proj.weight"
MODULE = NAME.removesuffix(".weight")


def _broken(models, tmp_path, variant, change_tensors=None, change_config=None) -> Path:
    config = change_config and (lambda c: change_config(c["quantization_config"]))
    return broken_copy(models["Q"][variant], tmp_path / "broken", change_tensors, config)


def _state(change):
    def edit(tensors):
        key = f"{NAME}.quant_state.bitsandbytes__nf4"
        state = json.loads(bytes(tensors[key].tolist()).decode())
        text = json.dumps(change(state)) if callable(change) else change
        tensors[key] = torch.tensor(list(text.encode()), dtype=torch.uint8)

    return edit


def _set(part, index, value):
    def edit(tensors):
        tensors[f"{NAME}.{part}" if part != "SCB" else f"{MODULE}.SCB"][index] = value

    return edit


# case: (variant, tensors change, config change, found when read, what the error says)
BAD = {
    "missing absmax": (
        "nf4",
        lambda t: t.pop(f"{NAME}.absmax"),
        None,
        False,
        f"tensor {NAME} holds uint8 codes with no {NAME}.absmax beside them: its bitsandbytes scales are missing",
    ),
    "missing quant_map": (
        "nf4",
        lambda t: t.pop(f"{NAME}.quant_map"),
        None,
        False,
        f"tensor {NAME} is bitsandbytes 4-bit, but {NAME}.quant_map is missing",
    ),
    "missing quant_state": (
        "nf4",
        lambda t: t.pop(f"{NAME}.quant_state.bitsandbytes__nf4"),
        None,
        False,
        f"no {NAME}.quant_state.bitsandbytes__nf4 (or __fp4): its quant_state, which gives the codes' type, "
        f"block size and shape, is missing",
    ),
    "missing nested_absmax": (
        "nf4-double",
        lambda t: t.pop(f"{NAME}.nested_absmax"),
        None,
        False,
        f"{NAME}.nested_absmax, which {NAME}.quant_state.bitsandbytes__nf4 says is there (double quantisation) is missing",
    ),
    "quant_state not JSON": (
        "nf4",
        _state('{"quant_type": "nf4", "blocksize": 64,'),
        None,
        False,
        f"tensor {NAME}.quant_state.bitsandbytes__nf4: not the JSON of a bitsandbytes quant_state (",
    ),
    "shape against the codes": (
        "nf4",
        _state(lambda s: {**s, "shape": [40, 41]}),
        None,
        False,
        f"tensor {NAME}: 800 bytes of codes, but {NAME}.quant_state.bitsandbytes__nf4 gives shape [40, 41]: "
        f"1640 values, two a byte, need 820",
    ),
    "blocksize against absmax": (
        "nf4",
        _state(lambda s: {**s, "blocksize": 128}),
        None,
        False,
        f"tensor {NAME}.absmax: shape [25], but 1600 values in blocks of 128 (quant_state blocksize) needs [13]",
    ),
    "malformed blocksize": (
        "nf4",
        _state(lambda s: {**s, "blocksize": "64"}),
        None,
        False,
        "quant_state blocksize is '64', expected a positive integer",
    ),
    "quant_type against the config": (
        "nf4",
        None,
        lambda q: q.update(bnb_4bit_quant_type="fp4"),
        False,
        ".quant_state.bitsandbytes__nf4 says quant_type 'nf4', but config.json's quantization_config "
        'bnb_4bit_quant_type is "fp4"',  # of the first weight in the file
    ),
    "absmax dtype": (
        "nf4",
        lambda t: t.update({f"{NAME}.absmax": t[f"{NAME}.absmax"].to(torch.bfloat16)}),
        None,
        False,
        f"tensor {NAME}.absmax holds bfloat16; bitsandbytes stores float32 scales here (float32)",
    ),
    "codes against quant_storage": (
        "nf4-bf16-storage",
        lambda t: t.update({NAME: t[NAME].view(torch.uint8)}),
        None,
        False,
        f'tensor {NAME} holds uint8 codes, but bnb_4bit_quant_storage "bfloat16" stores them as bfloat16',
    ),
    "absmax without its weight": (
        "nf4",
        lambda t: t.update({"model.layers.1.self_attn.extra.weight.absmax": torch.ones(4)}),
        None,
        False,
        "tensor model.layers.1.self_attn.extra.weight.absmax is part of the bitsandbytes state of "
        "model.layers.1.self_attn.extra.weight, which the checkpoint does not have",
    ),
    "NaN absmax": (
        "nf4",
        _set("absmax", 3, float("nan")),
        None,
        True,
        f"tensor {NAME}.absmax: 1 of 25 scales are NaN or infinite (the first at [3]: nan); {NAME} cannot be decoded",
    ),
    "infinite nested_absmax": (
        "nf4-double",
        _set("nested_absmax", 0, float("inf")),
        None,
        True,
        f"tensor {NAME}.nested_absmax: 1 of 1 scales are NaN or infinite (the first at [0]: inf)",
    ),
    "quant_map not bitsandbytes' table": (
        "nf4",
        _set("quant_map", 5, 0.5),
        None,
        True,
        f"tensor {NAME}.quant_map is not bitsandbytes' NF4 table (entry 5 is 0.5",
    ),
    "missing SCB": (
        "int8",
        lambda t: t.pop(f"{MODULE}.SCB"),
        None,
        False,
        f"tensor {NAME} holds int8 codes with no {MODULE}.SCB beside them: its bitsandbytes scales are missing",
    ),
    "SCB shape": (
        "int8",
        lambda t: t.update({f"{MODULE}.SCB": t[f"{MODULE}.SCB"][:20].clone()}),
        None,
        False,
        f"tensor {MODULE}.SCB: shape [20], but one per row of {NAME} [40, 40] needs [40]",
    ),
    "NaN SCB": (
        "int8",
        _set("SCB", 7, float("nan")),
        None,
        True,
        f"tensor {MODULE}.SCB: 1 of 40 scales are NaN or infinite (the first at [7]: nan)",
    ),
    "tiled weight_format": (
        "int8",
        lambda t: t.update({f"{MODULE}.weight_format": torch.tensor(2, dtype=torch.uint8)}),
        None,
        False,
        f"tensor {MODULE}.weight_format is 2, a tiled layout of bitsandbytes before 0.45",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_bnb_checkpoints_are_refused_naming_file_and_tensor(models, tmp_path, case):
    variant, change_tensors, change_config, at_read, expected = BAD[case]
    folder = _broken(models, tmp_path, variant, change_tensors, change_config)
    assert_broken_base_refused(
        folder,
        models["adapter"],
        tmp_path / "out",
        expected,
        at_open=not at_read,
        files=r"model\.safetensors",
        then="tensor ",
    )


# ---------------------------------------------------------------------------------- requantizing


def _requantized(info, W, raw):
    from lorasurgery.io.bnb import quantize

    return quantize(info, W, lambda stored: raw.read(stored.name))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), [((300, 200), 64), ((40, 50), 128), ((1, 7), 32)])
@pytest.mark.parametrize("double", [False, True], ids=["single", "double"])
def test_requantizing_equals_bitsandbytes_quantize_4bit(tmp_path, quant_type, shape, blocksize, double):
    torch.manual_seed(1)
    folder, _ = _pack(
        tmp_path,
        torch.randn(shape).to(torch.bfloat16),
        blocksize=blocksize,
        quant_type=quant_type,
        compress_statistics=double,
    )
    checkpoint = open_checkpoint(folder)
    W = torch.randn(shape) * 0.03  # the merged weight, float32
    ours = _requantized(checkpoint.tensors["layer.weight"], W, checkpoint.raw)
    codes, state = F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
    theirs = {
        "layer.weight": codes,
        **{f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()},
    }
    assert sorted(ours) == sorted(theirs)
    assert torch.equal(ours["layer.weight"], codes)  # every code, bit for bit
    ours_state = json.loads(bytes(ours.pop(next(k for k in ours if ".quant_state." in k)).tolist()))
    theirs_state = json.loads(bytes(theirs.pop(next(k for k in theirs if ".quant_state." in k)).tolist()))
    # the checkpoint's dtype kept; the offset the same float32 (bitsandbytes reads it as one), its
    # digits shortened where bitsandbytes' would not fit the stored quant_state's length
    if double:
        ours_offset, theirs_offset = ours_state.pop("nested_offset"), theirs_state.pop("nested_offset")
        assert torch.tensor(ours_offset, dtype=torch.float32) == torch.tensor(
            theirs_offset, dtype=torch.float32
        )
    assert ours_state == {**theirs_state, "dtype": "bfloat16"}
    if not double:
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        return
    if shape == (1, 7):  # one block: absmax − mean(absmax) is 0, and 0/0 decides nothing either way
        return
    assert torch.equal(ours["layer.weight.nested_absmax"], theirs["layer.weight.nested_absmax"])
    # absmax's 8-bit codes: bitsandbytes' CPU library picks the farther of two dynamic-map codes for a
    # value within ~1% of their midpoint (its binary search); ours, its pure-torch kernel's nearest
    differ = ours["layer.weight.absmax"] != theirs["layer.weight.absmax"]
    assert int(differ.sum()) <= max(1, differ.numel() // 50)
    assert torch.equal(ours["layer.weight.nested_quant_map"], theirs["layer.weight.nested_quant_map"])


def test_requantizing_int8_equals_bitsandbytes_int8_quantizer(models):
    checkpoint = open_checkpoint(models["Q"]["int8"])
    info = checkpoint.tensors[NAME]
    W = checkpoint.read(NAME) + 0.01 * torch.randn(info.shape)
    ours = _requantized(info, W, checkpoint.raw)
    codes, scb, _ = F.int8_vectorwise_quant(W.to(torch.float16))  # what Int8Params does
    assert torch.equal(ours[NAME], codes) and torch.equal(ours[f"{MODULE}.SCB"], scb)
    assert torch.equal(ours[f"{MODULE}.weight_format"], torch.tensor(0, dtype=torch.uint8))


@pytest.mark.parametrize("variant", ["nf4", "fp4"])
def test_requantizing_equals_peft_merging_into_a_bnb_linear4bit(models, variant):
    """PEFT's merge_and_unload on a 4-bit model dequantizes each Linear4bit, adds ΔW and quantizes
    again (bitsandbytes' Params4bit); given the same merged weight, ours writes the same bytes."""
    import peft
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    Q = models["Q"][variant]
    model = peft.PeftModel.from_pretrained(load_base(Q, dtype=torch.bfloat16), str(models["adapter"]))
    layer = dict(model.named_modules())[f"base_model.model.{MODULE}"]
    weight = layer.get_base_layer().weight
    merged_input = dequantize_bnb_weight(weight, state=weight.quant_state) + layer.get_delta_weight("default")
    merged = model.merge_and_unload()
    after = dict(merged.named_modules())[MODULE].weight
    checkpoint = open_checkpoint(Q)
    ours = _requantized(checkpoint.tensors[NAME], merged_input, checkpoint.raw)
    assert torch.equal(ours[NAME], after.data)
    assert torch.equal(ours[f"{NAME}.absmax"], after.quant_state.absmax)
    changed = float((ours[NAME] != load_file(Q / "model.safetensors")[NAME]).float().mean())
    assert 0 < changed < 1  # the update moved some codes, not all
