"""`extract` from quantized pairs: a fine-tune stored quantized against its base stored quantized
(docs/design.md §13, "Extracting from quantized pairs", docs/extract.md).

A tiny real Llama (bf16, hidden 64) and its fine-tune — a real PEFT LoRA of rank 4, every factor
randomised, merged by PEFT and saved by transformers — are both quantized: to transformers'
fine-grained FP8 (32×32 blocks, as tests/test_quantized_fp8.py stores it), by bitsandbytes to
NF4 with double quantisation (loaded with a real BitsAndBytesConfig and saved) and by
compressed-tensors to W4A16 (int4 groups of 16, packed in int32 words).

The references: extract on the copies dequantized by transformers' and bitsandbytes' own
functions (the adapter's B·A to 1e-5), the stored codes and scales counted directly from the
safetensors files (packed codes unpacked by hand or by the package), the rounding error the
quantizers really made (for the noise model), the planted rank of the PEFT adapter and the true
change (the unquantized fine-tune minus its base).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from clihelp import run_cli
from factories import (
    make_adapter,
    make_llama,
    merged_checkpoint,
    quantize_bnb,
    quantize_compressed,
    relative_error,
)
from quantized_checks import cli_json
from safetensors.torch import load_file
from test_quantized_bnb import dequantized_copy as bnb_dequantized_copy
from test_quantized_fp8 import dequantized_copy, fp8_config, store_fp8

from lorasurgery.io import open_checkpoint, readers

BLOCK = (32, 32)
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # k, o and up stay unchanged
BLOCK_LINEAR = re.compile(r"layers\.\d+\..*_proj\.weight$")
PLANTED = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qextract")
    plain = make_llama(root / "plain", hidden_size=64, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS, r=PLANTED)
    ft = merged_checkpoint(plain, adapter, root / "ft")
    Qb = store_fp8(plain, root / "fp8-base", BLOCK, qconfig=fp8_config(BLOCK))
    Qf = store_fp8(ft, root / "fp8-ft", BLOCK, qconfig=fp8_config(BLOCK))
    return {
        "root": root,
        "plain": plain,
        "ft": ft,
        "Qb": Qb,
        "Qf": Qf,
        "Db": dequantized_copy(Qb, root / "fp8-base-dq", BLOCK),
        "Df": dequantized_copy(Qf, root / "fp8-ft-dq", BLOCK),
    }


W4A16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": False}


@pytest.fixture(scope="module")
def w4a16(models):
    """The pair quantized by compressed-tensors to W4A16 (int4 per group of 16, asymmetric, packed in
    int32 words) as llm-compressor saves it."""
    root = models["root"]
    return {
        "Qb": quantize_compressed(models["plain"], root / "w4-base", W4A16),
        "Qf": quantize_compressed(models["ft"], root / "w4-ft", W4A16),
    }


@pytest.fixture(scope="module")
def nf4(models):
    root = models["root"]
    config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    Qb = quantize_bnb(models["plain"], root / "nf4-base", **config)
    Qf = quantize_bnb(models["ft"], root / "nf4-ft", **config)
    return {
        "Qb": Qb,
        "Qf": Qf,
        "Db": bnb_dequantized_copy(Qb, root / "nf4-base-dq"),
        "Df": bnb_dequantized_copy(Qf, root / "nf4-ft-dq"),
    }


def _products(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's B·A (signs of singular vectors cancel), float64."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {
        key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")].double()
        @ tensors[key].double()
        for key in tensors
        if key.endswith("lora_A.weight")
    }


def _assert_same_adapter(ours: Path, theirs: Path) -> None:
    a, b = _products(ours), _products(theirs)
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert relative_error(a[key], b[key]) < 1e-5, key


def _direct_fp8_counts(Qb: Path, Qf: Path) -> dict[str, tuple[int, int, bool]]:
    """{module: (identical codes, codes, scales identical)} straight from the stored FP8 tensors."""
    base, ft = load_file(Qb / "model.safetensors"), load_file(Qf / "model.safetensors")
    counts = {}
    for name in base:
        if BLOCK_LINEAR.search(name):
            same = base[name].view(torch.uint8) == ft[name].view(torch.uint8)
            scales = torch.equal(base[f"{name}_scale_inv"], ft[f"{name}_scale_inv"])
            counts[name.removesuffix(".weight")] = (int(same.sum()), same.numel(), scales)
    return counts


def _direct_nf4_counts(Qb: Path, Qf: Path) -> dict[str, tuple[int, int, bool]]:
    """The same for bitsandbytes NF4: two codes a byte, the high nibble first; the scales are
    absmax and the nested (double-quantisation) parts."""
    base, ft = load_file(Qb / "model.safetensors"), load_file(Qf / "model.safetensors")
    counts = {}
    for name in base:
        if BLOCK_LINEAR.search(name):
            a, b = base[name].reshape(-1), ft[name].reshape(-1)
            nibbles = torch.stack(((a >> 4) == (b >> 4), (a & 15) == (b & 15)), 1).reshape(-1)
            n = math.prod(json.loads(bytes(base[f"{name}.quant_state.bitsandbytes__nf4"].tolist()))["shape"])
            parts = [f"{name}.{p}" for p in ("absmax", "nested_absmax", "nested_quant_map", "quant_map")]
            scales = all(torch.equal(base[p], ft[p]) for p in parts)
            counts[name.removesuffix(".weight")] = (int(nibbles[:n].sum()), n, scales)
    return counts


def _direct_w4a16_counts(Qb: Path, Qf: Path) -> dict[str, tuple[int, int, bool]]:
    """The same for compressed-tensors' pack-quantized codes, unpacked by the package itself; the
    scales are weight_scale and weight_zero_point."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    base, ft = load_file(Qb / "model.safetensors"), load_file(Qf / "model.safetensors")
    counts = {}
    for name in base:
        if name.endswith(".weight_packed") and BLOCK_LINEAR.search(name.replace("_packed", "")):
            module = name.removesuffix(".weight_packed")
            shape = torch.Size(base[f"{module}.weight_shape"].tolist())
            same = unpack_from_int32(base[name], 4, shape) == unpack_from_int32(ft[name], 4, shape)
            parts = [f"{module}.weight_scale", f"{module}.weight_zero_point"]
            counts[module] = (int(same.sum()), same.numel(), all(torch.equal(base[p], ft[p]) for p in parts))
    return counts


def _check_shares(report: dict, counts: dict) -> None:
    """Every listed module's share and scale flag, and the total over all compared modules."""
    assert report["modules"]
    for m in report["modules"]:
        same, n, scales = counts[m["name"]]
        assert m["identical_codes"] == pytest.approx(same / n, abs=1e-12), m["name"]
        assert m["scales_changed"] is (not scales), m["name"]
    total = sum(c[0] for c in counts.values()) / sum(c[1] for c in counts.values())
    assert report["totals"]["identical_codes"] == pytest.approx(total, abs=1e-12)
    bit_for_bit = sum(c[0] == c[1] and c[2] for c in counts.values())
    assert report["totals"]["bit_for_bit_modules"] == bit_for_bit > 0  # k, o and up are untouched


# ----------------------------------------------------------------------- ΔW from the dequantized


def test_fp8_pair_extracts_the_adapter_of_its_dequantized_copies(models, tmp_path):
    ours = cli_json("extract", models["Qb"], models["Qf"], "-o", tmp_path / "ours", "--rank", "4", "--json")
    theirs = cli_json(
        "extract", models["Db"], models["Df"], "-o", tmp_path / "theirs", "--rank", "4", "--json"
    )
    _assert_same_adapter(tmp_path / "ours", tmp_path / "theirs")
    assert [m["rank"] for m in ours["modules"]] == [m["rank"] for m in theirs["modules"]]
    assert ours["totals"]["relative_error"] == pytest.approx(theirs["totals"]["relative_error"], rel=1e-5)


def test_nf4_pair_extracts_the_adapter_of_its_dequantized_copies(nf4, tmp_path):
    run = ("--rank", "4", "--json")
    cli_json("extract", nf4["Qb"], nf4["Qf"], "-o", tmp_path / "ours", *run)
    cli_json("extract", nf4["Db"], nf4["Df"], "-o", tmp_path / "theirs", *run)
    _assert_same_adapter(tmp_path / "ours", tmp_path / "theirs")


# ------------------------------------------------------------------------------ identical codes


def test_fp8_identical_code_share_equals_a_direct_count(models, tmp_path):
    counts = _direct_fp8_counts(models["Qb"], models["Qf"])
    report_file = tmp_path / "report.json"
    out = tmp_path / "out"
    report = cli_json("extract", models["Qb"], models["Qf"], "-o", out, "--rank", "4", "--json")
    _check_shares(report, counts)
    assert any(0 < c[0] < c[1] for c in counts.values())  # a share strictly between 0 and 1 is checked
    # the --report file says the same, and the table shows the columns
    result = run_cli(
        "extract", models["Qb"], models["Qf"], "-o", out, "--rank", "4", "--force", "--report", report_file
    )
    assert result.exit_code == 0, result.stderr
    _check_shares(json.loads(report_file.read_text()), counts)
    header = result.stdout.split("━")[0]  # a narrow console wraps the header: "same" over "codes"
    assert "same" in header and "codes" in header and "identical" in result.stderr + result.stdout
    # --budget reads each pair twice (spectra, then factors): the share is the first pass's
    budget = cli_json(
        "extract", models["Qb"], models["Qf"], "-o", out, "--budget", "3000", "--force", "--json"
    )
    _check_shares(budget, counts)


def test_nf4_identical_code_share_counts_packed_codes(nf4, tmp_path):
    counts = _direct_nf4_counts(nf4["Qb"], nf4["Qf"])
    report = cli_json("extract", nf4["Qb"], nf4["Qf"], "-o", tmp_path / "out", "--rank", "4", "--json")
    _check_shares(report, counts)


def test_w4a16_identical_code_share_counts_int32_packed_codes(w4a16, tmp_path):
    counts = _direct_w4a16_counts(w4a16["Qb"], w4a16["Qf"])
    report = cli_json("extract", w4a16["Qb"], w4a16["Qf"], "-o", tmp_path / "out", "--rank", "4", "--json")
    _check_shares(report, counts)


def test_one_side_plain_has_a_note_and_no_share(models, tmp_path):
    for base, ft, side in (
        (models["Qb"], models["ft"], "base"),
        (models["plain"], models["Qf"], "fine-tune"),
    ):
        out = tmp_path / side
        result = run_cli("extract", base, ft, "-o", out, "--rank", "4")
        assert result.exit_code == 0, result.stderr
        assert f"only the {side} is stored quantized (FP8)" in " ".join(
            (result.stdout + result.stderr).split()
        )
        report = cli_json("extract", base, ft, "-o", out, "--rank", "4", "--json", "--force")
        assert "identical_codes" not in report["totals"]
        assert all("identical_codes" not in m for m in report["modules"])


def test_fp8_against_nf4_compares_no_codes(models, nf4, tmp_path):
    result = run_cli("extract", models["Qb"], nf4["Qf"], "-o", tmp_path / "out", "--rank", "4")
    assert result.exit_code == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "stored in different formats or layouts" in text and "same codes" not in result.stdout


# ------------------------------------------------------------------------------ the noise floor


@pytest.mark.parametrize("fmt", ["fp8", "nf4", "w4a16"])
def test_noise_variance_matches_the_rounding_the_quantizer_made(models, nf4, w4a16, fmt):
    """step²/12 against mean((dequantized − W)²) of the weights the quantizer was given."""
    Q = {"fp8": models["Qb"], "nf4": nf4["Qb"], "w4a16": w4a16["Qb"]}[fmt]
    plain = load_file(models["plain"] / "model.safetensors")
    checkpoint = open_checkpoint(Q)
    raw = checkpoint.raw
    ratios = []
    for name, info in checkpoint.tensors.items():
        if info.dequantized:
            model = readers.noise_variance(info, lambda stored: raw.read(stored.name))
            actual = float((checkpoint.read(name).double() - plain[name].double()).square().mean())
            ratios.append(model / actual)
    assert ratios
    # FP8: the spacing above each value (finer below a power of two: an overestimate); NF4's cells
    # hold weights unevenly. Either way the model is the rounding's size, not a multiple of it.
    assert 0.8 < min(ratios) and max(ratios) < 1.35, ratios


WEAK = ("v_proj", "gate_proj")  # changed by less than the FP8 step in the mixed fine-tune


def _truth_error(adapter: Path, base: Path, ft: Path, modules) -> float:
    """‖B·A − ΔW_true‖_F / ‖ΔW_true‖_F over `modules`, ΔW_true from the unquantized checkpoints (a
    module missing from the adapter counts as B·A = 0)."""
    products = {k.removeprefix("base_model.model."): v for k, v in _products(adapter).items()}
    W0, W1 = load_file(base / "model.safetensors"), load_file(ft / "model.safetensors")
    num = den = 0.0
    for module in modules:
        true = W1[f"{module}.weight"].double() - W0[f"{module}.weight"].double()
        num += float((products.get(module, torch.zeros_like(true)) - true).square().sum())
        den += float(true.square().sum())
    return math.sqrt(num / den)


def test_auto_noise_floor_drops_what_is_below_the_codes_noise(models, tmp_path):
    """A fine-tune with rank-4 changes, two module kinds changed by less than an FP8 step (PEFT's
    alpha_pattern): plain --auto on the dequantized copies keeps rounding directions there beyond
    the planted rank; with the floor those modules are left out, the others keep the planted rank,
    and the adapter is closer to the true (unquantized) fine-tune."""
    root = models["root"]
    adapter = make_adapter(
        models["plain"],
        root / "lora-mixed",
        target_modules=TARGETS,
        r=PLANTED,
        alpha_pattern=dict.fromkeys(WEAK, 0.03),
    )
    ft = merged_checkpoint(models["plain"], adapter, root / "ft-mixed")
    Qf = store_fp8(ft, root / "fp8-ft-mixed", BLOCK, qconfig=fp8_config(BLOCK))
    Df = dequantized_copy(Qf, root / "fp8-ft-mixed-dq", BLOCK)
    plain = cli_json("extract", models["Db"], Df, "-o", tmp_path / "plain", "--auto", "--json")
    floored = cli_json("extract", models["Qb"], Qf, "-o", tmp_path / "floored", "--auto", "--json")

    def weak(name: str) -> bool:
        return name.endswith(WEAK)

    plain_ranks = {m["name"]: m["rank"] for m in plain["modules"]}
    assert max(r for name, r in plain_ranks.items() if weak(name)) > PLANTED  # the over-count
    assert all(not weak(m["name"]) and m["rank"] == PLANTED for m in floored["modules"])
    left_out = {s["name"] for s in floored["skipped"] if "below the quantisation noise" in s["reason"]}
    assert left_out == {name for name in plain_ranks if weak(name)}
    changed = sorted(plain_ranks)
    ours = _truth_error(tmp_path / "floored", models["plain"], ft, changed)
    theirs = _truth_error(tmp_path / "plain", models["plain"], ft, changed)
    assert ours < theirs
    weak_modules = [name for name in changed if weak(name)]
    assert _truth_error(tmp_path / "plain", models["plain"], ft, weak_modules) > 1  # worse than nothing


def test_auto_noise_floor_refuses_a_fine_tune_entirely_below_it(models, tmp_path):
    root = models["root"]
    adapter = make_adapter(
        models["plain"], root / "lora-small", target_modules=TARGETS, r=PLANTED, lora_alpha=0.03
    )
    ft = merged_checkpoint(models["plain"], adapter, root / "ft-small")
    Qf = store_fp8(ft, root / "fp8-ft-small", BLOCK, qconfig=fp8_config(BLOCK))
    out = tmp_path / "out"
    result = run_cli("extract", models["Qb"], Qf, "-o", out, "--auto")
    assert result.exit_code == 1 and not out.exists()
    assert "below the quantisation noise of the codes in 8 modules" in " ".join(result.stderr.split())
    assert run_cli("extract", models["Qb"], Qf, "-o", out, "--rank", "4").exit_code == 0  # as it says


def test_auto_noise_floor_keeps_a_clear_fine_tune_at_its_planted_rank(models, tmp_path):
    result = run_cli("extract", models["Qb"], models["Qf"], "-o", tmp_path / "out", "--auto")
    assert result.exit_code == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "is the noise floor of 8 modules; it lowered 0 ranks" in text
    report = cli_json(
        "extract", models["Qb"], models["Qf"], "-o", tmp_path / "out", "--auto", "--json", "--force"
    )
    assert {m["rank"] for m in report["modules"]} == {PLANTED}
