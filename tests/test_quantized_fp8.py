"""transformers' fine-grained FP8 is read dequantized by every command, and merged into an unquantized
checkpoint (docs/design.md §13).

A tiny real Llama saved in bf16 (hidden 72, intermediate 144: no size a multiple of the 32×32 blocks,
so every edge block is partial) is quantized here as DeepSeek's and transformers' quantizers do —
per block amax/448, e4m3 codes, the multiplier stored as `weight_scale_inv` — and saved with the
quantization_config transformers writes; variants: one 0-d scale per tensor, bf16 scales, ue8m0
(powers of two stored as float8_e8m0fnu), and no quantization_config at all (8×8 blocks, which
the shapes tell). The adapter is a real PEFT LoRA with every factor randomised.

The references: transformers' `_dequantize_fp8_weight` and compressed-tensors' block dequantizer
(bit for bit in float32), PEFT's merge_and_unload on the dequantized base, and every other command
on a dequantized copy of the checkpoint saved as plain float32 safetensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from clihelp import assert_refused, run_cli, tree_digest
from factories import load_base, make_adapter, make_llama, peft_merged_state_dict, quantize_fp8
from quantized_checks import (
    assert_broken_base_refused,
    assert_loads_unquantized,
    assert_probe_as_copy,
    broken_copy,
    cli_json,
    merge_fp32_verified,
    same_adapter_folders,
    same_json,
    save_dequantized_copy,
    store_quantized,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorasurgery.io import open_checkpoint

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
TEXT = SAMPLES / "corpus" / "Apache-2.0"
LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # k, o and up stay untouched


def fp8_config(block, scale_fmt="float") -> dict:
    """quantization_config as transformers' FineGrainedFP8Config writes it."""
    return transformers.FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt).to_dict()


# name: (block, scale dtype, ue8m0, quantization_config or None)
VARIANTS = {
    "block": ((32, 32), torch.float32, False, fp8_config((32, 32))),
    "per-tensor": (None, torch.float32, False, fp8_config(None)),
    "bf16-scales": ((32, 32), torch.bfloat16, False, fp8_config((32, 32))),
    "ue8m0": ((32, 32), torch.float8_e8m0fnu, True, fp8_config((32, 32), "ue8m0")),
    "no-config": ((8, 8), torch.float32, False, None),
}


def store_fp8(plain: Path, folder: Path, block, scale_dtype=torch.float32, ue8m0=False, qconfig=None):
    """`plain` (a bf16 checkpoint) with its linear weights quantized; the rest stored as it is."""

    def encode(name, W):
        if LINEAR.search(name):
            codes, scale = quantize_fp8(W, block, scale_dtype, ue8m0)
            return {name: codes, f"{name}_scale_inv": scale}
        return None

    return store_quantized(plain, folder, encode, qconfig)


def oracle(codes, scale, block):
    """transformers' own dequantization, in float32."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(codes, scale, None if block is None else list(block), torch.float32)


def dequantized_copy(fp8: Path, folder: Path, block) -> Path:
    """The FP8 checkpoint dequantized by transformers' function, saved as plain float32 safetensors."""
    folder.mkdir(parents=True)
    stored = load_file(fp8 / "model.safetensors")
    plain = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        scale = stored.get(f"{name}_scale_inv")
        plain[name] = oracle(tensor, scale, block) if scale is not None else tensor.float()
    return save_dequantized_copy(plain, fp8, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    plain = make_llama(root / "plain", hidden_size=72, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    fp8 = {name: store_fp8(plain, root / name, *variant) for name, variant in VARIANTS.items()}
    block = VARIANTS["block"][0]
    return {
        "root": root,
        "plain": plain,
        "adapter": adapter,
        "fp8": fp8,
        "Q": fp8["block"],
        "D": dequantized_copy(fp8["block"], root / "dequantized", block),
    }


@pytest.fixture(scope="module")
def merged(models):
    out = models["root"] / "merged"
    result = run_cli("merge", models["Q"], models["adapter"], "-o", out)
    assert result.exit_code == 0, result.stderr
    return out, result


# ------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantization_equals_transformers_and_compressed_tensors_bit_for_bit(models, variant):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    block = VARIANTS[variant][0]
    checkpoint = open_checkpoint(models["fp8"][variant])
    raw = checkpoint.raw
    assert not any(name.endswith("_scale_inv") for name in checkpoint.tensors)  # the scales hidden
    assert sorted(checkpoint.tensors) == sorted(load_file(models["plain"] / "model.safetensors"))
    quantized = [name for name in checkpoint.tensors if LINEAR.search(name)]
    assert len(quantized) == 14
    for name in quantized:
        info = checkpoint.tensors[name]
        assert (info.dequantized, info.dtype, info.start, info.plain_dtype) == (True, "F32", -1, "BF16")
        W = checkpoint.read(name)
        codes, scale = raw.read(name), raw.read(f"{name}_scale_inv")
        assert codes.dtype == torch.float8_e4m3fn and W.dtype == torch.float32
        assert torch.equal(W, oracle(codes, scale, block)), name
        # compressed-tensors computes in the scale's dtype: float32 scales, as transformers does
        strategy = (
            {"strategy": "tensor"} if block is None else {"strategy": "block", "block_structure": list(block)}
        )
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, **strategy)
        assert torch.equal(W, dequantize(codes, scale.float(), args=args, dtype=torch.float32)), name
        # and the quantization is real: W is the bf16 weight to within e4m3's step
        original = load_file(models["plain"] / "model.safetensors")[name].float()
        assert float((W - original).norm() / original.norm()) < 0.06
    for name in set(checkpoint.tensors) - set(quantized):  # plain tensors: as stored
        assert torch.equal(checkpoint.read(name), raw.read(name))


def test_edge_blocks_are_partial_and_scale_shapes_match(models):
    raw = open_checkpoint(models["Q"], raw=True)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": ((72, 72), (3, 3)),
        "model.layers.0.self_attn.k_proj.weight": ((36, 72), (2, 3)),
        "model.layers.0.mlp.up_proj.weight": ((144, 72), (5, 3)),
        "model.layers.0.mlp.down_proj.weight": ((72, 144), (3, 5)),
    }
    for name, (shape, grid) in shapes.items():
        assert raw.tensors[name].shape == shape and raw.tensors[f"{name}_scale_inv"].shape == grid
    assert open_checkpoint(models["Q"]).tensors["model.layers.0.mlp.up_proj.weight"].block == (32, 32)
    assert open_checkpoint(models["fp8"]["no-config"]).tensors["model.layers.0.mlp.up_proj.weight"].block == (
        8,
        8,
    )


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_code_decodes_as_torch_converts_it(dtype):
    """The CPU's fast conversion (fp8._float32_codes, bits through float16) against torch's own, on
    every one of the 256 codes (NaN, ±0, subnormals), over chunk boundaries and with a NaN code
    in the second chunk only."""
    from lorasurgery.io.fp8 import _CHUNK, _float32_codes

    codes = torch.arange(256, dtype=torch.uint8).repeat(2 * _CHUNK // 256 + 3)
    if dtype == torch.float8_e4m3fn:
        codes[: _CHUNK + 1][(codes[: _CHUNK + 1] & 0x7F) == 0x7F] = 0  # the first chunk: no NaN
    codes = codes.view(dtype)
    ours, theirs = _float32_codes(codes), codes.to(torch.float32)
    nan = theirs.isnan()
    assert nan[_CHUNK:].any() and torch.equal(nan, ours.isnan())
    assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))  # -0.0 too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantization_on_cuda_equals_the_cpu_bit_for_bit(models):
    for variant in VARIANTS:
        checkpoint = open_checkpoint(models["fp8"][variant])
        for name in checkpoint.tensors:
            on_gpu = checkpoint.read(name, device="cuda")
            assert on_gpu.device.type == "cuda"
            assert torch.equal(on_gpu.cpu(), checkpoint.read(name)), (variant, name)


# ----------------------------------------------------------------------------------------- merge


def _truth(D: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W + s·B@A in float64 for every targeted weight, from the dequantized base and the adapter."""
    base = load_file(D / "model.safetensors")
    factors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    truth = {}
    for key, A in factors.items():
        if ".lora_A." not in key:
            continue
        B = factors[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        truth[name] = base[name].double() + scale * (B.double() @ A.double())
    return truth


def test_merge_writes_an_unquantized_checkpoint_equal_to_peft_on_the_dequantized_base(
    models, merged, tmp_path
):
    out, result = merged
    Q, D, adapter = models["Q"], models["D"], models["adapter"]
    note = " ".join(result.stderr.split())
    assert "FP8-quantized: its 14 quantized tensors are written dequantized as bfloat16" in note
    assert "config.json: quantization_config removed" in result.stdout
    ours = load_file(out / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in ours)
    assert sorted(ours) == sorted(load_file(models["plain"] / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    truth = _truth(D, adapter)
    assert len(truth) == 8  # q, v, gate, down in two layers
    peft32 = peft_merged_state_dict(D, [adapter])  # PEFT on the float32 dequantized base
    # PEFT's route on a bf16 load of the dequantized base (what transformers' dequantizing load gives)
    D16 = tmp_path / "dequantized-bf16"
    load_base(D, dtype=torch.bfloat16).save_pretrained(D16)
    peft16 = peft_merged_state_dict(D16, [adapter])
    dequantized = load_file(D / "model.safetensors")
    stored = load_file(Q / "model.safetensors")
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in truth:  # merged: ΔW added in float32 to the dequantized W, rounded once
            expected = peft32[name]
            assert torch.all((tensor.float() - expected).abs() <= 2**-8 * expected.abs() + 1e-30), name
            ours_error = float((tensor.double() - truth[name]).norm())
            peft_error = float((peft16[name].double() - truth[name]).norm())
            assert ours_error <= peft_error, (name, ours_error, peft_error)
        elif LINEAR.search(name):  # untouched quantized: dequantized, rounded once
            assert torch.equal(tensor, dequantized[name].to(torch.bfloat16)), name
        else:  # untouched plain: byte for byte
            assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name

    assert_loads_unquantized(out, ours)


def test_merge_dtype_fp32_and_verify(models, tmp_path):
    out = tmp_path / "merged32"
    merged = merge_fp32_verified(models["Q"], models["adapter"], out)
    truth = _truth(models["D"], models["adapter"])
    for name, tensor in merged.items():
        if name in truth:
            assert float((tensor.double() - truth[name]).abs().max()) < 1e-6, name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_merge_without_quantization_config_deduces_the_blocks(models, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge", models["fp8"]["no-config"], models["adapter"], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["tensors_merged"], summary["tensors_converted"]) == (8, 6)
    assert summary["config_changes"] == {}  # no quantization_config to remove; dtype already bfloat16
    dequantized = open_checkpoint(models["fp8"]["no-config"])
    name = "model.layers.1.self_attn.k_proj.weight"  # untouched
    assert torch.equal(load_file(out / "model.safetensors")[name], dequantized.read(name).to(torch.bfloat16))


# --------------------------------------------- every other command: as on a dequantized copy


def _without_codes(report):
    """An extract report's modules or totals without what only a quantized pair has (the copies' lack it)."""
    drop = {"identical_codes", "scales_changed", "bit_for_bit_modules"}
    if isinstance(report, list):
        return [_without_codes(m) for m in report]
    return {k: v for k, v in report.items() if k not in drop}


@pytest.fixture(scope="module")
def pairs(models, merged):
    """The merged model (the fine-tune), quantized too, and its dequantized copy."""
    root, block = models["root"], VARIANTS["block"][0]
    plain_ft = merged[0]
    Q2 = store_fp8(plain_ft, root / "ft-fp8", block, qconfig=fp8_config(block))
    return plain_ft, Q2, dequantized_copy(Q2, root / "ft-dequantized", block)


def test_inspect_and_rank_report_read_fp8_as_its_dequantized_copy(models, pairs):
    Q, D, A = models["Q"], models["D"], models["adapter"]
    _, Q2, D2 = pairs
    swap = (str(Q), str(D))
    inspected = cli_json("inspect", A, "--base", Q, "--json")
    for module in inspected[
        "modules"
    ]:  # what merge --requantize would keep: tests/test_quantized_requantize.py
        assert module.pop("retention") is not None and module.pop("codes_changed") > 0
    same_json(inspected, cli_json("inspect", A, "--base", D, "--json"), swap)
    same_json(cli_json("rank-report", Q, "--json", "-"), cli_json("rank-report", D, "--json", "-"), swap)
    same_json(
        cli_json("rank-report", A, "--base", Q, "--json", "-"),
        cli_json("rank-report", A, "--base", D, "--json", "-"),
        swap,
    )
    fp8_pair = cli_json("rank-report", Q2, "--base", Q, "--json", "-")
    same_json(
        json.loads(json.dumps(fp8_pair).replace(str(Q2), str(D2))),
        cli_json("rank-report", D2, "--base", D, "--json", "-"),
        swap,
    )
    weights = [
        m for m in cli_json("rank-report", Q, "--json", "-")["modules"] if m["name"].endswith("q_proj")
    ]
    assert weights and all(m["metrics"]["stable_rank"] > 1 for m in weights)  # spectra of W, not of codes


def test_extract_from_fp8_pairs_and_mixed_equals_the_dequantized_copies(models, pairs, tmp_path):
    Q, D = models["Q"], models["D"]
    plain_ft, Q2, D2 = pairs
    for name, (base, ft, base_copy, ft_copy) in {
        "mixed": (Q, plain_ft, D, plain_ft),
        "fp8-pair": (Q, Q2, D, D2),
    }.items():
        ours, theirs = tmp_path / f"{name}-fp8", tmp_path / f"{name}-copy"
        a = cli_json("extract", base, ft, "-o", ours, "--rank", "4", "--json")
        b = cli_json("extract", base_copy, ft_copy, "-o", theirs, "--rank", "4", "--json")
        for key in ("modules", "totals"):  # the identical-code share needs the codes: not in the copies
            same_json(_without_codes(a[key]), b[key], (str(Q), str(D)), key)
        same_adapter_folders(ours, theirs)
    # the mixed extraction recovers the adapter's update: ΔW is taken against the dequantized base
    report = cli_json("extract", Q, plain_ft, "-o", tmp_path / "again", "--rank", "4", "--json")
    q = [m for m in report["modules"] if m["name"].endswith("layers.0.self_attn.q_proj")]
    assert q and q[0]["relative_error"] < 0.05


@pytest.mark.parametrize(
    "command",
    [
        ["resize", "{A}", "--rank", "2", "--base", "{B}", "-o", "{out}"],
        ["combine", "{A}", "{A}", "--exact", "--base", "{B}", "-o", "{out}"],
        ["export", "{A}", "--for", "vllm", "--base", "{B}", "-o", "{out}"],
    ],
    ids=["resize", "combine", "export"],
)
def test_resize_combine_export_with_an_fp8_base(models, command, tmp_path):
    outputs = []
    for base in (models["Q"], models["D"]):
        out = tmp_path / base.name
        args = [part.format(A=models["adapter"], B=base, out=out) for part in command]
        result = run_cli(*args)
        assert result.exit_code == 0, result.stderr
        outputs.append(out)
    same_adapter_folders(*outputs)


def test_the_probe_loads_the_fp8_model_dequantized(models):
    Q, D = models["Q"], models["D"]
    assert_probe_as_copy(Q, D, TEXT)


# ------------------------------------------------------------------------------------- bad input


def _broken(models, tmp_path, change_tensors=None, change_config=None) -> Path:
    def config(c):  # quantization_config when the base declares one
        change_config(c["quantization_config"] if "quantization_config" in c else c)

    return broken_copy(models["Q"], tmp_path / "broken", change_tensors, change_config and config)


NAME = "model.layers.1.self_attn.q_proj.weight"


def _set_scale(value):
    def change(tensors):
        tensors[f"{NAME}_scale_inv"][1, 2] = value

    return change


def _to_bf16_with_scale(tensors):
    tensors[NAME] = torch.zeros(tensors[NAME].shape, dtype=torch.bfloat16)


BAD = {
    "missing scale": (
        lambda t: t.pop(f"{NAME}_scale_inv"),
        None,
        f"tensor {NAME} holds float8_e4m3fn codes with no {NAME}_scale_inv beside them: its scale tensor is missing",
    ),
    "scale shape": (
        lambda t: t.update({f"{NAME}_scale_inv": quantize_fp8(t[NAME].float(), (16, 16))[1]}),
        None,
        f"tensor {NAME}_scale_inv: shape [5, 5] does not match the blocks of {NAME} [72, 72]: in blocks of "
        f"[32, 32] (quantization_config weight_block_size) it needs [3, 3]",
    ),
    "NaN scale": (
        _set_scale(float("nan")),
        None,
        f"tensor {NAME}_scale_inv: 1 of 9 scales are NaN, infinite, zero or negative (the first at [1, 2]: nan); {NAME} cannot be decoded",
    ),
    "infinite scale": (
        _set_scale(float("inf")),
        None,
        "scales are NaN, infinite, zero or negative (the first at [1, 2]: inf)",
    ),
    "zero scale": (
        _set_scale(0.0),
        None,
        "scales are NaN, infinite, zero or negative (the first at [1, 2]: 0.0)",
    ),
    "codes against fmt": (
        None,
        lambda q: q.update(fmt="e5m2"),
        '.weight holds float8_e4m3fn codes, but quantization_config fmt "e5m2" declares float8_e5m2',
    ),
    "bf16 weight with a scale": (
        _to_bf16_with_scale,
        None,
        f"tensor {NAME} holds bfloat16 values, but {NAME}_scale_inv beside it says they are FP8 codes",
    ),
    "scale without codes": (
        lambda t: t.update({"model.layers.1.self_attn.extra_scale_inv": torch.ones(1)}),
        None,
        "tensor model.layers.1.self_attn.extra_scale_inv is the FP8 scale of model.layers.1.self_attn.extra, which the checkpoint does not have",
    ),
    "unknown quant_method": (
        None,
        lambda q: q.update(quant_method="fp9"),
        '.weight is fp9-quantized (float8_e4m3fn codes with weight_scale_inv; quantization_config quant_method "fp9")',
    ),
    "malformed block size": (
        None,
        lambda q: q.update(weight_block_size=[32]),
        "quantization_config: weight_block_size must be [rows, columns] of positive integers or null, got [32]",
    ),
    "not powers of two": (
        None,
        lambda q: q.update(scale_fmt="ue8m0"),
        'or not a power of two as quantization_config scale_fmt "ue8m0" declares',
    ),
    "FP4 experts": (
        None,
        lambda q: q.update(expert_dtype="fp4"),
        "quantization_config: expert_dtype 'fp4' (experts packed as FP4): lorasurgery reads FP8 codes only",
    ),
    "scale of another rank": (
        lambda t: t.update({f"{NAME}_scale_inv": torch.ones(9)}),
        None,
        f"tensor {NAME}_scale_inv: shape [9] is neither one scale nor a grid of blocks over {NAME} [72, 72]",
    ),
    "block size not in the shapes": (
        None,
        lambda c: c.pop("quantization_config"),
        "the FP8 block size cannot be told from the shapes alone",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_fp8_checkpoints_are_refused_naming_file_and_tensor(models, tmp_path, case):
    change_tensors, change_config, expected = BAD[case]
    if case == "block size not in the shapes":
        folder = shutil.copytree(models["Q"], tmp_path / "broken")
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config")
        (folder / "config.json").write_text(json.dumps(config))
    else:
        folder = _broken(models, tmp_path, change_tensors, change_config)
    at_read = case in ("NaN scale", "zero scale")  # found when the tensor is read: every reader says so
    assert_broken_base_refused(folder, models["adapter"], tmp_path / "out", expected, at_open=not at_read)


def test_config_less_grids_that_fit_no_one_block_size_are_refused(models, tmp_path):
    folder = shutil.copytree(models["fp8"]["no-config"], tmp_path / "broken")
    tensors = load_file(folder / "model.safetensors")
    tensors[f"{NAME}_scale_inv"] = quantize_fp8(tensors[NAME].float(), (16, 16))[1]  # 5×5 where 8×8 gives 9×9
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(
        ["merge", folder, models["adapter"], "-o", out],
        f"the FP8 scales fit no single block size: {NAME}_scale_inv [5, 5] over {NAME} [72, 72] needs 15 "
        f"or more rows per block",
        inputs=[folder],
        output=out,
    )


def test_a_broken_read_leaves_no_output_and_inputs_untouched(models, tmp_path):
    folder = _broken(models, tmp_path, _set_scale(float("nan")))
    before = tree_digest(folder)
    out = tmp_path / "extracted"
    assert_refused(
        ["extract", folder, models["plain"], "-o", out, "--rank", "2"],
        "cannot be decoded",
        inputs=[folder],
        output=out,
    )
    assert tree_digest(folder) == before
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f"{NAME}_scale_inv" in f.keys()
