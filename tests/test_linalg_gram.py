"""The numpy Gram route (linalg.gram): decoding every float dtype like torch does, singular values
against float64 SVDs, and rank-report of W without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorasurgery.io import open_checkpoint
from lorasurgery.linalg.gram import gram_singular_values, read_matrix
from lorasurgery.linalg.svd import singular_values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_read_matrix_decodes_like_torch(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensor = (torch.randn(17, 9, generator=g) * 3).to(dtype)
    tensor[0, :3] = torch.tensor([0.0, -0.0, 65504.0 if dtype == torch.float16 else 1e30]).to(dtype)
    save_file({"w": tensor, "ids": torch.arange(4)}, tmp_path / "m.safetensors")
    checkpoint = open_checkpoint(tmp_path / "m.safetensors")
    values = read_matrix(checkpoint, "w")
    expected = tensor.to(torch.float64 if dtype == torch.float64 else torch.float32).numpy()
    assert values.dtype == expected.dtype and np.array_equal(values, expected)
    assert read_matrix(checkpoint, "ids") is None  # integers: the torch route handles them


@pytest.mark.parametrize("shape", [(40, 130), (130, 40), (1, 7), (64, 64)])
def test_gram_singular_values_match_float64_svd(shape):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[1])  # spread spectrum
    reference = torch.linalg.svdvals(M.double()).numpy()
    values = gram_singular_values(M.numpy())
    assert values.shape == reference.shape and np.all(values[:-1] >= values[1:])
    # The Gram floor: absolute error ≈ sqrt(min(d, n)·eps64)·σ₁ (linalg.svd's error model)
    assert np.max(np.abs(values - reference)) <= 1e-7 * reference[0]
    assert torch.allclose(singular_values(M), torch.from_numpy(reference), rtol=0, atol=1e-7 * reference[0])


def test_large_matrices_are_accumulated_in_blocks(monkeypatch):
    from lorasurgery.linalg import gram

    monkeypatch.setattr(gram, "GRAM_BLOCK_ELEMENTS", 64)  # forces many column blocks
    M = np.random.default_rng(2).standard_normal((8, 301)).astype(np.float32)
    reference = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    assert np.allclose(gram.gram_singular_values(M), reference, rtol=0, atol=1e-9 * reference[0])


def test_rank_report_of_w_never_imports_torch(tmp_path):
    from factories import tiny_llama

    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "model")
    script = (
        "import json, sys\n"
        "from lorasurgery.commands.rank_report.rank_report import RankReportRequest, rank_report\n"
        f"report = rank_report(RankReportRequest({str(tmp_path / 'model')!r}))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'report': report.to_json()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    data = json.loads(result.stdout)
    assert data["torch"] is False
    checkpoint = open_checkpoint(tmp_path / "model")
    for module in data["report"]["modules"]:
        W = checkpoint.read(module["name"] + ".weight").double()
        S = torch.linalg.svdvals(W)
        assert module["metrics"]["spectral_norm"] == pytest.approx(float(S[0]), rel=1e-6)
        assert module["metrics"]["fro_norm"] == pytest.approx(float(S.norm()), rel=1e-6)
        # bf16's eps sets the numerical-rank threshold: σ₁·max(d, n)·2⁻⁷
        expected_rank = int((S > S[0] * max(W.shape) * 2**-7).sum())
        assert module["metrics"]["numerical_rank"] == expected_rank
