"""`merge --requantize` and `--min-retention` into MXFP4, compressed-tensors and bitsandbytes bases,
through the CLI (docs/design.md §13); tests/test_quantized_requantize.py does the same for FP8.

The bases are those of each format's own test file: a tiny real gpt-oss with its experts stored as
MXFP4 (test_quantized_mxfp4.store_mxfp4), a tiny real Llama quantized by compressed-tensors' own tools
in every scheme llm-compressor ships (factories.quantize_compressed), and one loaded by transformers
with a real BitsAndBytesConfig and saved (factories.quantize_bnb). The adapters are real PEFT LoRAs
with every factor randomised (factories.make_adapter).

The references: transformers' `convert_moe_packed_tensors` and compressed-tensors' own decompression
for deq(W′), in float64 from the written files; PEFT's ΔW; transformers' loaders (Mxfp4Config and
CompressedTensorsConfig with dequantize=True, BitsAndBytesConfig) for loading the output, and their
own rules (`should_convert_module`, the bnb skip list) for which modules stay plain; PEFT's
merge_and_unload on the 4-bit model for the NF4 codes and absmax.

"Half a code step" per format (what the bound asserts, element by element, at the *written* scale,
which --requantize recomputes from deq(W) + ΔW):
  MXFP4          ½ the e2m1 spacing at |x| = |t|/2^e: ¼ below 2, ½ in [2, 4), 1 in [4, 6], times 2^e.
  compressed     x = t_m/s (+ zero point) in code units, t_m = t rounded to the model's dtype (the
                 package quantizes the weight in that dtype): ½ for integer codes, ½ the e4m3 or
                 e2m1 spacing at |x| for float codes; plus 2^-8·(|t_m/s| + |x|), since the package
                 computes t_m/s and then + zero point in that dtype, rounding each; plus |x − clamp(x)| where the scale, stored in
                 the model's dtype (NVFP4: e4m3 over a float32 global scale), rounded below amax/qmax
                 and the extreme element clamps; plus |t − t_m|.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from factories import make_adapter, make_gpt_oss, make_llama, peft_delta_weights, quantize_compressed
from safetensors.torch import load_file
from test_quantized_compressed import SCHEMES, package_float32, scheme_of
from test_quantized_compressed import TARGETS as CT_TARGETS
from test_quantized_mxfp4 import DOWN, EXPERTS, GATE_UP, dequantized_copy, oracle, store_mxfp4
from test_quantized_requantize import half_step, merge_json, same_bytes, shrink

from lorasurgery.io import open_checkpoint

E2M1_HALF = ((2.0, 0.25), (4.0, 0.5), (float("inf"), 1.0))  # (below |x|, half the spacing)


def e2m1_half(x: torch.Tensor) -> torch.Tensor:
    magnitude = x.abs()
    return torch.where(magnitude < 2, 0.25, torch.where(magnitude < 4, 0.5, 1.0)).double()


def retention(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> float:
    return float(((after - before) * delta).sum() / (delta * delta).sum())


# ================================================================================== MXFP4


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    root = tmp_path_factory.mktemp("requantize-mxfp4")
    plain = make_gpt_oss(root / "plain", hidden_size=64, dtype=torch.bfloat16)
    adapter = make_adapter(
        plain, root / "lora", model_kind="auto", target_modules=["q_proj"], target_parameters=list(EXPERTS)
    )
    # only down_proj of the experts: gate_up_proj, untouched, shares its module
    down_only = make_adapter(
        plain,
        root / "down-only",
        model_kind="auto",
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.down_proj"],
        seed=2,
    )
    Q = store_mxfp4(plain, root / "Q")
    return {
        "root": root,
        "adapter": adapter,
        "down_only": down_only,
        "Q": Q,
        "D": dequantized_copy(Q, root / "D"),
    }


def _mx_deltas(mx, adapter) -> dict[str, torch.Tensor]:
    """PEFT's ΔW of every expert parameter, in float64: its merge on the dequantized copy, less it."""
    from factories import peft_merged_state_dict

    base = load_file(mx["D"] / "model.safetensors")
    merged = peft_merged_state_dict(mx["D"], [adapter], model_kind="auto")
    return {
        n: merged[n].double() - base[n].double()
        for n in (GATE_UP, DOWN)
        if not torch.equal(merged[n], base[n])
    }


def test_mxfp4_requantized_merge(mx, tmp_path):
    out = tmp_path / "out"
    summary = merge_json(mx["Q"], mx["adapter"], "-o", out, "--requantize")
    base, written = load_file(mx["Q"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert list(written) == list(base)
    assert json.loads((out / "config.json").read_text()) == json.loads((mx["Q"] / "config.json").read_text())
    deltas = _mx_deltas(mx, mx["adapter"])
    assert set(deltas) == {GATE_UP, DOWN}
    touched = {f"{n}_{part}" for n in deltas for part in ("blocks", "scales")} | {
        "model.layers.0.self_attn.q_proj.weight"
    }
    for name in base:  # dtypes and shapes kept; untouched tensors byte for byte
        assert (written[name].dtype, written[name].shape) == (base[name].dtype, base[name].shape), name
        if name not in touched:
            assert same_bytes(written[name], base[name]), name

    rows = {row["tensor"]: row for row in summary["retention"]}
    assert set(rows) == set(deltas) and summary["tensors_requantized"] == 2
    for name, delta in deltas.items():
        before = oracle(base[f"{name}_blocks"], base[f"{name}_scales"]).double()
        after = oracle(written[f"{name}_blocks"], written[f"{name}_scales"]).double()
        target = before + delta
        # the written scale 2^(e−127), per block of 32 inputs of one output, in the (E, in, out) layout
        scale = (
            torch.exp2(written[f"{name}_scales"].double() - 127).repeat_interleave(32, -1).transpose(-1, -2)
        )
        bound = e2m1_half(target / scale) * scale
        assert bool(((after - target).abs() <= bound * (1 + 1e-6) + 1e-12).all()), name
        rho = retention(before, after, delta)
        assert abs(rows[name]["retention"] - rho) < 1e-6, (name, rows[name]["retention"], rho)
        assert 0.9 < rho < 1.1
        changed = (written[f"{name}_blocks"] != base[f"{name}_blocks"]).double().mean()
        assert rows[name]["codes_changed"] == pytest.approx(float(changed), abs=1e-12)
        assert rows[name]["written"] == "MXFP4"

    # transformers' own dequantizing load reads what we read, bit for bit
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    state, ours = model.state_dict(), open_checkpoint(out)
    for name in (GATE_UP, DOWN):
        assert torch.equal(state[name], ours.read(name)), name


def test_mxfp4_min_retention_writes_the_whole_experts_module_plain(mx, tmp_path):
    """down_proj below the threshold (every module is, at 1e9); transformers converts an experts
    module whole, so the untouched gate_up_proj is written plain with it and the experts module
    listed. (A tiny update would not do: its ρ is dominated by the blocks whose scale doubles,
    docs/design.md §13.)"""
    from transformers.quantizers.quantizers_utils import should_convert_module

    out = tmp_path / "out"
    summary = merge_json(mx["Q"], mx["down_only"], "-o", out, "--requantize", "--min-retention", "1e9")
    rows = {row["tensor"]: row for row in summary["retention"]}
    assert set(rows) == {DOWN} and rows[DOWN]["written"] == "bfloat16"
    written = load_file(out / "model.safetensors")
    for name in (GATE_UP, DOWN):
        assert written[name].dtype == torch.bfloat16
        assert f"{name}_blocks" not in written and f"{name}_scales" not in written
    base = open_checkpoint(mx["Q"])
    assert torch.equal(written[GATE_UP].float(), base.read(GATE_UP))  # untouched, dequantized (exact in bf16)
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    before = json.loads((mx["Q"] / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"
    ]
    assert listed == before + ["model.layers.0.mlp.experts"]
    # the rule transformers' MXFP4 loader applies to each GptOssMLP (replace_with_mxfp4_linear)
    assert should_convert_module("model.layers.0.mlp.experts", before)
    assert not should_convert_module("model.layers.0.mlp.experts", listed)
    assert any("gate_up_proj" in note and "one module" in note for note in summary["notes"])

    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    state, ours = model.state_dict(), open_checkpoint(out)
    for name in ours.tensors:
        if name in state:
            assert torch.equal(state[name], ours.read(name).float()), name


# ================================================================================ compressed


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("requantize-ct")
    plain = make_llama(root / "plain", hidden_size=48, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=CT_TARGETS)
    return {
        "root": root,
        "plain": plain,
        "adapter": adapter,
        "delta": peft_delta_weights(plain, adapter)[0],
        "Q": {},
    }


def ct_base(ct, scheme: str) -> Path:
    if scheme not in ct["Q"]:
        w, a, _, _ = SCHEMES[scheme]
        ct["Q"][scheme] = quantize_compressed(ct["plain"], ct["root"] / scheme, w, a)
    return ct["Q"][scheme]


def _code_bound(raw: dict, module: str, scheme, target: torch.Tensor) -> torch.Tensor:
    """Per element of `target` (float64, deq(W) + ΔW), how far the written weight may be from it."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils import calculate_range

    args = scheme.weights
    scale = raw[f"{module}.weight_scale"].float()
    zero = raw.get(f"{module}.weight_zero_point")
    if zero is not None and zero.dtype == torch.int32:  # pack-quantized packs its zero points too
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        zero = unpack_from_int32(zero, args.num_bits, (target.shape[0], scale.shape[-1]), packed_dim=0)
    global_scale = raw.get(f"{module}.weight_global_scale")

    def decode(q):
        return dequantize(q, scale, zero, args=args, dtype=torch.float32, global_scale=global_scale).double()

    zeros = torch.zeros(target.shape)
    origin, step = decode(zeros), decode(zeros + 1) - decode(zeros)  # the package's own code → value
    modeled = target.to(torch.bfloat16).double()  # the package quantizes the weight in the model's dtype
    x = (modeled - origin) / step
    low, high = calculate_range(args, torch.device("cpu"))
    clamped = x.clamp(float(low), float(high))
    if args.type == "int":
        half = torch.full_like(x, 0.5)
    elif args.num_bits == 4:
        half = e2m1_half(clamped)
    else:
        half = half_step(clamped).double()
    # the package computes x in the model's dtype before rounding it to a code: t/s rounded to
    # bfloat16, then + zero point rounded again, each up to half an ulp (2^-8 of the magnitude)
    rounded = ((modeled / step).abs() + x.abs()) * 2.0**-8
    return ((clamped - x).abs() + half + rounded) * step.abs() + (target - modeled).abs()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_requantized_merge(ct, tmp_path, scheme):
    Q, out = ct_base(ct, scheme), tmp_path / "out"
    fmt = SCHEMES[scheme][2]
    summary = merge_json(Q, ct["adapter"], "-o", out, "--requantize")
    base, written = load_file(Q / "model.safetensors"), load_file(out / "model.safetensors")
    assert list(written) == list(base)
    assert json.loads((out / "config.json").read_text()) == json.loads((Q / "config.json").read_text())
    deltas = {f"{m}.weight": d.double() for m, d in ct["delta"].items()}
    modules = {n.removesuffix(".weight") for n in deltas}
    ct_scheme = scheme_of(Q)
    static = {"input_scale"}
    for name in base:
        assert (written[name].dtype, written[name].shape) == (base[name].dtype, base[name].shape), name
        module, _, param = name.rpartition(".")
        if module not in modules or param in static:
            assert same_bytes(written[name], base[name]), name  # untouched; static scales kept
    rows = {row["tensor"]: row for row in summary["retention"]}
    assert set(rows) == set(deltas) and summary["tensors_requantized"] == 8
    for name, delta in deltas.items():
        module = name.removesuffix(".weight")
        before = package_float32(base, module, fmt, ct_scheme).double()
        after = package_float32(written, module, fmt, ct_scheme).double()
        target = before + delta
        bound = _code_bound(written, module, ct_scheme, target)
        excess = (after - target).abs() - bound
        assert bool((excess <= 1e-6 * target.abs().max()).all()), (name, float(excess.max()))
        rho = retention(before, after, delta)
        assert abs(rows[name]["retention"] - rho) < 1e-6, (name, rows[name]["retention"], rho)
        assert 0.9 < rho < 1.1
        assert rows[name]["written"] == "compressed-tensors"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        ).state_dict()
    ours = open_checkpoint(out)
    for name in ours.tensors:  # transformers' load, in the model's dtype (bf16)
        if name in loaded:
            assert torch.equal(loaded[name], ours.read(name).to(loaded[name].dtype)), name


@pytest.mark.parametrize("scheme", ["fp8-tensor-static", "w4a16-group-asym", "nvfp4"])
def test_compressed_min_retention_lists_ignore_and_transformers_loads_it(ct, tmp_path, scheme):
    from compressed_tensors.quantization import QuantizationConfig

    Q, out = ct_base(ct, scheme), tmp_path / "out"
    adapter = ct["root"] / f"mixed-{scheme}"
    if not adapter.exists():
        adapter = make_adapter(ct["plain"], adapter, target_modules=CT_TARGETS, seed=3)
        shrink(adapter, re.compile(r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)"), 1e-6)
    # a tiny update's ρ is dominated by the rounding of scales recomputed from the group's range
    # (INT4 asymmetric: anywhere, not near 0): the threshold is put between the two lowest and the rest
    measured = merge_json(Q, adapter, "-o", tmp_path / "measured", "--requantize")["retention"]
    ordered = sorted(row["retention"] for row in measured)
    threshold = (ordered[1] + ordered[2]) / 2
    summary = merge_json(Q, adapter, "-o", out, "--requantize", "--min-retention", repr(threshold))
    rows = {row["module"]: row for row in summary["retention"]}
    low = [m for m, row in rows.items() if row["retention"] < threshold]
    assert [r["retention"] for r in measured] == [r["retention"] for r in rows.values()], (measured, rows)
    assert len(low) == 2
    written = load_file(out / "model.safetensors")
    for module, row in rows.items():
        assert (row["written"] == "bfloat16") == (module in low)
        stored = [n for n in written if n.startswith(f"{module}.")]
        if module in low:  # one plain weight, no codes or qparams (static activation scales dropped)
            assert stored == [f"{module}.weight"] and written[stored[0]].dtype == torch.bfloat16
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    before = json.loads((Q / "config.json").read_text())["quantization_config"]
    assert settings["ignore"] == before["ignore"] + sorted(low, key=list(rows).index)
    assert {k: v for k, v in settings.items() if k != "ignore"} == {
        k: v for k, v in before.items() if k != "ignore"
    }
    QuantizationConfig.model_validate(settings)  # the package reads it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        )
    loaded, ours = model.state_dict(), open_checkpoint(out)
    for name in ours.tensors:
        if name in loaded:
            assert torch.equal(loaded[name], ours.read(name).to(loaded[name].dtype)), name


# ============================================================================== bitsandbytes

BNB_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
BNB_LOW = re.compile(r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)")


@pytest.fixture(scope="module")
def bq(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from factories import quantize_bnb
    from test_quantized_bnb import TARGETS as BNB_TARGETS

    root = tmp_path_factory.mktemp("requantize-bnb")
    plain = make_llama(root / "plain", hidden_size=40, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=BNB_TARGETS)
    mixed = shrink(make_adapter(plain, root / "mixed", target_modules=BNB_TARGETS, seed=3), BNB_LOW, 1e-6)
    return {
        "adapter": adapter,
        "delta": peft_delta_weights(plain, adapter)[0],
        "mixed": mixed,
        "Q": quantize_bnb(plain, root / "nf4", **BNB_NF4),
        "int8": quantize_bnb(plain, root / "int8", load_in_8bit=True),
    }


def _bnb_load(folder: Path):
    from factories import load_base

    return load_base(folder, dtype=torch.bfloat16)


def _bnb_weights_equal_ours(model, folder: Path) -> None:
    """Every weight of transformers' bnb load, dequantized by transformers, equals our reading
    rounded to the quant_state's dtype (bfloat16, what bitsandbytes decodes into)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    ours = open_checkpoint(folder)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or f"{name}.weight" not in ours.tensors:
            continue
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            theirs = dequantize_bnb_weight(weight, state=getattr(weight, "quant_state", None) or module.state)
        else:
            theirs = weight.data
        assert torch.equal(theirs, ours.read(f"{name}.weight").to(theirs.dtype)), name


def test_bnb_nf4_requantized_merge_against_peft_on_the_4bit_model(bq, tmp_path):
    """PEFT's merge_and_unload on the 4-bit model dequantizes each Linear4bit in bfloat16 (the
    quant_state's dtype), adds its float32 ΔW and quantizes again; ours adds ΔW to the float32
    decode. The codes and absmax agree where those two inputs round alike: measured, and the rest
    explained by feeding ours PEFT's input (tests/test_quantized_bnb.py: then byte for byte)."""
    import peft

    Q, out = bq["Q"], tmp_path / "out"
    summary = merge_json(Q, bq["adapter"], "-o", out, "--requantize")
    base, written = load_file(Q / "model.safetensors"), load_file(out / "model.safetensors")
    assert list(written) == list(base)
    rows = {row["module"]: row for row in summary["retention"]}
    touched = set(rows)
    assert len(touched) == 8 and summary["tensors_requantized"] == 8
    for name in base:
        if not any(name.startswith(f"{m}.weight") for m in touched):
            assert same_bytes(written[name], base[name]), name
        assert written[name].dtype == base[name].dtype and written[name].shape == base[name].shape, name

    model = peft.PeftModel.from_pretrained(_bnb_load(Q), str(bq["adapter"])).merge_and_unload()
    modules = dict(model.named_modules())
    from factories import relative_error
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    ours, base_read = open_checkpoint(out), open_checkpoint(Q)
    codes_same = absmax_same = codes = absmax = 0
    worst = 0.0
    for module in touched:
        weight = modules[module].weight
        codes_same += int((written[f"{module}.weight"] == weight.data).sum())
        codes += weight.data.numel()
        absmax_same += int((written[f"{module}.weight.absmax"] == weight.quant_state.absmax).sum())
        absmax += weight.quant_state.absmax.numel()
        theirs = dequantize_bnb_weight(weight, state=weight.quant_state).float()
        target = base_read.read(f"{module}.weight").double() + bq["delta"][module].double()
        mine, peft_error = (
            relative_error(ours.read(f"{module}.weight"), target),
            relative_error(theirs, target),
        )
        worst = max(worst, mine / peft_error)
        # retention from the written files, decoded by bitsandbytes itself (float32), in float64
        from test_quantized_bnb import oracle as bnb_oracle

        rho = retention(
            bnb_oracle(base, f"{module}.weight").double(),
            bnb_oracle(written, f"{module}.weight").double(),
            bq["delta"][module].double(),
        )
        assert abs(rows[module]["retention"] - rho) < 1e-6, (module, rows[module]["retention"], rho)
    share_codes, share_absmax = codes_same / codes, absmax_same / absmax
    print(
        f"NF4 vs PEFT 4-bit merge: codes equal {share_codes:.4f}, absmax codes equal {share_absmax:.4f}, ours/PEFT error to deq(W)+ΔW ≤ {worst:.3f}"
    )
    # the absmax codes quantize absmax − mean(absmax) in 8 bits: a mean moved by PEFT's bf16 decode
    # moves many of them by one code, and with them their 64 weights; ours, from the float32 decode,
    # is as close to deq(W) + ΔW as PEFT's (its error within 5 % of PEFT's, module by module)
    assert share_codes > 0.98 and share_absmax > 0.6 and worst < 1.05, (share_codes, share_absmax, worst)
    print("NF4 retention", sorted(round(r["retention"], 3) for r in summary["retention"]))
    for row in summary["retention"]:
        assert 0.9 < row["retention"] < 1.1 and row["written"] == "bitsandbytes NF4", row

    # transformers' own bnb load of the output reads what we read
    _bnb_weights_equal_ours(_bnb_load(out), out)


def test_bnb_min_retention_lists_every_plain_module_in_the_skip_list(bq, tmp_path):
    """Once llm_int8_skip_modules is set it replaces transformers' default skips (lm_head, tied
    weights): the list written names the modules stored plain, then the low ones; transformers
    then builds Linear4bit exactly for the rest, and loads every weight as we read it."""
    Q, out = bq["Q"], tmp_path / "out"
    measured = merge_json(Q, bq["mixed"], "-o", tmp_path / "measured", "--requantize")["retention"]
    ordered = sorted(row["retention"] for row in measured)
    threshold = (ordered[1] + ordered[2]) / 2
    summary = merge_json(Q, bq["mixed"], "-o", out, "--requantize", "--min-retention", repr(threshold))
    low = [row["module"] for row in summary["retention"] if row["retention"] < threshold]
    assert len(low) == 2
    written = load_file(out / "model.safetensors")
    for module in low:
        assert [n for n in written if n.startswith(f"{module}.")] == [f"{module}.weight"]
        assert written[f"{module}.weight"].dtype == torch.bfloat16
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        json.loads((Q / "config.json").read_text())["quantization_config"].get("llm_int8_skip_modules")
        is None
    )
    listed = settings["llm_int8_skip_modules"]
    assert sorted(listed[:2]) == ["lm_head", "model.embed_tokens"] and listed[2:] == low

    model = _bnb_load(out)
    kinds = {
        n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Linear4bit")
    }
    assert {n for n, k in kinds.items() if k == "Linear"} == {"lm_head", *low}
    _bnb_weights_equal_ours(model, out)


def test_bnb_int8_requantized_merge_equals_peft_on_the_8bit_model_and_loads(bq, tmp_path):
    """PEFT's merge_and_unload on the 8-bit model (Linear8bitLt: dequantize, add ΔW, Int8Params
    again) writes the same int8 codes and SCB byte for byte: Int8Params rounds the merged weight to
    float16 first, which absorbs PEFT's bfloat16 decode."""
    import peft

    out = tmp_path / "out"
    summary = merge_json(bq["int8"], bq["adapter"], "-o", out, "--requantize")
    assert summary["tensors_requantized"] == 8
    for row in summary["retention"]:
        assert 0.9 < row["retention"] < 1.1 and row["written"] == "bitsandbytes int8", row
    written = load_file(out / "model.safetensors")
    model = peft.PeftModel.from_pretrained(_bnb_load(bq["int8"]), str(bq["adapter"])).merge_and_unload()
    modules = dict(model.named_modules())
    for row in summary["retention"]:
        module = row["module"]
        weight = modules[module].weight
        assert same_bytes(written[f"{module}.weight"], weight.data), module
        assert torch.equal(written[f"{module}.SCB"], weight.SCB), module
    _bnb_weights_equal_ours(_bnb_load(out), out)
