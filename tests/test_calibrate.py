"""extract --calibrate: what it writes is the exact optimum of ‖(ΔW − BA)X‖_F on the layers' real
inputs (a float64 reference computed here); the Gram hooks see each layer's real inputs; the CLI
reports both errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clihelp import run_cli

from lorasurgery.cli import render
from lorasurgery.commands.extract.calibrate import collect_input_grams

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
TEXT = SAMPLES / "corpus" / "Apache-2.0"

POSITIONS = SimpleNamespace(max_position_embeddings=64)  # a config for token_windows


def reference_whitening(folder, names, tokens):
    """{module: L} computed here, independently of the product: each module's inputs captured by
    forward pre-hooks over the text's 64-token windows, G = XᵀX/tokens + 1e-2·mean(diag G)·I (the
    documented ridge) in float64, L its Cholesky factor."""
    from lorasurgery.causal_lm import load_causal_lm
    from lorasurgery.textdata import token_ids, token_windows

    model = load_causal_lm(folder)
    inputs = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: inputs[name].append(a[0][0].double())
        )
        for name in names
    ]
    with torch.no_grad():
        for window in token_windows(token_ids(folder, TEXT, tokens), POSITIONS, "test"):
            model(window)
    for hook in hooks:
        hook.remove()
    result = {}
    for name in names:
        X = torch.cat(inputs[name])  # (tokens, n)
        assert X.shape[0] == tokens
        G = X.T @ X / X.shape[0]
        G = G + 1e-2 * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=torch.float64)
        result[name] = torch.linalg.cholesky(G)
    return result


def data_error(adapter, name, delta, L) -> float:
    """‖(ΔW − s·BA)L‖_F / ‖ΔW·L‖_F of `adapter`'s module `name`, float64."""
    A, B = adapter.read_factors(name)
    residual = delta - adapter.modules[name].scale * (B.double() @ A.double())
    return float((residual @ L).norm() / (delta @ L).norm())


def test_calibrated_extraction_reaches_the_data_space_optimum_plain_truncation_misses(tmp_path):
    """What `extract --calibrate` writes is, per module, the Eckart–Young optimum of ‖(ΔW − BA)L‖_F
    with L from the layer's real inputs (computed here in float64): its data error is
    √(Σ_{i>k} σᵢ²(ΔW·L) / Σ σᵢ²(ΔW·L)). Plain truncation misses it, clearly on some module."""
    from lorasurgery.adapter import load_adapter
    from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter
    from lorasurgery.io import open_checkpoint

    k, tokens = 4, 512
    report = extract_adapter(
        ExtractRequest(
            SAMPLES / "base",
            SAMPLES / "finetuned",
            tmp_path / "cal",
            policy=Policy(rank=k),
            calibrate=TEXT,
            calibrate_tokens=tokens,
        ),
    )
    extract_adapter(
        ExtractRequest(SAMPLES / "base", SAMPLES / "finetuned", tmp_path / "plain", policy=Policy(rank=k))
    )
    names = [m.name for m in report.modules]
    whitening_of = reference_whitening(SAMPLES / "finetuned", names, tokens)
    base, ft = open_checkpoint(SAMPLES / "base"), open_checkpoint(SAMPLES / "finetuned")
    calibrated, plain = load_adapter(tmp_path / "cal"), load_adapter(tmp_path / "plain")
    gaps = []
    for module in report.modules:
        name = module.name
        delta = ft.read(name + ".weight").double() - base.read(name + ".weight").double()
        L = whitening_of[name]
        S = torch.linalg.svdvals(delta @ L)
        optimum = float((S[k:].square().sum() / S.square().sum()).sqrt())
        assert data_error(calibrated, name, delta, L) == pytest.approx(optimum, rel=1e-3, abs=1e-6), name
        assert module.data_relative_error == pytest.approx(optimum, rel=1e-3, abs=1e-6), name
        gaps.append(data_error(plain, name, delta, L) / optimum)
        assert gaps[-1] >= 1 - 1e-3, name
    assert max(gaps) > 1.05, gaps  # the calibration matters on these inputs


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
        for window in token_windows(token_ids(SAMPLES / "finetuned", TEXT, 256), POSITIONS, "test"):
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
    from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter

    for scaled in (False, True):
        report = extract_adapter(
            ExtractRequest(
                SAMPLES / "base",
                SAMPLES / "finetuned",
                tmp_path / f"out{scaled}",
                policy=Policy(budget=20000),
                calibrate=TEXT,
                calibrate_tokens=256,
                calibrate_scaled_budget=scaled,
            ),
        )
        assert report.totals["params"] <= 20000 and "data_relative_error" in report.totals
        assert all(m.data_relative_error is not None for m in report.modules)
