"""extract --calibrate: the whitened truncation is the exact optimum of ‖(ΔW − BA)X‖_F on a planted
data covariance; the Gram hooks see each layer's real inputs; the CLI reports both errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import run_cli

from lorasurgery import render
from lorasurgery.commands.extract.calibrate import collect_input_grams, whitened_factors, whitening

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
TEXT = SAMPLES / "corpus" / "Apache-2.0"


def test_whitened_truncation_is_the_exact_optimum_on_a_planted_covariance():
    g = torch.Generator().manual_seed(0)
    d, n, k, tokens = 24, 32, 5, 400
    M = torch.randn(d, n, generator=g, dtype=torch.float64)
    # Inputs concentrated on a few directions: covariance Q diag(c) Qᵀ with c spanning 10⁴.
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    c = torch.logspace(2, -2, n, dtype=torch.float64)
    X = Q @ (c.sqrt()[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64))  # (n, tokens)
    L = whitening(X @ X.T, tokens, ridge=0.0).L
    assert torch.allclose(L @ L.T, X @ X.T / tokens)

    B, A = whitened_factors(M, L, k)

    def data_error(Y):  # ‖(M − Y)X‖_F² per token
        return float(((M - Y) @ X).square().sum()) / tokens

    S_w = torch.linalg.svdvals(M @ L)
    optimum = float(S_w[k:].square().sum())  # Eckart–Young in the whitened space
    assert data_error(B @ A) == pytest.approx(optimum, rel=1e-9)
    # …and it is the unique minimiser [ML]_k L⁻¹
    U, S, Vh = torch.linalg.svd(M @ L)
    expected = (U[:, :k] * S[:k]) @ Vh[:k] @ torch.linalg.inv(L)
    assert torch.allclose(B @ A, expected, atol=1e-9)
    # Plain truncation is optimal in weight space and clearly worse on these inputs.
    U, S, Vh = torch.linalg.svd(M)
    plain = (U[:, :k] * S[:k]) @ Vh[:k]
    assert data_error(plain) > 1.5 * optimum
    assert float((M - plain).square().sum()) <= float((M - B @ A).square().sum())


def test_grams_are_those_of_each_layers_inputs_and_shared_by_q_k_v():
    from lorasurgery.causal_lm import load_causal_lm
    from lorasurgery.textdata import token_ids, token_windows

    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.down_proj",
    ]
    grams = collect_input_grams(SAMPLES / "finetuned", names, TEXT, tokens=256)
    assert grams[names[0]] is grams[names[1]]  # fed the same normed hidden states
    model = load_causal_lm(SAMPLES / "finetuned")
    inputs = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs[name].append(a[0][0])
        )
        for name in names
    ]
    with torch.no_grad():
        for window in token_windows(token_ids(SAMPLES / "finetuned", TEXT, 256), 64):
            model(window)
    for hook in hooks:
        hook.remove()
    for name in names:
        X = torch.cat(inputs[name]).double()  # (tokens, n)
        G = X.T @ X / X.shape[0]
        ridge = 1e-2 * float(G.diagonal().mean())
        L = grams[name].L
        assert grams[name].tokens == 256
        assert torch.allclose(
            L @ L.T, G + ridge * torch.eye(G.shape[0], dtype=torch.float64), rtol=1e-6, atol=1e-8
        )


def test_cli_calibrated_extraction_beats_plain_in_data_space(tmp_path, monkeypatch):
    from lorasurgery.adapter import load_adapter
    from lorasurgery.io import open_checkpoint

    monkeypatch.setattr(render.stdout, "width", 80)  # CI's xdist workers run at 80 columns
    common = ["extract", SAMPLES / "base", SAMPLES / "finetuned", "--rank", "4"]
    calibrated = run_cli(
        "-q",
        *common,
        "-o",
        tmp_path / "cal",
        "--calibrate",
        "--text",
        TEXT,
        "--tokens",
        "512",
        "--report",
        tmp_path / "cal.json",
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    assert "(data space:" in calibrated.stdout
    plain = run_cli("-q", *common, "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.stderr
    report = json.loads((tmp_path / "cal.json").read_text())
    assert "data_relative_error" in report["totals"]
    for module in report["modules"]:  # each row shows its data-space error, whole, at 80 columns
        row = next(line for line in calibrated.stdout.splitlines() if f" {module['name']} " in line)
        assert row.split()[-1] == render.format_number(module["data_relative_error"]), row
    names = [m["name"] for m in report["modules"]]
    grams = collect_input_grams(SAMPLES / "finetuned", names, TEXT, tokens=512)
    base, ft = open_checkpoint(SAMPLES / "base"), open_checkpoint(SAMPLES / "finetuned")
    plain_adapter, cal_adapter = load_adapter(tmp_path / "plain"), load_adapter(tmp_path / "cal")
    for module in report["modules"]:
        name = module["name"]
        delta = ft.read(name + ".weight").double() - base.read(name + ".weight").double()
        L = grams[name].L
        errors = {}
        for label, adapter in (("plain", plain_adapter), ("cal", cal_adapter)):
            A, B = adapter.read_factors(name)
            residual = delta - adapter.modules[name].scale * (B.double() @ A.double())
            errors[label] = (
                float((residual @ L).norm() / (delta @ L).norm()),
                float(residual.norm() / delta.norm()),
            )
        assert module["data_relative_error"] == pytest.approx(errors["cal"][0], rel=1e-3, abs=1e-6)
        assert module["relative_error"] == pytest.approx(errors["cal"][1], rel=1e-3, abs=1e-6)
        assert errors["cal"][0] <= errors["plain"][0] * (1 + 1e-4) + 1e-6, name  # optimal in data space
        assert errors["plain"][1] <= errors["cal"][1] * (1 + 1e-4) + 1e-6, name  # optimal in weight space
    usage = run_cli(*common, "-o", tmp_path / "x", "--calibrate")
    assert usage.exit_code == 2 and "--calibrate and --text" in usage.stderr and not (tmp_path / "x").exists()


def test_budget_on_whitened_spectra_scaled_or_not_stays_within_the_budget(tmp_path):
    from lorasurgery.commands.extract.extract import Policy, extract_adapter

    for scaled in (False, True):
        report = extract_adapter(
            SAMPLES / "base",
            SAMPLES / "finetuned",
            tmp_path / f"out{scaled}",
            policy=Policy(budget=20000),
            calibrate=TEXT,
            calibrate_tokens=256,
            calibrate_scaled_budget=scaled,
        )
        assert report.totals["params"] <= 20000 and "data_relative_error" in report.totals
        assert all(m.data_relative_error is not None for m in report.modules)
