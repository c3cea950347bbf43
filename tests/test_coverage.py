"""What adapters really contain, read by inspect and rank-report (the merges are in test_peft_matrix.py).

LoRA on 3-D expert parameters (target_parameters) of a tiny gpt-oss (fused, stored (E, in, out)) and a
tiny Qwen3-MoE (the checkpoint stores each expert's gate/up/down split), trainable tokens on a tied
Llama, nn.MultiheadAttention: each against PEFT's own ΔW (ParamWrapper.get_delta_weight, the merged
rows), and the refusals of what cannot be decided or does not fit, through the CLI.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clihelp import assert_refused, run_cli
from peft_matrix import Bases, Case, make_peft

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lorasurgery.commands.rank_report.rank_report import RankReportRequest, rank_report  # noqa: E402

EXPERTS = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("coverage-bases"))


def peft_parameter_deltas(unmerged) -> dict[str, torch.Tensor]:
    """PEFT's ΔW of every ParamWrapper, under `<module>.<parameter>` (nested wrappers unwrapped)."""
    from peft.tuners.lora.layer import ParamWrapper

    deltas = {}
    for name, module in unmerged.named_modules():
        if isinstance(module, ParamWrapper):
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            with torch.no_grad():
                deltas[f"{path}.{module.parameter_name}"] = (
                    module.get_delta_weight("default").detach().double()
                )
    return deltas


@pytest.mark.parametrize("model", ["gpt-oss", "qwen3-moe"])
def test_inspect_experts_norms_are_peft_deltas(model, bases, tmp_path):
    adapters, unmerged, _ = make_peft(bases, Case(model, model, EXPERTS), tmp_path / "a")
    deltas = peft_parameter_deltas(unmerged)
    result = run_cli("inspect", adapters[0], "--base", bases.get(model), "--json", "--all")
    assert result.exit_code == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    assert set(modules) == set(deltas)
    expected_w = {k: v.double() for k, v in bases.load(model).state_dict().items()}
    for name, delta in deltas.items():
        entry = modules[name]
        assert entry["kind"] == "parameter" and entry["shape"][0] == delta.shape[0]  # one block per expert
        assert entry["delta_fro_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert entry["relative_norm"] == pytest.approx(
            float(delta.norm() / expected_w[name].norm()), rel=1e-5
        )
    # without a base the two parameters of `experts` cannot be told apart yet, but their sizes can
    alone = json.loads(run_cli("inspect", adapters[0], "--json", "--all").stdout)["modules"]
    assert sorted(m["delta_fro_norm"] for m in alone) == pytest.approx(
        sorted(float(d.norm()) for d in deltas.values()), rel=1e-5
    )


@pytest.mark.parametrize("model", ["gpt-oss", "qwen3-moe"])
def test_rank_report_per_expert_spectra(model, bases, tmp_path):
    adapters, unmerged, _ = make_peft(bases, Case(model, model, EXPERTS), tmp_path / "a")
    deltas = peft_parameter_deltas(unmerged)
    weights = {k: v.double() for k, v in bases.load(model).state_dict().items()}
    transposed = model == "gpt-oss"  # its experts are stored (E, in, out)
    report = rank_report(RankReportRequest(adapters[0], base=bases.get(model)))
    entries = {(m.name, m.kind): m for m in report.modules}
    for name, delta in deltas.items():
        parameter = name.rsplit(".", 1)[-1]
        for e in range(delta.shape[0]):
            label = f"{name}[{e}]"
            d_e = delta[e].T if transposed else delta[e]  # (out, in)
            expected = torch.linalg.svdvals(d_e)
            got = torch.tensor(entries[(label, "delta")].spectrum[: len(expected)], dtype=torch.float64)
            r = min(len(got), 8)
            assert torch.allclose(got[:r], expected[:r], rtol=1e-5, atol=1e-6), label
            w_e = weights[name][e]
            assert torch.allclose(
                torch.tensor(entries[(label, "weight")].spectrum, dtype=torch.float64),
                torch.linalg.svdvals(w_e),
                rtol=1e-5,
                atol=1e-6,
            ), label
            metrics = entries[(label, "delta")].metrics
            assert metrics["relative_norm"] == pytest.approx(float(d_e.norm() / w_e.norm()), rel=1e-5)
        group = next(
            g for g in report.summary["by_type"] if g["module_type"] == parameter and g["kind"] == "delta"
        )
        assert group["count"] == delta.shape[0]  # the table's row: one per parameter, over its experts
    result = run_cli("rank-report", adapters[0], "--json", "-")  # per expert without a base too
    assert result.exit_code == 0, result.stderr
    names = [m["name"] for m in json.loads(result.stdout)["modules"]]
    assert len(names) == sum(d.shape[0] for d in deltas.values())


def test_trainable_tokens_in_inspect(bases, tmp_path):
    case = Case("tokens", "llama-tied", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 9]})
    adapters, unmerged, merged = make_peft(bases, case, tmp_path / "a")
    base = bases.get("llama-tied")
    result = run_cli("inspect", adapters[0], "--base", base, "--json", "--all")
    assert result.exit_code == 0, result.stderr
    entry = next(m for m in json.loads(result.stdout)["modules"] if m["kind"] == "tokens")
    assert entry["name"] == "model.embed_tokens.weight" and entry["tokens"] == [1, 5, 9]
    assert entry["shape"] == [3, 16] and entry["params"] == 48
    E = bases.load("llama-tied").model.embed_tokens.weight.detach().double()
    rows = merged["model.embed_tokens.weight"].double()[[1, 5, 9]]
    assert entry["delta_fro_norm"] == pytest.approx(float((rows - E[[1, 5, 9]]).norm()), rel=1e-6)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])  # PEFT keeps the tie


def test_multihead_attention_in_inspect(bases, tmp_path):
    adapters, unmerged, merged = make_peft(
        bases, Case("mha", "MHA", {"target_modules": ["mha"]}), tmp_path / "a"
    )
    result = run_cli("inspect", adapters[0], "--base", bases.get("MHA"), "--json", "--all")
    assert result.exit_code == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    base = {k: v.double() for k, v in bases.load("MHA").state_dict().items()}
    # in_proj (3·dim, dim) and out_proj, each ‖ΔW‖ as merged by PEFT (out_proj: 2·s·B@A, see docs/merge.md)
    assert modules["mha"]["shape"] == [30, 10]
    for name, tensor in (("mha", "mha.in_proj_weight"), ("mha.out_proj", "mha.out_proj.weight")):
        expected = float((merged[tensor].double() - base[tensor]).norm())
        assert modules[name]["delta_fro_norm"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- refusals


def _edit_config(adapter, out, **changes):
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_target_parameters_that_fit_nothing_are_refused(bases, tmp_path):
    adapters, _, _ = make_peft(
        bases, Case("p", "gpt-oss", {"target_parameters": ["mlp.experts.down_proj"]}), tmp_path / "a"
    )
    bad = _edit_config(adapters[0], tmp_path / "bad", target_parameters=["mlp.experts.gate_up_proj"])
    base = bases.get("gpt-oss")
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, bad, "-o", out], "fit none of the base's parameters", inputs=[base, bad], output=out
    )


def test_square_experts_without_config_are_refused_with_the_way_out(bases, tmp_path):
    # gpt-oss's gate_up_proj is (E, 16, 16): without config.json nothing says it is stored (E, in, out)
    case = Case("p", "gpt-oss", {"target_parameters": ["mlp.experts.gate_up_proj"]})
    adapters, _, merged = make_peft(bases, case, tmp_path / "a")
    base = bases.get("gpt-oss", config_json=False)
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapters[0], "-o", out], "pass --config", inputs=[base, adapters[0]], output=out
    )


def test_trainable_tokens_beyond_the_vocabulary_are_refused(bases, tmp_path):
    case = Case("t", "llama", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]})
    adapters, _, _ = make_peft(bases, case, tmp_path / "a")
    bad = _edit_config(adapters[0], tmp_path / "bad", trainable_token_indices=[1, 64])
    base = bases.get("llama")
    out = tmp_path / "out"
    assert_refused(["merge", base, bad, "-o", out], "token 64 is beyond", inputs=[base, bad], output=out)
    assert_refused(["inspect", bad, "--base", base], "token 64 is beyond", inputs=[base, bad])


def test_trainable_tokens_without_indices_are_refused(bases, tmp_path):
    case = Case(
        "t", "llama", {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 2]}}
    )
    adapters, _, _ = make_peft(bases, case, tmp_path / "a")
    bad = _edit_config(adapters[0], tmp_path / "bad", trainable_token_indices={"lm_head": [1, 2]})
    base = bases.get("llama")
    out = tmp_path / "out"
    assert_refused(["merge", base, bad, "-o", out], "names no rows for it", inputs=[base, bad], output=out)


def test_trainable_tokens_cannot_be_subtracted_and_must_be_finite(bases, tmp_path):
    from lorasurgery.io import open_checkpoint, save_tensors

    case = Case("t", "llama", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]})
    adapters, _, _ = make_peft(bases, case, tmp_path / "a")
    base = bases.get("llama")
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapters[0], "-o", out, "--subtract"],
        "--subtract is refused for trainable tokens",
        inputs=[base, adapters[0]],
        output=out,
    )
    bad = tmp_path / "nan"
    shutil.copytree(adapters[0], bad)
    checkpoint = open_checkpoint(bad / "adapter_model.safetensors")
    tensors = {name: checkpoint.read(name).clone() for name in checkpoint.tensors}
    key = next(k for k in tensors if k.endswith("trainable_tokens_delta"))
    tensors[key][0, 0] = float("nan")
    del checkpoint
    (bad / "adapter_model.safetensors").unlink()
    save_tensors(bad, tensors, stem="adapter_model")
    assert_refused(
        ["merge", base, bad, "-o", out],
        "trainable tokens of model.embed_tokens hold NaN/Inf",
        inputs=[base, bad],
        output=out,
    )


def test_extract_reports_expert_parameters_it_cannot_factor(bases, tmp_path):
    """A fine-tune that changed fused expert weights: extract factors the 2-D weights and names each
    changed 3-D parameter among the skipped ones, with its share of the change (never silently)."""
    case = Case("oss", "gpt-oss", {"target_modules": ["q_proj"], **EXPERTS})
    adapters, _, _ = make_peft(bases, case, tmp_path / "a")
    base = bases.get("gpt-oss")
    finetune = tmp_path / "ft"
    assert run_cli("merge", base, adapters[0], "-o", finetune).exit_code == 0
    result = run_cli("extract", base, finetune, "-o", tmp_path / "x", "--rank", "8", "--json")
    assert result.exit_code == 0, result.stderr
    skipped = {s["name"]: s for s in json.loads(result.stdout)["skipped"]}
    for name in EXPERTS["target_parameters"]:
        entry = skipped[f"model.layers.0.{name}"]
        assert "3-D parameter" in entry["reason"] and entry["relative_norm"] > 0.1


def test_merge_summary_counts_split_experts_once_and_notes_unscaled_tokens(bases, tmp_path):
    adapters, _, _ = make_peft(
        bases, Case("q", "qwen3-moe", {"target_modules": ["q_proj"], **EXPERTS}), tmp_path / "a"
    )
    result = run_cli("merge", bases.get("qwen3-moe"), adapters[0], "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    # q_proj in 1 layer + gate_up_proj + down_proj, although 4 experts × 3 stored tensors are merged
    assert summary["adapters"][0]["modules_merged"] == 3 and summary["tensors_merged"] == 13
    case = Case("t", "llama", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]})
    adapters, _, _ = make_peft(bases, case, tmp_path / "t")
    result = run_cli(
        "merge", bases.get("llama"), adapters[0], "-o", tmp_path / "out2", "--weight", "0.5", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert any("does not scale its trainable tokens" in note for note in json.loads(result.stdout)["notes"])
