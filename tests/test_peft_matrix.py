"""PEFT's LoRA test matrix through `lorasurgery merge`, tensor by tensor against merge_and_unload().

Each case builds a base (built once per session), makes the adapter(s) with PEFT, randomises every
adapter parameter, runs the CLI and compares every tensor of the output with PEFT's merged model:
within 1e-5 relative in float32; on fp16/bf16 bases no further from the float64 merge than PEFT.
Research variants no serving stack loads are refused; so is what PEFT itself cannot merge (grouped
convolutions). Where a base has no config.json and the layout is truly ambiguous, the refusal must
say how to resolve it, and the merge with that option must equal PEFT's; where a square layer's
layout is assumed from the adapter's flag, the merge must say so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from clihelp import run_cli
from peft_matrix import Bases, Case, float64_merge, layers_differing, make_peft, read_output, relative_error

pytest.importorskip("peft")
pytest.importorskip("transformers")

RELATIVE = 1e-5
M = "merge"

# PEFT's LoRA cases of tests/test_custom_models.py (its TEST_CASES and multi-adapter cases), then probes.
CASES = [
    # ---- the MLP: Linear 10→20→2
    Case("mlp-1-str-target", "MLP", {"target_modules": "lin0"}),
    Case("mlp-2", "MLP", {"target_modules": ["lin0"]}),
    Case("mlp-3", "MLP", {"target_modules": ["lin1"]}),
    Case("mlp-4", "MLP", {"target_modules": ["lin0", "lin1"]}),
    Case("mlp-5-modules-to-save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("mlp-6-alpha-dropout", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    Case("mlp-7-dora", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    Case("mlp-8-dora-both", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    Case("mlp-9-dora-alpha", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    Case("mlp-lora-bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    Case("mlp-mica", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    # ---- square Linear layers (PEFT's DeepMLP and MLP_2x_same_shape): no shape tells them from a
    # Conv1D, and a custom model has no config.json; the adapter's fan_in_fan_out: false is assumed
    Case("deepmlp-square-linear", "DeepMLP", {"target_modules": ["lin0", "lin1"]}),
    Case(
        "deepmlp-multirank",  # PEFT's TestMultiRankAdapter.test_multirank_2, both adapters merged
        "DeepMLP",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {f"layers.{i}.lin{j}": 8 // (i + 1) for i in range(3) for j in range(2)},
            "alpha_pattern": {f"layers.{i}.lin{j}": 16 // (i + 1) for i in range(3) for j in range(2)},
        },
        second={
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {f"layers.{i}.lin{j}": 8 // (i + 1) for i in range(3) for j in range(2)},
        },
    ),
    Case("mlp-2x-same-shape", "MLP_2x_same_shape", {"target_modules": ["lin1", "lin2"]}),
    Case(
        "mlp-2x-same-shape-two-adapters",
        "MLP_2x_same_shape",
        {"target_modules": ["lin1"]},
        second={"target_modules": ["lin2"]},
    ),
    # ---- Embedding + transformers Conv1D (weight stored (in, out); non-square, so shapes decide)
    Case("embconv1d-1-conv1d", "EmbConv1D", {"target_modules": ["conv1d"]}),
    Case("embconv1d-2-emb", "EmbConv1D", {"target_modules": ["emb"]}),
    Case("embconv1d-3-both", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    Case("embconv1d-1-dora", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("embconv1d-2-dora", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    Case("embconv1d-3-dora", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    Case(
        "embconv1d-trainable-tokens",
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
    ),
    # ---- convolutions
    Case("conv1d", "Conv1d", {"target_modules": ["conv1d"]}),
    Case("conv1d-dora", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("conv1d-kernel1", "Conv1dKernel1", {"target_modules": ["conv1d"]}),
    Case("conv2d-1", "Conv2d", {"target_modules": ["conv2d"]}),
    Case("conv2d-2", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    Case("conv2d-1-dora", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("conv2d-2-dora", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    Case("conv2d-1x1", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    Case("conv2d-1x1-dora", "Conv2d1x1", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("conv2d-lora-bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    Case("conv3d-1", "Conv3d", {"target_modules": ["conv3d"]}),
    Case("conv3d-2", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    Case("conv3d-1-dora", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    Case("conv3d-2-dora", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    # PEFT's merge fails on a 1×1×1 Conv3d (its 1×1 test squeezes the wrong axes); its forward is the reference.
    Case("conv3d-1x1", "Conv3d1x1", {"target_modules": ["conv3d"]}, forward_input=(2, 5, 3, 3, 3)),
    Case(
        "conv3d-1x1-dora",
        "Conv3d1x1",
        {"target_modules": ["conv3d"], "use_dora": True},
        forward_input=(2, 5, 3, 3, 3),
    ),
    Case("conv3d-lora-bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    # PEFT warns "Merging is not supported" for groups > 1 (its merge differs from its forward).
    *(
        Case(
            f"{name}{'-dora' if dora else ''}",
            name,
            {"target_modules": ["conv2d"], "use_dora": dora},
            expect="refuse",
            refusal="groups > 1",
        )
        for name in ("Conv2dGroups", "Conv2dGroups2")
        for dora in (False, True)
    ),
    # ---- nn.MultiheadAttention: in_proj_weight and out_proj
    Case("mha-1", "MHA", {"target_modules": ["mha"]}),
    Case("mha-2", "MHA", {"target_modules": ["mha", "lin0"]}),
    # ---- target_parameters: LoRA on a bare nn.Parameter
    Case("params-1", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    Case("params-2", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    Case("params-experts", "Moe", {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}),
    Case(
        "params-experts-and-linear",
        "Moe",
        {"target_modules": ["lin0"], "target_parameters": ["experts.down_proj"]},
    ),
    # ---- several adapters (PEFT's multiple-active-adapter cases), the second added with add_adapter
    Case("multi-same", "MLP", {"target_modules": ["lin0"]}, second={"target_modules": ["lin0"]}),
    Case("multi-different", "MLP", {"target_modules": ["lin0"]}, second={"target_modules": ["lin1"]}),
    Case(
        "multi-trainable-tokens-same",
        "EmbConv1D",
        {"target_modules": ["lin0"], "trainable_token_indices": {"emb": [0, 1, 2]}},
        second={"target_modules": ["lin0"], "trainable_token_indices": {"emb": [3, 4, 5, 6]}},
    ),
    Case(
        "multi-trainable-tokens-different",
        "EmbConv1D",
        {"target_modules": ["lin0"], "trainable_token_indices": {"emb": [0, 1, 2]}},
        second={"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [3, 4, 5, 6]}},
    ),
    Case(
        "multi-params-same",
        "MlpUsingParameters",
        {"target_parameters": ["lin0.weight"]},
        second={"target_parameters": ["lin0.weight"]},
    ),
    Case(
        "multi-dora-then-lora",
        "MLP",
        {"target_modules": ["lin0"], "use_dora": True},
        second={"target_modules": ["lin0", "lin1"]},
    ),
    # ---- research variants no serving stack loads: refused
    Case(
        "kasa",
        "MLP",
        {"target_modules": ["lin0"], "kasa_config": {}, "r": 4},
        expect="refuse",
        refusal="KaSA",
    ),
    *(
        Case(
            f"velora-{init}",
            "MLP",
            {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": init}},
            expect="refuse",
            refusal="VeLoRA",
        )
        for init in ("random", "batch_average", "batch_average_once")
    ),
    Case(
        "monteclora",
        "MLP",
        {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}},
        expect="refuse",
        refusal="MonteCLoRA",
    ),
    Case(
        "bdlora-a",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_a": ["lin0"], "match_strict": False},
        },
        expect="refuse",
        refusal="BD-LoRA",
    ),
    Case(
        "bdlora-b",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_bdlora": {"target_modules_bd_b": ["lin1"], "nblocks": 2, "match_strict": False},
        },
        expect="refuse",
        refusal="BD-LoRA",
    ),
    Case(
        "alora",
        "MLP",
        {"target_modules": ["lin0"], "alora_invocation_tokens": [1]},
        expect="refuse",
        refusal="aLoRA",
    ),
    # ---- probes: scales and patterns
    Case(
        "mlp-rslora", "MLP", {"target_modules": ["lin0", "lin1"], "use_rslora": True, "r": 4, "lora_alpha": 6}
    ),
    Case(
        "mlp-rank-alpha-pattern",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "rank_pattern": {"lin1": 2},
            "alpha_pattern": {"lin0": 3},
        },
    ),
    Case("mlp-r1", "MLP", {"target_modules": ["lin0", "lin1"], "r": 1, "lora_alpha": 1}),
    Case("mlp-bias-all", "MLP", {"target_modules": ["lin0"], "bias": "all"}),
    Case("mlp-bias-lora-only", "MLP", {"target_modules": ["lin0"], "bias": "lora_only"}),
    Case("mlp-init-gaussian", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "gaussian"}),
    Case(
        "conv2d-rslora-pattern",
        "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "use_rslora": True, "rank_pattern": {"conv2d": 3}},
    ),
    # ---- probes: Conv1D layouts and flags
    Case("embconv1d-flag-given", "EmbConv1D", {"target_modules": ["conv1d"], "fan_in_fan_out": True}),
    Case(
        "embconv1d-add-adapter-conv1d",
        "EmbConv1D",
        {"target_modules": ["lin0"]},
        second={"target_modules": ["conv1d"]},
    ),
    Case("square-conv1d-only", "EmbConv1DSquare", {"target_modules": ["conv1d"]}),
    # A square Conv1D beside a square Linear, saved with the Linear's flag (false): the bare-checkpoint
    # rule assumes every square target is a Linear (custom models are; Conv1D is a transformers class,
    # and transformers checkpoints have a config.json), says so, and --fan-in-fan-out corrects it.
    Case(
        "square-conv1d-and-linear",
        "EmbConv1DSquare",
        {"target_modules": ["conv1d", "lin0"]},
        expect="assume",
        assumed="conv1d",
        option=("--fan-in-fan-out", r"conv1d"),
    ),
    # conv1d's shape says (in, out), against the saved flag (false, from lin0): lin0, square, is undecidable
    Case(
        "conv1d-contradicts-flag",
        "Conv1DThenSquareLinear",
        {"target_modules": ["conv1d", "lin0"]},
        expect="resolve",
        refusal="--fan-in-fan-out REGEX",
        option=("--fan-in-fan-out", "conv1d"),
    ),
    # each adapter targets one layer kind and PEFT saved each one's flag right: nothing contradicts them
    Case(
        "square-add-adapter",
        "EmbConv1DSquare",
        {"target_modules": ["lin0"]},
        second={"target_modules": ["conv1d"]},
    ),
    # ---- half precision
    *(
        Case(f"{name}-{dtype}", model, lora, dtype=dtype)
        for dtype in ("fp16", "bf16")
        for name, model, lora in (
            ("embconv1d-3", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
            ("conv2d-dora", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
            ("mha", "MHA", {"target_modules": ["mha"]}),
            ("llama", "llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
        )
    ),
    # ---- tiny transformers models
    Case("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    Case("llama-embed-lm-head", "llama", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
    Case("llama-dora", "llama", {"target_modules": ["q_proj", "o_proj", "gate_proj"], "use_dora": True}),
    Case(
        "llama-layers-to-transform",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    ),
    Case(
        "llama-patterns",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "r": 4,
            "rank_pattern": {"layers.0.self_attn.q_proj": 2, "up_proj": 3},
            "alpha_pattern": {"v_proj": 16},
        },
    ),
    Case("llama-modules-to-save", "llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    Case(
        "llama-no-config",
        "llama",
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        config_json=False,
    ),
    Case(
        "llama-trainable-tokens",
        "llama",
        {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 9]},
    ),
    # A LoRA on one side of a tied pair changes that side only, as PEFT's forward does; PEFT's own
    # merge_and_unload writes it into the shared tensor (changing the other side against its forward, with a
    # warning to untie first). The reference is PEFT's merge after untying, as that warning advises.
    Case("llama-tied-embed", "llama-tied", {"target_modules": ["embed_tokens", "q_proj"]}, untie_first=True),
    Case("llama-tied-lm-head", "llama-tied", {"target_modules": ["lm_head"]}, untie_first=True),
    Case(
        "llama-tied-embed-mts-lm-head",
        "llama-tied",
        {"target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]},
    ),
    Case(
        "llama-tied-trainable-tokens",
        "llama-tied",
        {"target_modules": ["v_proj"], "trainable_token_indices": {"embed_tokens": [0, 3, 7]}},
    ),
    Case("gpt2-conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    Case(
        "gpt2-conv1d-dora",
        "gpt2",
        {"target_modules": ["c_attn", "c_proj"], "use_dora": True, "fan_in_fan_out": True},
    ),
    Case("gpt2-add-adapter", "gpt2", {"target_modules": ["c_attn"]}, second={"target_modules": ["c_proj"]}),
    Case("gpt2-no-config-nonsquare", "gpt2", {"target_modules": ["c_attn", "c_fc"]}, config_json=False),
    Case(
        "gpt2-no-config-square",
        "gpt2",
        {"target_modules": ["c_attn"]},
        second={"target_modules": ["c_proj"]},
        config_json=False,
    ),
    # PEFT saves fan_in_fan_out: true for Conv1D targets: c_proj (square) follows the flag c_attn confirms
    Case(
        "gpt2-no-config-conv1d-square",
        "gpt2",
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": False},
        config_json=False,
    ),
    Case(
        "bert-cls-mts", "bert-cls", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    ),
    Case("bert-cls-bias-all", "bert-cls", {"target_modules": ["query", "dense"], "bias": "all"}),
    Case(
        "qwen3-moe-experts",
        "qwen3-moe",
        {
            "target_modules": ["q_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
    ),
    Case(
        "mixtral-experts",
        "mixtral",
        {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
    ),
    Case(
        "qwen3-moe-experts-fp16",
        "qwen3-moe",
        {"target_parameters": ["mlp.experts.gate_up_proj"]},
        dtype="fp16",
    ),
    # Llama-4 stores its experts (E, hidden, 2·inner) without transformers' is_transposed: PEFT reads
    # them as (E, out, in), and so is the merge
    Case(
        "llama4-experts",
        "llama4",
        {"target_parameters": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]},
    ),
    Case(
        "gpt-oss-experts",
        "gpt-oss",
        {
            "target_modules": ["q_proj"],
            "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        },
    ),
]


def _variants(cases):
    """Every merged case of PEFT's own matrix (the rows before the research variants) again on fp16 and
    bf16 bases, and with rsLoRA and a rank pattern: the same layouts under other numerics and scales."""
    peft_rows = cases[: next(i for i, c in enumerate(cases) if c.id == "kasa")]
    for case in peft_rows:
        if case.expect != M or case.forward_input or case.lora.get("init_lora_weights") == "mica":
            continue  # (PEFT's MiCA init refuses half-precision layers)
        for dtype in ("fp16", "bf16"):
            yield dataclasses.replace(case, id=f"{case.id}-{dtype}", dtype=dtype)
        if case.second is None and "target_parameters" not in case.lora:
            lora = {**case.lora, "use_rslora": True, "r": 6, "lora_alpha": 5}
            targets = case.lora.get("target_modules")
            first = targets if isinstance(targets, str) else targets[0]
            lora["rank_pattern"] = {first: 3}
            yield dataclasses.replace(case, id=f"{case.id}-rslora-pattern", lora=lora)


CASES += list(_variants(CASES))

# What fails today, and why (removed as support lands).
XFAIL: dict[str, str] = {}


def _params():
    for case in CASES:
        reason = XFAIL.get(case.id)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("matrix-bases"))


@pytest.mark.parametrize("case", list(_params()))
def test_merge_matches_peft(case: Case, bases: Bases, tmp_path):
    adapters, unmerged, expected = make_peft(bases, case, tmp_path / "adapter")
    base = bases.get(case.model, case.dtype, case.config_json)
    out = tmp_path / "out"
    if case.expect == "assume":
        result = run_cli("merge", base, *adapters, "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        assumed = [m for a in json.loads(result.stdout)["assumptions"] for m in a["modules"]]
        assert case.assumed in assumed, assumed
        shutil.rmtree(out)
        result = run_cli("--quiet", "merge", base, *adapters, "-o", out, *case.option)
    else:
        result = run_cli("--quiet", "merge", base, *adapters, "-o", out)
    if case.expect in ("refuse", "resolve"):
        assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
        assert result.stderr.startswith("Error: ") and case.refusal in result.stderr, result.stderr
        assert not out.exists()
        if case.expect == "refuse":
            return
        result = run_cli("--quiet", "merge", base, *adapters, "-o", out, *case.option)
    assert result.exit_code == 0, result.stderr
    if case.forward_input:
        assert expected is None, "PEFT merges this case now: compare with its merge instead"
        assert not layers_differing(unmerged, read_output(bases, case, out), case.forward_input)
        return
    ours = read_output(bases, case, out)
    assert set(ours) == set(expected), set(ours) ^ set(expected)
    exact = float64_merge(bases, case, adapters) if case.dtype != "fp32" else None
    for name, reference in expected.items():
        assert ours[name].shape == reference.shape and ours[name].dtype == reference.dtype, name
        if exact is None:
            error = relative_error(ours[name], reference)
            assert error <= RELATIVE, f"{name}: relative error {error:.3g}"
        else:  # half precision: no further from the float64 merge than PEFT
            ours_off = float((near_ties_resolved(ours[name], exact[name]).double() - exact[name]).norm())
            peft_off = float((reference.double() - exact[name]).norm())
            assert ours_off <= peft_off * (1 + 1e-6) + 1e-12, (
                f"{name}: {ours_off:.3g} vs PEFT's {peft_off:.3g}"
            )


def near_ties_resolved(ours, exact):
    """`ours` with each element that is not the correctly rounded float64 value replaced by it, where
    that element rounds a near-tie: both half-precision neighbours lie at the same distance from the
    float64 value up to float32 error (the merge adds in float32, then rounds once). Any other
    difference is kept, and counts against the comparison with PEFT. Measured on this matrix: one
    element of 200 (one fp16 ulp) under ATEN_CPU_CAPABILITY=default, none under avx2 or avx512."""
    rounded = exact.to(ours.dtype)
    ours_gap = (ours.double() - exact).abs()
    rounded_gap = (rounded.double() - exact).abs()
    tie = (ours_gap - rounded_gap).abs() <= 2.0**-21 * exact.abs()  # a few float32 ulps of the value
    return torch.where((ours != rounded) & tie, rounded, ours)


def test_a_bare_square_linear_mlp_merges_naming_what_it_assumed(bases: Bases, tmp_path):
    """PEFT's DeepMLP without config.json: square Linear layers of two names merge equal to PEFT,
    and the summary (stdout) and --json name every module whose layout the flag decided."""
    case = Case("deepmlp", "DeepMLP", {"target_modules": ["lin0", "lin1"]})
    adapters, _, expected = make_peft(bases, case, tmp_path / "adapter")
    base = bases.get(case.model)
    modules = [f"layers.{i}.lin{j}" for i in range(3) for j in range(2)]
    result = run_cli("merge", base, *adapters, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("assumed:")]
    assert "6 modules" in line and "layers.0.lin0" in line and "stored (out, in) as an nn.Linear" in line
    assert "fan_in_fan_out: false" in line and "--config" in line and "has no config.json" in line
    ours = read_output(bases, case, tmp_path / "out")
    for name, reference in expected.items():
        assert relative_error(ours[name], reference) <= RELATIVE, name
    result = run_cli("merge", base, *adapters, "-o", tmp_path / "again", "--json")
    (assumption,) = json.loads(result.stdout)["assumptions"]
    assert sorted(assumption["modules"]) == sorted(modules) and assumption["fan_in_fan_out"] is False
    assert assumption["adapter"] == str(adapters[0]) and "--config" in assumption["remedy"]
    # where the shapes decide (non-square Linear layers), nothing is assumed
    plain = Case("mlp", "MLP", {"target_modules": ["lin0", "lin1"]})
    adapters, _, _ = make_peft(bases, plain, tmp_path / "plain")
    result = run_cli("merge", bases.get(plain.model), *adapters, "-o", tmp_path / "plain-out", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["assumptions"] == []


def test_matrix_covers_every_kind():
    """The matrix holds each layer kind users meet, and every expected refusal is named."""
    models = {case.model for case in CASES}
    assert {"MLP", "EmbConv1D", "Conv1d", "Conv2d", "Conv3d", "MHA", "MlpUsingParameters", "gpt2"} <= models
    assert all(case.refusal for case in CASES if case.expect in ("refuse", "resolve"))
    assert all(case.assumed and case.option for case in CASES if case.expect == "assume")
    assert len({case.id for case in CASES}) == len(CASES)
