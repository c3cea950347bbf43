"""rank-report: every metric against a float64 dense reference in all three modes; CLI; plots."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import peft_adapter, peft_finetune, tiny_llama
from spectra_reference import assert_close, reference_metrics

from lorasurgery.commands.rank_report.rank_report import RankReportRequest, rank_report
from lorasurgery.io import open_checkpoint
from lorasurgery.linalg.lowrank import lowrank_svd


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    peft_adapter(
        tiny_llama(),
        root / "adapter",
        target_modules=["q_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        use_rslora=True,
    )
    peft_adapter(tiny_llama(), root / "other", seed=7, target_modules=["q_proj", "down_proj"], r=4)
    peft_adapter(tiny_llama(), root / "dora", target_modules=["q_proj"], r=2, use_dora=True)
    ft = peft_finetune(model, target_modules=["q_proj", "v_proj"], r=3)
    with torch.no_grad():
        for parameter in ft.parameters():
            parameter.add_(1e-3 * torch.randn_like(parameter))  # a full-rank tail, like real fine-tunes
    ft.save_pretrained(root / "ft")
    return root


def test_adapter_mode_matches_dense_svd_of_s_BA(setup):
    from lorasurgery.adapter import load_adapter

    report = rank_report(RankReportRequest(setup / "adapter", base=setup / "base"))
    adapter = load_adapter(setup / "adapter")
    base = open_checkpoint(setup / "base")
    deltas = [e for e in report.modules if e.kind == "delta"]
    weights = {e.name: e for e in report.modules if e.kind == "weight"}
    assert len(deltas) == len(adapter.modules) == len(weights)
    for entry in deltas:
        module = adapter.modules[entry.name]
        A, B = adapter.read_factors(entry.name)
        dense = module.scale * (B.double() @ A.double())
        assert_close(entry.metrics, reference_metrics(dense), entry.name)
        W = base.read(entry.name + ".weight").double()
        assert_close(weights[entry.name].metrics, reference_metrics(W), entry.name + " W")
        assert entry.metrics["relative_norm"] == pytest.approx(float(dense.norm() / W.norm()), rel=1e-6)
        U, S, Vh = torch.linalg.svd(dense)
        r = module.r
        expected = float(dense.norm() / (U[:, :r].T @ W @ Vh[:r].T).norm())
        assert entry.metrics["amplification"] == pytest.approx(expected, rel=1e-4)
        assert entry.metrics["amplification_random_baseline"] == pytest.approx(
            r * float(W.norm()) / math.sqrt(W.numel()), rel=1e-9
        )


def test_qr_core_spectrum_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = (
        torch.randn(6, 300, generator=g, dtype=torch.float64),
        torch.randn(200, 6, generator=g, dtype=torch.float64),
    )
    svd = lowrank_svd(A, B, 0.7)
    dense = 0.7 * B @ A
    assert torch.allclose(svd.S, torch.linalg.svdvals(dense)[:6], rtol=1e-10)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, dense, atol=1e-10)


def test_model_pair_mode_matches_dense_references(setup):
    report = rank_report(RankReportRequest(setup / "ft", base=setup / "base", amp_rank=4))
    base, ft = open_checkpoint(setup / "base"), open_checkpoint(setup / "ft")
    assert {e.kind for e in report.modules} == {"delta", "weight"}
    for entry in report.modules:
        W = base.read(entry.name + ".weight").double()
        M = ft.read(entry.name + ".weight").double() - W if entry.kind == "delta" else W
        assert_close(entry.metrics, reference_metrics(M), f"{entry.name} {entry.kind}")
    q = next(e for e in report.modules if e.kind == "delta" and e.name.endswith("q_proj"))
    k = next(e for e in report.modules if e.kind == "delta" and e.name.endswith("k_proj"))
    assert q.metrics["optimal_rank"] == 3 and k.metrics["optimal_rank"] <= 1  # planted rank 3 vs noise only


def test_model_alone_mode_reports_w(setup):
    report = rank_report(RankReportRequest(setup / "base"))
    base = open_checkpoint(setup / "base")
    assert {e.kind for e in report.modules} == {"weight"} and len(report.modules) == 14  # 7 per layer
    for entry in report.modules:
        assert_close(entry.metrics, reference_metrics(base.read(entry.name + ".weight")), entry.name)


def test_subspace_similarity_of_an_adapter_with_itself_and_another(setup):
    same = rank_report(RankReportRequest(setup / "adapter", compare=setup / "adapter"))
    for entry in same.modules:
        grid = entry.metrics["subspace_similarity"]
        assert all(grid[i][i] == pytest.approx(1.0, abs=1e-9) for i in range(len(grid)))
        assert entry.metrics["subspace_similarity_1_1"] == pytest.approx(1.0, abs=1e-9)
    other = rank_report(RankReportRequest(setup / "adapter", compare=setup / "other"))
    assert all(e.metrics["subspace_similarity_1_1"] < 0.9 for e in other.modules)


def _gauged_copy(adapter_dir, out, seed: int = 3):
    """The same ΔW = s·B@A with A → GA, B → BG⁻¹ (G a random well-conditioned r × r): a new gauge."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out)
    tensors = load_file(out / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if "lora_A" in k]:
        A = tensors[key].double()
        G = torch.eye(A.shape[0], dtype=torch.float64) + 0.5 * torch.randn(
            A.shape[0], A.shape[0], generator=generator, dtype=torch.float64
        )
        key_b = key.replace("lora_A", "lora_B")
        tensors[key] = (G @ A).float().contiguous()
        tensors[key_b] = (tensors[key_b].double() @ torch.linalg.inv(G)).float().contiguous()
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _phi_reference(V1: torch.Tensor, V2: torch.Tensor) -> list[list[float]]:
    """φ(i, j) = ‖V1_iᵀ V2_j‖_F² / min(i, j) from (n, r) column bases, by the definition."""
    return [
        [float((V1[:, :i].T @ V2[:, :j]).norm() ** 2 / min(i, j)) for j in range(1, V2.shape[1] + 1)]
        for i in range(1, V1.shape[1] + 1)
    ]


def test_both_phi_definitions_against_dense_references_and_a_gauge_transform(setup, tmp_path):
    """The paper's φ (right singular vectors of A) moves with the gauge A → GA, B → BG⁻¹; φ of ΔW does not."""
    from lorasurgery.adapter import load_adapter

    gauged = _gauged_copy(setup / "adapter", tmp_path / "gauged")
    other = load_adapter(setup / "other")
    reports = {}
    for label, folder in (("plain", setup / "adapter"), ("gauged", gauged)):
        adapter = load_adapter(folder)
        reports[label] = {
            e.name: e.metrics for e in rank_report(RankReportRequest(folder, compare=setup / "other")).modules
        }
        for name, metrics in reports[label].items():
            A, B = adapter.read_factors(name)
            A_o, B_o = other.read_factors(name)
            dense = adapter.modules[name].scale * (B.double() @ A.double())
            dense_o = other.modules[name].scale * (B_o.double() @ A_o.double())
            paper = _phi_reference(
                torch.linalg.svd(A.double(), full_matrices=False)[2].T,
                torch.linalg.svd(A_o.double(), full_matrices=False)[2].T,
            )
            delta = _phi_reference(torch.linalg.svd(dense)[2][:4].T, torch.linalg.svd(dense_o)[2][:4].T)
            for key, expected in (("subspace_similarity", paper), ("subspace_similarity_delta", delta)):
                got = torch.tensor(metrics[key], dtype=torch.float64)
                assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6), (
                    label,
                    name,
                    key,
                )
                assert metrics[key + "_1_1"] == pytest.approx(expected[0][0], abs=1e-6)
    for name in reports["plain"]:
        plain, gauged_metrics = reports["plain"][name], reports["gauged"][name]
        assert torch.allclose(
            torch.tensor(plain["subspace_similarity_delta"]),
            torch.tensor(gauged_metrics["subspace_similarity_delta"]),
            atol=1e-5,
        )
        paper_change = (
            torch.tensor(plain["subspace_similarity"]) - torch.tensor(gauged_metrics["subspace_similarity"])
        ).abs()
        assert paper_change[:3, :3].max() > 1e-2, name  # the gauge moved A's singular vectors
        # At i = j = r both span A's full row space, which the gauge keeps: φ(r, r) agrees.
        assert paper_change[-1, -1] < 1e-5


def test_model_pair_phi_is_one_definition_under_both_names(setup):
    report = rank_report(
        RankReportRequest(setup / "ft", base=setup / "base", compare=setup / "ft", amp_rank=3)
    )
    for entry in (e for e in report.modules if e.kind == "delta"):
        assert entry.metrics["subspace_similarity"] == entry.metrics["subspace_similarity_delta"]
        assert entry.metrics["subspace_similarity_1_1"] == pytest.approx(1.0, abs=1e-6)


def _reference_intruders(W: torch.Tensor, tuned: torch.Tensor, k: int, eps: float) -> tuple[int, list]:
    """Shuttleworth et al.'s Alg. 1 by the definition, float64 SVDs of W and W'."""
    U = torch.linalg.svd(W.double(), full_matrices=False)[0]
    U_tuned = torch.linalg.svd(tuned.double(), full_matrices=False)[0][:, :k]
    max_cosine = (U_tuned.T @ U).abs().max(dim=1).values
    return int((max_cosine < eps).sum()), max_cosine.tolist()


def test_intruder_dimensions_in_every_mode_match_float64_references(setup):
    from peft import PeftModel

    from lorasurgery.adapter import load_adapter

    base = open_checkpoint(setup / "base")
    ft = open_checkpoint(setup / "ft")
    tuned_of = {}
    adapter = load_adapter(setup / "adapter")
    for name, module in adapter.modules.items():
        A, B = adapter.read_factors(name)
        tuned_of[("adapter", name)] = base.read(name + ".weight").double() + module.scale * (
            B.double() @ A.double()
        )
    merged = PeftModel.from_pretrained(tiny_llama(), setup / "dora").merge_and_unload().state_dict()
    for name in load_adapter(setup / "dora").modules:
        tuned_of[("dora", name)] = merged[name + ".weight"].double()
    for name in ft.tensors:
        if ".layers." in name and name.endswith("proj.weight"):
            tuned_of[("ft", name[: -len(".weight")])] = ft.read(name).double()
    for target in ("adapter", "dora", "ft"):
        report = rank_report(
            RankReportRequest(setup / target, base=setup / "base", intruders_k=6, intruders_eps=0.6)
        )
        deltas = [e for e in report.modules if e.kind == "delta"]
        assert deltas
        for entry in deltas:
            W = base.read(entry.name + ".weight").double()
            count, max_cosine = _reference_intruders(W, tuned_of[(target, entry.name)], 6, 0.6)
            assert entry.metrics["intruder_max_cosine"] == pytest.approx(max_cosine, abs=1e-5), entry.name
            assert entry.metrics["intruder_dimensions"] == count, entry.name
        totals = {
            g["module_type"]: g["metrics"]["intruder_dimensions"]["total"]
            for g in report.summary["by_type"]
            if g["kind"] == "delta"
        }
        assert sum(totals.values()) == sum(e.metrics["intruder_dimensions"] for e in deltas)
    assert (
        "intruder_dimensions" not in rank_report(RankReportRequest(setup / "adapter")).modules[0].metrics
    )  # no base, no W


def test_dora_needs_a_base_and_then_uses_the_effective_delta(setup):
    assert_refused(
        ["rank-report", setup / "dora"],
        "is DoRA, whose effective ΔW = W' − W depends on W; pass --base",
        inputs=[setup / "dora"],
    )
    report = rank_report(RankReportRequest(setup / "dora", base=setup / "base"))
    assert any("DoRA" in n for n in report.notes)
    assert all(e.metrics["fro_norm"] > 0 for e in report.modules if e.kind == "delta")


def test_dora_amplification_is_that_of_the_merged_weight_minus_w(setup):
    """A DoRA ΔW = W' − W is dense; its amplification uses its own top-r vectors, as PEFT merges it."""
    from peft import PeftModel

    from lorasurgery.adapter import load_adapter

    module = next(iter(load_adapter(setup / "dora").modules.values()))
    base = open_checkpoint(setup / "base")
    merged = PeftModel.from_pretrained(tiny_llama(), setup / "dora").merge_and_unload().state_dict()
    report = rank_report(RankReportRequest(setup / "dora", base=setup / "base", compare=setup / "adapter"))
    for entry in (e for e in report.modules if e.kind == "delta"):
        W = base.read(entry.name + ".weight").double()
        delta = merged[entry.name + ".weight"].double() - W
        assert_close(entry.metrics, reference_metrics(delta), entry.name)
        U, _, Vh = torch.linalg.svd(delta)
        r = module.r
        expected = float(delta.norm() / (U[:, :r].T @ W @ Vh[:r].T).norm())
        assert entry.metrics["amplification"] == pytest.approx(expected, rel=1e-3)
        grid = entry.metrics["subspace_similarity"]  # DoRA's B@A (r = 2) against the other's (r = 4)
        assert len(grid) == 2 and len(grid[0]) == 4 and 0 <= entry.metrics["subspace_similarity_1_1"] <= 1


def test_amp_rank_narrows_an_adapters_amplification_but_not_its_phi_grid(setup):
    report = rank_report(
        RankReportRequest(setup / "adapter", base=setup / "base", compare=setup / "other", amp_rank=1)
    )
    base = open_checkpoint(setup / "base")
    from lorasurgery.adapter import load_adapter

    adapter = load_adapter(setup / "adapter")
    for entry in (e for e in report.modules if e.kind == "delta"):
        A, B = adapter.read_factors(entry.name)
        dense = adapter.modules[entry.name].scale * (B.double() @ A.double())
        W = base.read(entry.name + ".weight").double()
        U, _, Vh = torch.linalg.svd(dense)
        assert entry.metrics["amplification"] == pytest.approx(
            float(dense.norm() / (U[:, :1].T @ W @ Vh[:1].T).norm()), rel=1e-4
        )
        assert len(entry.metrics["subspace_similarity"]) == 4


def test_matrices_in_parallel_keep_the_models_order_and_report_progress(setup):
    events, threads = [], torch.get_num_threads()
    report = rank_report(RankReportRequest(setup / "ft", base=setup / "base"), events.append)
    names = [e.name for e in report.modules if e.kind == "delta"]
    expected = [n[: -len(".weight")] for n in open_checkpoint(setup / "ft").tensors if ".layers." in n]
    assert names == [n for n in expected if n in set(names)] and len(names) == 14
    assert [(e.done, e.total) for e in events] == [(i, 14) for i in range(1, 15)]
    assert torch.get_num_threads() == threads  # one thread per worker only while the pool runs


def test_cli_json_csv_and_plots(setup, tmp_path):
    result = run_cli(
        "-q",
        "rank-report",
        setup / "adapter",
        "--base",
        setup / "base",
        "--json",
        "-",
        "--csv",
        tmp_path / "r.csv",
        "--plot",
        tmp_path / "plots",
        "--mle",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # stdout holds the JSON alone
    assert set(data) == {"target", "base", "modules", "summary"}
    assert set(data["modules"][0]) == {"name", "kind", "shape", "metrics"}
    delta = next(m for m in data["modules"] if m["kind"] == "delta")
    expected = {
        "fro_norm",
        "spectral_norm",
        "numerical_rank",
        "stable_rank",
        "effective_rank",
        "participation_ratio",
        "energy_rank_90",
        "energy_rank_99",
        "optimal_rank",
        "relative_norm",
        "amplification",
        "amplification_random_baseline",
        "amplification_w_top_baseline",
        "mle_dimension",
        "intruder_dimensions",
        "intruder_max_cosine",
    }
    assert expected == set(delta["metrics"])
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(rows) == len(data["modules"]) and {"name", "kind", "stable_rank"} <= set(rows[0])
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert {"ranks_by_layer.png", "spectra_q_proj.png", "intruders_by_layer.png"} <= set(plots)
    for name in plots:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    table = run_cli("rank-report", setup / "adapter", "--compare", setup / "other")
    assert table.exit_code == 0 and "q_proj" in table.stdout and "φ(1,1)" in table.stdout


def test_bad_inputs(setup, tmp_path):
    assert_refused(["rank-report", tmp_path / "missing"], "no such file or folder")
    wide = tmp_path / "wide"
    tiny_llama(hidden=48).save_pretrained(wide)
    assert_refused(
        ["rank-report", wide, "--base", setup / "base"],
        "differs from the base's",
        inputs=[wide, setup / "base"],
    )
    assert_refused(
        ["rank-report", setup / "adapter", "--base", wide],
        "shape mismatch with the base",
        inputs=[wide, setup / "adapter"],
    )
