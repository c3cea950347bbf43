"""`merge --requantize` keeps a quantized base's format, reports each module's retention, and
`--min-retention` writes the low ones unquantized; `inspect --base` shows the would-be retention
(docs/design.md §13).

The bases are tiny real Llamas stored as transformers' fine-grained FP8 (tests/test_quantized_fp8.py's
store_fp8: per-block amax/448, e4m3 codes, `weight_scale_inv`): hidden 72 (every edge block partial)
in the variants block, bf16 scales, ue8m0 and per-tensor; hidden 64 (whole 32×32 blocks, which
transformers' own FP8 loader needs) for the load. The adapters are real PEFT LoRAs with every factor
randomised (factories.make_adapter).

The references: factories.quantize_fp8 and transformers' Fp8Quantize for the quantizer; PEFT's own
ΔW (get_delta_weight) and transformers' `_dequantize_fp8_weight` for the retention, recomputed in
float64 from the written files; transformers' FP8 quantizer for which modules the ignore list keeps
plain, and its dequantizing load for the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from clihelp import assert_refused, run_cli
from factories import make_adapter, make_llama, peft_delta_weights, quantize_fp8
from safetensors.torch import load_file, save_file
from test_quantized_fp8 import LINEAR, TARGETS, fp8_config, oracle, store_fp8

from lorasurgery.io import fp8, open_checkpoint

E4M3_MAX = 448.0
# name: (block, scale dtype, ue8m0, quantization_config)
VARIANTS = {
    "block": ((32, 32), torch.float32, False, fp8_config((32, 32))),
    "bf16-scales": ((32, 32), torch.bfloat16, False, fp8_config((32, 32))),
    "ue8m0": ((32, 32), torch.float8_e8m0fnu, True, fp8_config((32, 32), "ue8m0")),
    "per-tensor": (None, torch.float32, False, fp8_config(None)),
}
LOW = re.compile(r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)")  # modules given a tiny update


def shrink(adapter: Path, pattern: re.Pattern, factor: float) -> Path:
    """The adapter with lora_B of the modules matching `pattern` scaled by `factor`."""
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    for name in tensors:
        if pattern.search(name) and "lora_B" in name:
            tensors[name] = tensors[name] * factor
    save_file(tensors, file, metadata={"format": "pt"})
    return adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("requantize")
    plain = make_llama(root / "plain", hidden_size=72, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    plain64 = make_llama(root / "plain64", hidden_size=64, dtype=torch.bfloat16, seed=1)
    mixed = shrink(make_adapter(plain64, root / "mixed", target_modules=TARGETS, seed=1), LOW, 1e-5)
    return {
        "root": root,
        "plain": plain,
        "adapter": adapter,
        "delta": peft_delta_weights(plain, adapter)[0],
        "fp8": {name: store_fp8(plain, root / name, *variant) for name, variant in VARIANTS.items()},
        "plain64": plain64,
        "Q64": store_fp8(plain64, root / "q64", (32, 32), torch.float32, False, fp8_config((32, 32))),
        "mixed": mixed,
        "mixed_delta": peft_delta_weights(plain64, mixed)[0],
    }


def merge_json(*args) -> dict:
    result = run_cli("merge", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def dequantized(folder: Path, block) -> dict[str, torch.Tensor]:
    """Every quantized weight of `folder` dequantized by transformers' own function, in float64."""
    stored = load_file(folder / "model.safetensors")
    return {
        name: oracle(codes, stored[f"{name}_scale_inv"], block).double()
        for name, codes in stored.items()
        if f"{name}_scale_inv" in stored
    }


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def half_step(value: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e4m3 codes at |value| (in code units): 2^(e−3) in binade e ≥ −6, 2^−9 below."""
    exponent = torch.floor(torch.log2(value.abs().clamp_min(2.0**-6)))
    return torch.exp2(exponent - 3) / 2


# ------------------------------------------------------------------------------ the quantizer


def _info(shape, block, scale_dtype, ue8m0):
    from lorasurgery.io.quantization import DequantizedInfo
    from lorasurgery.io.safetensors_format import TensorInfo, dtype_code_of

    grid = () if block is None else (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = TensorInfo("w.weight_scale_inv", dtype_code_of(scale_dtype), grid, Path("x"), 0, 0)
    codes = TensorInfo("w.weight", "F8_E4M3", shape, Path("x"), 0, 0)
    return DequantizedInfo(
        "w.weight", "F32", shape, Path("x"), -1, -1, format="fp8", codes=codes,
        parts=(("scale_inv", scale),), block=block, scale_fmt="ue8m0" if ue8m0 else None,
    )  # fmt: skip


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "per-tensor"] + ["per-tensor-bf16"])
def test_quantize_equals_the_tests_quantizer_bit_for_bit(variant):
    """Codes and scales as factories.quantize_fp8 (checked against compressed-tensors) computes them,
    bit for bit; a block of zeros gets scale 1 (transformers' choice) where it takes 1e-12/448."""
    block, scale_dtype, ue8m0 = (
        (None, torch.bfloat16, False) if variant == "per-tensor-bf16" else VARIANTS[variant][:3]
    )
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(72, 144, generator=generator) * torch.rand(144, generator=generator) * 3
    W[:32, :32] = 0  # one block of zeros
    if block is None:
        W[:32, :32] = 1.0  # per tensor, a zero tensor is a different question
    out = fp8.quantize(_info((72, 144), block, scale_dtype, ue8m0), W, None)
    codes, scale = quantize_fp8(W, block, scale_dtype, ue8m0)
    assert out["w.weight"].dtype == torch.float8_e4m3fn and out["w.weight_scale_inv"].dtype == scale_dtype
    assert torch.equal(out["w.weight"].view(torch.uint8), codes.view(torch.uint8))
    ours, theirs = out["w.weight_scale_inv"].float(), scale.float()
    if block is not None:
        assert float(ours[0, 0]) == 1.0
        ours, theirs = ours.reshape(-1)[1:], theirs.reshape(-1)[1:]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_agrees_with_transformers_fp8_quantizer(scale_fmt):
    """transformers' Fp8Quantize (whole blocks only): ue8m0 bit for bit; under float it stores
    1/(448/amax), at most one float32 ulp from amax/448, and the codes agree."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.auto import AutoHfQuantizer

    config = transformers.FineGrainedFP8Config(weight_block_size=(32, 32), scale_fmt=scale_fmt).to_dict()
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    generator = torch.Generator().manual_seed(4)
    W = torch.randn(128, 256, generator=generator) * torch.rand(256, generator=generator) * 2
    theirs = Fp8Quantize(quantizer)._quantize_one("w.weight", W)
    ue8m0 = scale_fmt == "ue8m0"
    scale_dtype = torch.float8_e8m0fnu if ue8m0 else torch.float32
    ours = fp8.quantize(_info((128, 256), (32, 32), scale_dtype, ue8m0), W, None)
    assert ours["w.weight_scale_inv"].dtype == theirs["w.weight_scale_inv"].dtype
    a, b = ours["w.weight_scale_inv"].float(), theirs["w.weight_scale_inv"].float()
    if ue8m0:
        assert torch.equal(a, b)
    else:
        assert bool(((a - b).abs() <= torch.finfo(torch.float32).eps * b).all())
    assert torch.equal(ours["w.weight"].view(torch.uint8), theirs["w.weight"].view(torch.uint8))


# ------------------------------------------------------------------------------ merge --requantize


@pytest.mark.parametrize("variant", VARIANTS)
def test_requantized_merge(models, tmp_path, variant):
    block = VARIANTS[variant][0]
    Q, out = models["fp8"][variant], tmp_path / "out"
    summary = merge_json(Q, models["adapter"], "-o", out, "--requantize")
    base, written = load_file(Q / "model.safetensors"), load_file(out / "model.safetensors")

    # the base's format: the same stored tensors, dtypes and shapes; quantization_config kept
    assert list(written) == list(base)
    for name in base:
        assert (written[name].dtype, written[name].shape) == (base[name].dtype, base[name].shape), name
    assert json.loads((out / "config.json").read_text()) == json.loads((Q / "config.json").read_text())

    deltas = {f"{m}.weight": d.double() for m, d in models["delta"].items()}
    touched = {n for n in deltas} | {f"{n}_scale_inv" for n in deltas}
    assert summary["tensors_requantized"] == len(deltas) == 8
    for name in base:  # untouched tensors (codes, scales, plain): byte for byte
        if name not in touched:
            assert same_bytes(written[name], base[name]), name

    before, after = dequantized(Q, block), dequantized(out, block)
    rows = {row["tensor"]: row for row in summary["retention"]}
    assert set(rows) == set(deltas)
    for name, delta in deltas.items():
        # within half a code step of deq(W) + ΔW, element by element, at the written scale
        target = before[name] + delta
        scale = written[f"{name}_scale_inv"].double()
        if block is not None:
            scale = scale.repeat_interleave(block[0], 0)[: target.shape[0]]
            scale = scale.repeat_interleave(block[1], 1)[:, : target.shape[1]]
        bound = half_step(target / scale) * scale
        assert bool(((after[name] - target).abs() <= bound * (1 + 1e-5) + 1e-9).all()), name
        # retention: float64 from the written files and PEFT's ΔW
        rho = float(((after[name] - before[name]) * delta).sum() / (delta * delta).sum())
        assert abs(rows[name]["retention"] - rho) < 1e-6, (name, rows[name]["retention"], rho)
        assert 0.9 < rho < 1.1  # an update of half the weights' size survives
        changed = (written[name].view(torch.uint8) != base[name].view(torch.uint8)).double().mean()
        assert rows[name]["codes_changed"] == pytest.approx(float(changed), abs=1e-12)
        assert rows[name]["written"] == "FP8"


def test_a_tiny_update_is_lost_and_said(models, tmp_path):
    Q, out = models["fp8"]["block"], tmp_path / "out"
    summary = merge_json(Q, models["adapter"], "-o", out, "--requantize", "--weight", "1e-6")
    assert len(summary["retention"]) == 8
    for row in summary["retention"]:
        assert abs(row["retention"]) < 0.05, row  # below a code step: (almost) nothing of it survives
        assert row["codes_changed"] < 0.01, row
    table = run_cli(
        "merge", Q, models["adapter"], "-o", tmp_path / "table", "--requantize", "--weight", "1e-6"
    )
    assert table.exit_code == 0, table.stderr
    assert "retention ρ" in table.stdout and "model.layers.0.self_attn.q_proj" in table.stdout


def test_min_retention_writes_the_low_modules_unquantized_and_transformers_loads_it(models, tmp_path):
    Q, out = models["Q64"], tmp_path / "out"
    summary = merge_json(Q, models["mixed"], "-o", out, "--requantize", "--min-retention", "0.9")
    rows = {row["module"]: row for row in summary["retention"]}
    low = sorted(m for m in rows if LOW.search(m))
    assert len(rows) == 8 and len(low) == 2
    for module, row in rows.items():
        assert (row["written"] == "bfloat16") == (module in low), row
        assert (row["retention"] < 0.9) == (module in low), row

    written = load_file(out / "model.safetensors")
    for module in low:  # one plain weight in the model's dtype, no scales
        assert written[f"{module}.weight"].dtype == torch.bfloat16
        assert f"{module}.weight_scale_inv" not in written
    config = json.loads((out / "config.json").read_text())
    # the base declared no list, so transformers skipped its defaults (lm_head); a list replaces
    # them, so the one written names every 2-D weight stored plain first, then the low modules
    assert (
        json.loads((Q / "config.json").read_text())["quantization_config"].get("modules_to_not_convert")
        is None
    )
    plain = [
        n.removesuffix(".weight") for n, t in written.items() if t.dim() == 2 and t.dtype == torch.bfloat16
    ]
    plain = [m for m in plain if m not in low]
    assert "lm_head" in plain
    assert config["quantization_config"]["modules_to_not_convert"] == plain + low
    assert summary["config_changes"]["quantization_config"]["modules_to_not_convert"] == plain + low

    # transformers' FP8 quantizer builds plain Linear layers exactly for the low modules and lm_head,
    # as it did for the base (lm_head by its default skip list)
    from transformers.quantizers.auto import AutoHfQuantizer

    def plain_linears(folder):
        settings = json.loads((folder / "config.json").read_text())["quantization_config"]
        quantizer = AutoHfQuantizer.from_config(settings, pre_quantized=True)
        with torch.device("meta"):
            skeleton = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder))
        quantizer._process_model_before_weight_loading(skeleton)
        return {n for n, m in skeleton.named_modules() if type(m) is torch.nn.Linear}

    assert plain_linears(Q) == {"lm_head"}
    assert plain_linears(out) == {"lm_head", *low}

    # its dequantizing load reads what we read
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out,
        output_loading_info=True,
        dtype=torch.float32,
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=(32, 32)),
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = open_checkpoint(out)
    state = model.state_dict()
    for name in ours.tensors:
        if LINEAR.search(name) or name in state:
            assert torch.equal(state[name], ours.read(name).float()), name


def test_inspect_shows_the_would_be_retention(models, tmp_path):
    Q = models["Q64"]
    report = run_cli("inspect", models["mixed"], "--base", Q, "--json", "--all")
    assert report.exit_code == 0, report.stderr
    would = {m["name"]: m for m in json.loads(report.stdout)["modules"]}
    merged = merge_json(Q, models["mixed"], "-o", tmp_path / "out", "--requantize")
    for row in merged["retention"]:
        assert would[row["module"]]["retention"] == pytest.approx(row["retention"], abs=1e-12)
        assert would[row["module"]]["codes_changed"] == pytest.approx(row["codes_changed"], abs=1e-12)
    table = run_cli("inspect", models["mixed"], "--base", Q)
    assert table.exit_code == 0 and "retention ρ" in table.stdout
    plain = run_cli("inspect", models["mixed"], "--base", models["plain64"], "--json")
    assert "retention" not in json.loads(plain.stdout)["modules"][0]  # a plain base: nothing to retain


# ------------------------------------------------------------------------------ bad combinations


def usage_refused(args: list, expected: str, inputs: list, output: Path) -> None:
    """An option combination refused as a usage error (exit 2, as every OptionError): nothing written."""
    from clihelp import tree_digest

    before = tree_digest(*inputs)
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stderr.startswith("Error: ") and expected in result.stderr, result.stderr
    assert not output.exists() and not list(output.parent.glob(f".{output.name}*"))
    assert tree_digest(*inputs) == before


def test_min_retention_without_requantize_is_refused(models, tmp_path):
    Q, out = models["fp8"]["block"], tmp_path / "out"
    usage_refused(
        ["merge", Q, models["adapter"], "-o", out, "--min-retention", "0.9"],
        "--min-retention R chooses which requantized modules are written unquantized; it needs --requantize",
        [Q, models["adapter"]],
        out,
    )


def test_requantize_with_verify_is_refused(models, tmp_path):
    Q, out = models["fp8"]["block"], tmp_path / "out"
    usage_refused(
        ["merge", Q, models["adapter"], "-o", out, "--requantize", "--verify"],
        "a requantized merge differs from it by its rounding by design",
        [Q, models["adapter"]],
        out,
    )


def test_requantize_on_a_plain_base_is_refused(models, tmp_path):
    out = tmp_path / "out"
    assert_refused(
        ["merge", models["plain"], models["adapter"], "-o", out, "--requantize"],
        "plain: --requantize writes the merge in the base's quantized format, but the base is not quantized",
        inputs=[models["plain"], models["adapter"]],
        output=out,
    )


def test_static_activation_scales_are_copied_or_dropped_with_their_weight(models, tmp_path):
    """A static activation scale decodes nothing of W: copied byte for byte beside its requantized
    weight, dropped with the scales when the weight is written unquantized."""
    import shutil

    Q = tmp_path / "static"
    shutil.copytree(models["fp8"]["block"], Q)
    stored = load_file(Q / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.activation_scale"
    stored[name] = torch.tensor(0.0123, dtype=torch.float32)
    save_file(stored, Q / "model.safetensors", metadata={"format": "pt"})

    summary = merge_json(Q, models["adapter"], "-o", tmp_path / "kept", "--requantize")
    assert summary["tensors_requantized"] == 8
    assert same_bytes(load_file(tmp_path / "kept" / "model.safetensors")[name], stored[name])

    out = tmp_path / "plain"
    summary = merge_json(Q, models["adapter"], "-o", out, "--requantize", "--min-retention", "2")
    written = load_file(out / "model.safetensors")
    assert name not in written and "model.layers.0.self_attn.q_proj.weight_scale_inv" not in written
    listed = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert sorted(listed[-8:]) == sorted(row["module"] for row in summary["retention"])
    assert sorted(listed[:-8]) == ["lm_head", "model.embed_tokens"]  # stored plain: the default skips, named
    assert summary["tensors_requantized"] == 0 and summary["tensors_merged"] == 8


def test_a_reader_without_a_quantizer_is_refused_by_name(monkeypatch):
    """The interface is per format: a reader that only decodes makes --requantize an UnsupportedError
    naming its format (the formats being added read first, write later)."""
    import types
    from dataclasses import replace

    from lorasurgery.errors import UnsupportedError
    from lorasurgery.io import readers

    decoder_only = types.SimpleNamespace(logical_index=None, dequantize=None)
    monkeypatch.setitem(readers.READERS, "compressed-tensors", decoder_only)
    assert readers.can_quantize("fp8") and not readers.can_quantize("compressed-tensors")
    info = replace(_info((8, 8), None, torch.float32, False), format="compressed-tensors")
    with pytest.raises(
        UnsupportedError, match="compressed-tensors checkpoints but cannot write them requantized"
    ):
        readers.quantize(info, torch.zeros(8, 8), None)
