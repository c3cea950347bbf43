"""gpt-oss's MXFP4 experts are read dequantized by every command, and merged into an unquantized
checkpoint (docs/design.md §13).

A tiny real gpt-oss (hidden 64, 4 experts, saved in bf16) has its fused expert parameters stored
as gpt-oss ships them — `<p>_blocks` uint8 (E, out, in/32, 16) of e2m1 pairs and `<p>_scales` E8M0
bytes (E, out, in/32) — by factories.quantize_mxfp4 (triton_kernels' rules: the scale amax/6
rounded up to a power of two, each value to the nearest e2m1), with the quantization_config
gpt-oss's config.json carries. The adapter is a real PEFT LoRA on q/v_proj and, through
target_parameters, on both fused expert parameters, every factor randomised.

The references: transformers' `convert_moe_packed_tensors` and its dequantizing load
(`Mxfp4Config(dequantize=True)`), bit for bit in float32; PEFT's merge_and_unload on the dequantized
base; and every other command on a dequantized copy saved as plain float32 safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from clihelp import assert_refused, run_cli, tree_digest
from factories import load_base, make_adapter, make_gpt_oss, peft_merged_state_dict, quantize_mxfp4
from quantized_checks import (
    EXPERTS,
    QCONFIG,
    assert_broken_base_refused,
    assert_loads_unquantized,
    assert_probe_as_copy,
    broken_copy,
    cli_json,
    dequantized_copy,
    merge_fp32_verified,
    oracle,
    same_adapter_folders,
    same_json,
    store_mxfp4,
)
from safetensors.torch import load_file, save_file
from test_quantized_fp8 import TEXT
from transformers.integrations.mxfp4 import FP4_VALUES

from lorasurgery.io import open_checkpoint

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    plain = make_gpt_oss(root / "plain", hidden_size=64, dtype=torch.bfloat16)
    adapter = make_adapter(
        plain,
        root / "lora",
        model_kind="auto",
        target_modules=["q_proj", "v_proj"],
        target_parameters=list(EXPERTS),
    )
    Q = store_mxfp4(plain, root / "mxfp4")
    return {
        "root": root,
        "plain": plain,
        "adapter": adapter,
        "Q": Q,
        "no-config": store_mxfp4(plain, root / "no-config", None),
        "D": dequantized_copy(Q, root / "dequantized"),
    }


@pytest.fixture(scope="module")
def merged(models):
    out = models["root"] / "merged"
    result = run_cli("merge", models["Q"], models["adapter"], "-o", out)
    assert result.exit_code == 0, result.stderr
    return out, result


# ------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("variant", ["Q", "no-config"])
def test_dequantization_equals_transformers_bit_for_bit(models, variant):
    checkpoint = open_checkpoint(models[variant])
    raw = checkpoint.raw
    plain = load_file(models["plain"] / "model.safetensors")
    # the model's parameter names, at their blocks' place, the scales hidden
    assert not any(name.endswith(("_blocks", "_scales")) for name in checkpoint.tensors)
    assert sorted(checkpoint.tensors) == sorted(plain)
    stored_order = [n.removesuffix("_blocks") for n in raw.tensors if not n.endswith("_scales")]
    assert list(checkpoint.tensors) == stored_order
    for name in (GATE_UP, DOWN):
        info = checkpoint.tensors[name]
        assert (info.dequantized, info.dtype, info.start, info.plain_dtype) == (True, "F32", -1, "BF16")
        assert info.shape == tuple(plain[name].shape)  # (E, in, out): (4, 64, 128) and (4, 64, 64)
        W = checkpoint.read(name)
        blocks, scales = raw.read(f"{name}_blocks"), raw.read(f"{name}_scales")
        assert blocks.dtype == torch.uint8 and W.dtype == torch.float32
        assert torch.equal(W, oracle(blocks, scales)), name
        # and the quantization is real: W is the bf16 parameter to within e2m1's steps
        error = float((W - plain[name].float()).norm() / plain[name].float().norm())
        assert 0 < error < 0.2, (name, error)
    for name in set(checkpoint.tensors) - {GATE_UP, DOWN}:  # plain tensors: as stored
        assert torch.equal(checkpoint.read(name), raw.read(name))


def test_dequantization_equals_the_dequantized_gpt_oss_model(models):
    """What transformers' gpt-oss holds after its dequantizing load, on the CPU, in float32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        models["Q"], quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    state = model.state_dict()
    checkpoint = open_checkpoint(models["Q"])
    for name in (GATE_UP, DOWN):
        assert torch.equal(checkpoint.read(name), state[name]), name


def test_every_code_and_exponent_decodes_as_transformers_does(tmp_path):
    """All 256 bytes (both nibbles, ±0) under the smallest, unit and largest finite exponents."""
    every = torch.arange(256, dtype=torch.uint8)
    blocks = every.reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)  # (E, rows, in/32, 16): each row all 256
    scales = torch.tensor([0, 127, 254], dtype=torch.uint8).reshape(1, 3, 1).repeat(2, 1, 16)
    save_file({f"{GATE_UP}_blocks": blocks, f"{GATE_UP}_scales": scales}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": QCONFIG}))
    W = open_checkpoint(tmp_path).read(GATE_UP)
    assert W.shape == (2, 512, 3)
    assert torch.equal(W.view(torch.int32), oracle(blocks, scales).view(torch.int32))  # -0.0, 2^-127 too
    table = torch.tensor(FP4_VALUES)  # unit scale (row 1): the table, the low nibble first
    assert torch.equal(W[1, 0::2, 1], table[(every & 15).long()])
    assert torch.equal(W[1, 1::2, 1], table[(every >> 4).long()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantization_on_cuda_equals_the_cpu_bit_for_bit(models):
    checkpoint = open_checkpoint(models["Q"])
    for name in checkpoint.tensors:
        on_gpu = checkpoint.read(name, device="cuda")
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), checkpoint.read(name)), name


def test_the_test_quantizer_is_mxfp4_as_transformers_decodes_it():
    """factories.quantize_mxfp4 against transformers' decoder: each value within half an e2m1 step
    of its decoding, the scale the smallest power of two that holds the block's amax in ±6, and a
    decoded tensor quantizes back to the same values."""
    W = _wide_range()
    blocks, scales = quantize_mxfp4(W)
    assert (blocks.shape, scales.shape) == ((3, 40, 3, 16), (3, 40, 3))
    decoded = oracle(blocks, scales)
    assert decoded.shape == W.shape
    scale = torch.exp2(scales.float() - 127)  # (E, out, in/32)
    groups = W.transpose(-1, -2).reshape(3, 40, 3, 32)
    amax = groups.abs().amax(-1)
    assert torch.all(amax <= 6 * scale) and torch.all((amax > 3 * scale) | (amax == 0))
    values = torch.tensor(sorted({abs(v) for v in FP4_VALUES}))
    step = torch.diff(values)  # 0.5 … 2: half of the gap to each neighbour
    x = groups / scale[..., None]
    got = decoded.transpose(-1, -2).reshape(3, 40, 3, 32) / scale[..., None]
    index = torch.searchsorted(values, got.abs().contiguous())
    below = torch.where(index > 0, step[(index - 1).clamp(0, 6)], 0.0)
    above = torch.where(index < 7, step[index.clamp(0, 6)], 0.0)
    assert torch.all((x - got).abs() <= torch.maximum(below, above) / 2 + 1e-6)
    # ties away from zero (triton_kernels adds a guard bit): 0.25 → ½, 0.75 → 1 … 5 → 6, signs kept
    ties = torch.tensor([6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4) * torch.tensor([1, -1] * 16)
    assert torch.equal(decoded[2, :32, 2], ties)
    assert torch.equal(oracle(*quantize_mxfp4(decoded)), decoded)  # MXFP4 values quantize to themselves


# ------------------------------------------------------------------------------- requantizing


def _wide_range(seed=3):
    """(E, in, out) values over five decades, with an all-zero block, a block of tiny values, one
    of tiny negatives beside a 1 (codes −0), and exact e2m1 ties (0.25, 2.5, 5 · a power of two)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(3, 96, 40, generator=g) * torch.logspace(-3, 2, 40)
    W[0, :32, 0] = 0.0
    W[1, :32, 1] = -1e-9
    W[0, 32:64, 0] = -1e-9
    W[0, 32, 0] = 1.0
    W[2, :32, 2] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * torch.tensor([1, -1] * 16)
    return W


def test_quantize_computes_the_blocks_and_scales_the_format_quantizer_does(models):
    from lorasurgery.errors import NonFiniteError
    from lorasurgery.io.mxfp4 import quantize

    checkpoint = open_checkpoint(models["Q"])
    raw = checkpoint.raw
    for name in (GATE_UP, DOWN):
        info = checkpoint.tensors[name]
        W = checkpoint.read(name)
        # the stored codes, decoded and quantized again, decode to the same parameter
        again = quantize(info, W, raw.read)
        assert torch.equal(W, checkpoint.read(name))  # W itself untouched
        assert set(again) == {f"{name}_blocks", f"{name}_scales"}
        assert all(again[k].dtype == torch.uint8 and again[k].shape == raw.read(k).shape for k in again)
        assert torch.equal(oracle(again[f"{name}_blocks"], again[f"{name}_scales"]), W)
        # a changed W: as the test quantizer (validated against transformers' decoder above) stores
        # it, and within half a code step
        W2 = W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
        blocks, scales = quantize(info, W2, raw.read).values()
        expected = quantize_mxfp4(W2)
        assert torch.equal(blocks, expected[0]) and torch.equal(scales, expected[1]), name
        step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(-1, -2)  # (E, in, out)
        assert torch.all((oracle(blocks, scales) - W2).abs() <= step + 1e-12)  # ≤ half of 2 steps at 4–6
    info = checkpoint.tensors[DOWN]
    W = _wide_range().repeat(2, 1, 2)[:4, :64, :64]  # the wide range in DOWN's (4, 64, 64)
    blocks, scales = quantize(info, W).values()
    expected = quantize_mxfp4(W)
    assert torch.equal(blocks, expected[0]) and torch.equal(scales, expected[1])
    assert blocks[0, 0, 1, 0] == 0x86 and bool((blocks[0, 0, 1, 1:] == 0x88).all())  # 4·¼, then −0s
    W[2, 7, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=f"{DOWN}: expert 2 holds NaN"):
        quantize(info, W)


def _truth(D: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W + ΔW in float64 for every targeted tensor, ΔW PEFT's own (its merge on the float32 copy)."""
    base = load_file(D / "model.safetensors")
    merged = peft_merged_state_dict(D, [adapter], model_kind="auto")
    return {name: merged[name].double() for name in merged if not torch.equal(merged[name], base[name])}


def test_merge_writes_an_unquantized_checkpoint_equal_to_peft_on_the_dequantized_base(models, merged):
    out, result = merged
    Q, D, adapter = models["Q"], models["D"], models["adapter"]
    note = " ".join(result.stderr.split())
    assert "MXFP4-quantized: its 2 quantized tensors are written dequantized as bfloat16" in note
    assert "config.json: quantization_config removed" in result.stdout
    ours = load_file(out / "model.safetensors")
    assert sorted(ours) == sorted(load_file(models["plain"] / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    peft32 = peft_merged_state_dict(D, [adapter], model_kind="auto")  # PEFT on the float32 copy
    dequantized = load_file(D / "model.safetensors")
    stored = load_file(Q / "model.safetensors")
    touched = {name for name in peft32 if not torch.equal(peft32[name], dequantized[name])}
    assert {GATE_UP, DOWN} <= touched and len(touched) == 4  # q, v and both expert parameters
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in touched:  # ΔW added in float32 to the dequantized W, rounded once
            expected = peft32[name]
            assert torch.equal(tensor, expected.to(torch.bfloat16)) or torch.all(
                (tensor.float() - expected).abs() <= 2**-8 * expected.abs()
            ), name
            delta = (expected - dequantized[name]).norm() / dequantized[name].norm()
            assert float(delta) > 1e-3, name  # the update is there, and survives
            assert float((tensor.float() - dequantized[name]).norm()) > 0.5 * float(
                (expected - dequantized[name]).norm()
            ), name
        elif name in (GATE_UP, DOWN):
            raise AssertionError(name)
        else:  # untouched plain: byte for byte
            assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name

    assert_loads_unquantized(out, ours)


def test_merge_dtype_fp32_and_verify_equal_peft_exactly_enough(models, tmp_path):
    out = tmp_path / "merged32"
    merged = merge_fp32_verified(models["Q"], models["adapter"], out)
    truth = _truth(models["D"], models["adapter"])
    assert {GATE_UP, DOWN} <= set(truth)
    for name, tensor in merged.items():
        if name in truth:
            assert float((tensor.double() - truth[name]).abs().max()) < 1e-5, name
    # and the merged model computes what PEFT's merged model computes (the gate/up interleave kept)
    ids = torch.arange(12).reshape(1, 12)
    ours = load_base(out, "auto")
    with torch.no_grad():
        theirs = load_base(models["D"], "auto")
        theirs.load_state_dict(peft_merged_state_dict(models["D"], [models["adapter"]], model_kind="auto"))
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


def test_merge_without_quantization_config(models, merged, tmp_path):
    out = tmp_path / "merged"
    summary = cli_json("merge", models["no-config"], models["adapter"], "-o", out, "--json")
    assert (summary["tensors_merged"], summary["tensors_converted"]) == (4, 0)
    theirs = load_file(merged[0] / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


# --------------------------------------------- every other command: as on a dequantized copy


def test_inspect_and_rank_report_read_mxfp4_as_its_dequantized_copy(models):
    Q, D, A = models["Q"], models["D"], models["adapter"]
    swap = (str(Q), str(D))
    inspected = cli_json("inspect", A, "--base", Q, "--json")
    for module in inspected["modules"]:  # what merge --requantize would keep, for the MXFP4 experts only
        retention, changed = module.pop("retention"), module.pop("codes_changed")
        quantized = "experts" in module["name"]
        assert (
            (retention is not None and changed > 0) if quantized else (retention is None and changed is None)
        )
    same_json(inspected, cli_json("inspect", A, "--base", D, "--json"), swap)
    same_json(cli_json("rank-report", Q, "--json", "-"), cli_json("rank-report", D, "--json", "-"), swap)
    ours = cli_json("rank-report", A, "--base", Q, "--json", "-")
    same_json(ours, cli_json("rank-report", A, "--base", D, "--json", "-"), swap)
    # the experts' W, one matrix (out, in) an expert: spectra of the dequantized parameter, not codes
    experts = [m for m in ours["modules"] if m["kind"] == "weight" and "experts" in m["name"]]
    assert len(experts) == 8 and {tuple(m["shape"]) for m in experts} == {(128, 64), (64, 64)}
    assert all(m["metrics"]["stable_rank"] > 1 for m in experts)


def test_extract_resize_combine_export_with_an_mxfp4_base_equal_the_dequantized_copy(
    models, merged, tmp_path
):
    Q, D, A = models["Q"], models["D"], models["adapter"]
    fine_tune = merged[0]  # extract ΔW against Q
    commands = {
        "extract": ["extract", "{B}", fine_tune, "-o", "{out}", "--rank", "4"],
        "resize": ["resize", A, "--rank", "2", "--base", "{B}", "-o", "{out}"],
        "combine": ["combine", A, A, "--exact", "--base", "{B}", "-o", "{out}"],
    }
    for command, args in commands.items():
        outputs = []
        for base in (Q, D):
            out = tmp_path / f"{command}-{base.name}"
            result = run_cli(*[str(a).format(B=base, out=out) for a in args])
            assert result.exit_code == 0, (command, result.stderr)
            outputs.append(out)
        same_adapter_folders(*outputs)


def test_the_probe_loads_the_mxfp4_model_dequantized(models):
    """The probe loads the model with its experts dequantized (a LoRA on expert parameters is not
    probed yet, so the model TARGET)."""
    Q, D = models["Q"], models["D"]
    assert_probe_as_copy(Q, D, TEXT)


# ------------------------------------------------------------------------------------- bad input


def _broken(models, tmp_path, change_tensors=None, change_config=None) -> Path:
    return broken_copy(models["Q"], tmp_path / "broken", change_tensors, change_config)


def _nan_scale(tensors):
    tensors[f"{DOWN}_scales"][2, 5, 1] = 0xFF


def _rename(old, new):
    def change(tensors):
        tensors[new] = tensors.pop(old)

    return change


BAD = {
    "blocks without scales": (
        lambda t: t.pop(f"{DOWN}_scales"),
        f"tensor {DOWN}_blocks holds MXFP4 blocks of {DOWN} with no {DOWN}_scales beside them: its "
        f"scales tensor is missing",
    ),
    "scales without blocks": (
        _rename(f"{DOWN}_blocks", f"{DOWN}_codes"),
        f"tensor {DOWN}_scales is the MXFP4 scales of {DOWN}, but the checkpoint has no {DOWN}_blocks",
    ),
    "scale shape": (
        lambda t: t.update({f"{DOWN}_scales": t[f"{DOWN}_scales"][:, :, :1].contiguous()}),
        f"tensor {DOWN}_scales: shape [4, 64, 1] does not match the blocks of {DOWN}_blocks [4, 64, 2, 16]: "
        f"one scale a block needs [4, 64, 2]",
    ),
    "blocks of 8 bytes": (
        lambda t: t.update({f"{DOWN}_blocks": t[f"{DOWN}_blocks"].reshape(4, 64, 4, 8)}),
        f"tensor {DOWN}_blocks: shape [4, 64, 4, 8]; MXFP4 expert blocks are (experts, rows, columns/32, 16)",
    ),
    "float scales": (
        lambda t: t.update({f"{DOWN}_scales": t[f"{DOWN}_scales"].float()}),
        f"tensor {DOWN}_scales: scales of dtype float32; MXFP4 scales are E8M0 exponents stored as uint8",
    ),
    "int8 blocks": (
        lambda t: t.update({f"{DOWN}_blocks": t[f"{DOWN}_blocks"].view(torch.int8)}),
        f"tensor {DOWN}_blocks: blocks of dtype int8; MXFP4 blocks are uint8 bytes of two e2m1 codes",
    ),
    "FP8 mixed in": (
        lambda t: t.update(
            {
                Q_PROJ: t[Q_PROJ].to(torch.float8_e4m3fn),
                f"{Q_PROJ}_scale_inv": torch.ones(1, 1),
            }
        ),
        f"tensor {Q_PROJ} (float8_e4m3fn codes with weight_scale_inv) contradicts the checkpoint's "
        f'MXFP4 (quantization_config quant_method "mxfp4")',
    ),
    "NaN scale": (
        _nan_scale,
        f"tensor {DOWN}_scales: 1 of 512 scales are 0xFF, E8M0's NaN (the first at [2, 5, 1]: 255); {DOWN} "
        f"cannot be decoded",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_mxfp4_checkpoints_are_refused_naming_file_and_tensor(models, tmp_path, case):
    change, expected = BAD[case]
    folder = _broken(models, tmp_path, change)
    assert_broken_base_refused(
        folder,
        models["adapter"],
        tmp_path / "out",
        expected,
        at_open=case != "NaN scale",  # else found when the tensor is read: every reader says so
        files=r"model\.safetensors",
        read=["rank-report", models["adapter"], "--base", folder, "--json", "-"],
    )


def test_blocks_without_scales_and_without_a_config_are_refused(models, tmp_path):
    """No quantization_config and no scales: the uint8 blocks are still codes, never a weight."""
    folder = shutil.copytree(models["no-config"], tmp_path / "broken")
    tensors = load_file(folder / "model.safetensors")
    for name in (GATE_UP, DOWN):
        del tensors[f"{name}_scales"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(
        ["merge", folder, models["adapter"], "-o", out],
        f"{folder / 'model.safetensors'}: tensor {DOWN}_blocks holds MXFP4 blocks of {DOWN} with no "
        f"{DOWN}_scales beside them: its scales tensor is missing",
        inputs=[folder],
        output=out,
    )
    assert_refused(["rank-report", folder], "its scales tensor is missing", inputs=[folder])


def test_a_broken_read_leaves_no_output_and_inputs_untouched(models, tmp_path):
    folder = _broken(models, tmp_path, _nan_scale)
    before = tree_digest(folder)
    out = tmp_path / "extracted"
    assert_refused(
        ["extract", folder, models["plain"], "-o", out, "--rank", "2"],
        "cannot be decoded",
        inputs=[folder],
        output=out,
    )
    assert tree_digest(folder) == before
