"""`export --max-rank K` with expert LoRA (docs/export.md, "MoE experts"), on tiny real Qwen3-MoE, Mixtral
and gpt-oss with PEFT-made adapters (per-expert modules, and target_parameters on the fused experts),
every factor randomised: what each target computes from the export equals, per expert, the best rank-K
approximation of PEFT's own ΔW (Eckart–Young, from a float64 SVD) in the unit the target counts rank
in — an expert's slice of the fused parameter (PEFT, vLLM's 3-D MoE: gate and up together), or each
per-expert module (vLLM's 2-D path, SGLang); each expert's reported error is that approximation's;
PEFT loads the truncated export with no missing or unexpected key; K at or above every rank writes the
export without --max-rank bit for bit; expert DoRA is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import MOE_KINDS, MOE_NAMES, per_expert_twin, randomize_adapter, relative_error, tiny_moe
from safetensors.torch import load_file
from test_export_moe import (
    EXPERTS,
    _fused_adapter,
    _load_exported,
    _per_expert_adapter,
    _reference_deltas,
    _served_deltas,
)

GATE_UP, DOWN = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
TARGETS = ("peft", "vllm", "sglang")


@pytest.fixture(scope="module", params=MOE_KINDS)
def moe(request, tmp_path_factory):
    """A tiny MoE base of one kind with a per-expert adapter (r 4) and a target_parameters one (r 3)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = tiny_moe(kind)
    model.save_pretrained(root / "base")
    per_expert = _per_expert_adapter(kind, per_expert_twin(model, kind), root / "per-expert")
    fused = _fused_adapter(tiny_moe(kind), root / "fused")
    return {
        "kind": kind,
        "base": root / "base",
        "per-expert": (root / "per-expert", per_expert),
        "fused": (root / "fused", fused),
    }


def _fused_layout(kind: str, target: str) -> bool:
    """Whether `target` loads the experts' LoRA fused: PEFT on transformers 5, vLLM on gpt-oss."""
    return target == "peft" or (target == "vllm" and kind == "gpt-oss")


def _export(adapter, base, target, out, *extra):
    result = run_cli("export", adapter, "--for", target, "--base", base, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _served(kind, target, out) -> dict:
    """{(expert, role): ΔW} the target computes from the export: PEFT's own forward pieces on the
    transformers-5 model, or vLLM's / SGLang's rules (test_export_moe._served_deltas)."""
    if target == "peft":
        exported, missing, unexpected = _load_exported(kind, out)
        assert missing == [] and unexpected == []
        return _reference_deltas(kind, exported)
    return _served_deltas(kind, out, target)


def _best(M: torch.Tensor, k: int) -> tuple[torch.Tensor, float, float]:
    """(best rank-k approximation of M, its squared error, ‖M‖²) from a float64 SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], float(S[k:].square().sum()), float(S.square().sum())


def _units(kind: str, target: str, deltas: dict) -> dict:
    """{(expert, unit): ΔW} in the unit the target's rank counts: (expert, "gate_up") stacks gate and
    up rows where the layout is fused, else every role apart."""
    if not _fused_layout(kind, target):
        return dict(deltas)
    experts = sorted({e for e, _ in deltas})
    units = {(e, "down"): deltas[(e, "down")] for e in experts}
    units.update({(e, "gate_up"): torch.cat([deltas[(e, "gate")], deltas[(e, "up")]]) for e in experts})
    return units


@pytest.mark.parametrize("source, k", [("per-expert", 3), ("fused", 2)])
@pytest.mark.parametrize("target", TARGETS)
def test_truncated_experts_are_the_best_rank_k_per_expert(moe, source, k, target, tmp_path):
    kind = moe["kind"]
    if kind == "gpt-oss" and target == "sglang":
        pytest.skip("refused by name (test_export_moe.py: SGLang has no interleaved gate/up)")
    adapter, wrapped = moe[source]
    out = tmp_path / "out"
    report = _export(adapter, moe["base"], target, out, "--max-rank", str(k))

    reference = _units(kind, target, _reference_deltas(kind, wrapped))
    served = _units(kind, target, _served(kind, target, out))
    assert sorted(served) == sorted(reference)
    squares = {}  # expert -> [squared error, squared norm] over its units of one fused parameter
    for key, delta in reference.items():
        best, error_sq, norm_sq = _best(delta, k)
        assert relative_error(served[key], best) < 1e-5, key  # Eckart–Young, float32 factors
        assert relative_error(served[key], delta) > 1e-3, key  # the truncation did something
        parameter = DOWN if key[1] == "down" else GATE_UP
        sums = squares.setdefault((parameter, key[0]), [0.0, 0.0])
        sums[0], sums[1] = sums[0] + error_sq, sums[1] + norm_sq

    rows = {m["name"]: m for m in report["modules"]}
    for parameter in (GATE_UP, DOWN):
        row = rows[parameter]
        assert "truncated" in row["method"] and row["rank_out"] == k
        expected = [
            (squares[(parameter, e)][0] / squares[(parameter, e)][1]) ** 0.5 for e in range(EXPERTS[kind])
        ]
        torch.testing.assert_close(
            torch.tensor(row["expert_errors"]), torch.tensor(expected), rtol=1e-4, atol=0
        )
        assert row["relative_error"] == max(row["expert_errors"])
    assert report["max_relative_error"] >= max(rows[GATE_UP]["expert_errors"])
    rule = next(r for r in report["rules"] if r["id"] == "max_rank")
    assert rule["status"] == "fixed" and {GATE_UP, DOWN} <= set(rule["modules"])
    assert any(f"--max-rank {k}" in note and "per expert" in note for note in report["notes"])

    tensors = load_file(out / "adapter_model.safetensors")
    ranks = {
        t.shape[0]
        // (EXPERTS[kind] if ".experts.base_layer.lora_A" in key or ".experts.lora_A" in key else 1)
        for key, t in tensors.items()
        if ".lora_A." in key and "experts" in key
    }
    assert ranks == {k}


def test_a_stacked_gate_up_counts_both_ranks(tmp_path):
    """Gate and up trained with different lora_A fuse at rank r_gate + r_up: --max-rank r leaves every
    module of the adapter as it is but that fused parameter, which it truncates and names."""
    kind = "qwen3-moe"
    model = tiny_moe(kind)
    model.save_pretrained(tmp_path / "base")
    wrapped = _per_expert_adapter(kind, per_expert_twin(model, kind), tmp_path / "a")
    plain = _export(tmp_path / "a", tmp_path / "base", "peft", tmp_path / "plain")
    report = _export(tmp_path / "a", tmp_path / "base", "peft", tmp_path / "out", "--max-rank", "4")
    rows = {m["name"]: m for m in report["modules"]}
    assert {n: rows[n]["rank_in"] for n in (GATE_UP, DOWN)} == {GATE_UP: 4, DOWN: 4}
    assert rows[GATE_UP]["rank_out"] == 4 and "truncated" in rows[GATE_UP]["method"]
    assert rows[DOWN]["method"] == "copied" and rows[DOWN]["expert_errors"] == [0.0] * EXPERTS[kind]
    assert 1e-3 < rows[GATE_UP]["relative_error"] < 1
    rule = next(r for r in report["rules"] if r["id"] == "max_rank")
    assert rule["status"] == "fixed" and rule["modules"] == [GATE_UP]
    before, after = (
        load_file(tmp_path / "plain" / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    for key, tensor in before.items():  # the attention and down_proj copied as without --max-rank
        if ".experts.base_layer." not in key:
            assert torch.equal(after[key], tensor), key
    assert plain["max_relative_error"] == 0.0
    served = _units(kind, "peft", _served(kind, "peft", tmp_path / "out"))
    for (e, unit), delta in _units(kind, "peft", _reference_deltas(kind, wrapped)).items():
        assert relative_error(served[(e, unit)], _best(delta, 4)[0]) < 1e-5, (e, unit)


@pytest.mark.parametrize("source", ["per-expert", "fused"])
@pytest.mark.parametrize("target", TARGETS)
def test_max_rank_at_or_above_every_rank_changes_nothing(moe, source, target, tmp_path):
    kind = moe["kind"]
    if kind == "gpt-oss" and target == "sglang":
        pytest.skip("refused by name")
    adapter, _ = moe[source]
    without = _export(adapter, moe["base"], target, tmp_path / "without")
    with_k = _export(adapter, moe["base"], target, tmp_path / "with", "--max-rank", "8")  # stacked: 4 + 4
    a, b = (
        load_file(tmp_path / "without" / "adapter_model.safetensors"),
        load_file(tmp_path / "with" / "adapter_model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "without" / "adapter_config.json").read_text() == (
        tmp_path / "with" / "adapter_config.json"
    ).read_text()
    assert without["modules"] == with_k["modules"]
    assert all("truncated" not in m["method"] for m in with_k["modules"])


def test_expert_dora_is_refused_by_name(tmp_path):
    """PEFT's fused expert LoRA has no magnitude vector: a per-expert DoRA adapter has no fused form,
    and export does not convert expert DoRA (it would otherwise drop the magnitudes without a word)."""
    import peft

    kind = "qwen3-moe"
    model = tiny_moe(kind)
    model.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(target_modules=list(MOE_NAMES[kind]), r=2, lora_alpha=4, use_dora=True)
    wrapped = peft.get_peft_model(per_expert_twin(model, kind), config)
    randomize_adapter(wrapped, seed=6, a_std=0.2)
    wrapped.save_pretrained(tmp_path / "a")
    for target in TARGETS:
        out = tmp_path / target
        assert_refused(
            [
                "export",
                tmp_path / "a",
                "--for",
                target,
                "--base",
                tmp_path / "base",
                "-o",
                out,
                "--max-rank",
                "1",
            ],
            f"the experts of {DOWN} are DoRA",
            inputs=[tmp_path / "a", tmp_path / "base"],
            output=out,
        )
    result = run_cli("inspect", tmp_path / "a", "--for", "vllm", "--base", tmp_path / "base", "--json")
    rule = next(r for r in json.loads(result.stdout)["rules"] if r["id"] == "experts")
    assert result.exit_code == 4 and rule["status"] == "impossible" and "DoRA" in rule["action"]


@pytest.mark.parametrize("k", ["0", "-1"])
def test_max_rank_below_one_is_refused(moe, k, tmp_path):
    """A rank-0 LoRA is no LoRA (and a negative rank crashed); refused like resize's, nothing written."""
    adapter, _ = moe["per-expert"]
    out = tmp_path / "out"
    result = run_cli("export", adapter, "--for", "vllm", "--base", moe["base"], "-o", out, "--max-rank", k)
    assert (
        result.exit_code == 2
        and result.stderr.startswith("Error: ")
        and "--max-rank must be at least 1" in result.stderr
    )
    assert not out.exists()


@pytest.mark.parametrize("target", TARGETS)
def test_parts_of_one_parameter_above_and_below_k(target, tmp_path):
    """Gate at rank 2 and another scale, up and down at rank 4, K = 3: in the per-expert layouts gate
    is only folded to the target's scale while up and down are truncated, and each expert's gate_up
    error counts both; in the fused layout the gate_up slice (rank 2 + 4) is truncated as one."""
    kind = "qwen3-moe"
    model = tiny_moe(kind)
    model.save_pretrained(tmp_path / "base")
    wrapped = _per_expert_adapter(
        kind,
        per_expert_twin(model, kind),
        tmp_path / "a",
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"gate_proj": 3},
    )
    report = _export(tmp_path / "a", tmp_path / "base", target, tmp_path / "out", "--max-rank", "3")
    reference = _reference_deltas(kind, wrapped)
    served = _served(kind, target, tmp_path / "out")
    fused = _fused_layout(kind, target)
    for (e, role), delta in reference.items():
        if role == "gate" and not fused:  # kept at its rank: only the fold's rounding
            assert relative_error(served[(e, role)], delta) < 1e-6
        elif role == "down" or not fused:
            assert relative_error(served[(e, role)], _best(delta, 3)[0]) < 1e-5, (e, role)
    if fused:
        units = _units(kind, target, reference)
        got = _units(kind, target, served)
        for e in range(EXPERTS[kind]):
            assert relative_error(got[(e, "gate_up")], _best(units[(e, "gate_up")], 3)[0]) < 1e-5
    row = next(m for m in report["modules"] if m["name"] == GATE_UP)
    assert "truncated" in row["method"] and "folded" in row["method"]
    for e in range(EXPERTS[kind]):  # the reported error is what the target computes, over gate and up
        error_sq = sum(
            float((served[(e, r)] - reference[(e, r)]).double().square().sum()) for r in ("gate", "up")
        )
        norm_sq = sum(float(reference[(e, r)].double().square().sum()) for r in ("gate", "up"))
        assert row["expert_errors"][e] == pytest.approx((error_sq / norm_sq) ** 0.5, rel=1e-4)
