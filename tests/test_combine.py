"""`combine` against float64 dense references and PEFT: the exact weighted sum (concatenation), the
optimal truncation of the sum, adapters differing in targets/ranks/scales/rsLoRA/patterns, embeddings,
lora_bias, saved tensors, DoRA inputs; every output reloaded by `PeftModel.from_pretrained`."""

from __future__ import annotations

import json

import pytest
import torch
from factories import make_adapter, make_llama, peft_merged_state_dict, relative_error
from safetensors.torch import load_file
from surgery_reference import deltas, load_with_peft, optimal

from lorasurgery.commands.surgery.combine import CombineRequest, combine_adapters
from lorasurgery.errors import LoraSurgeryError, MismatchError
from lorasurgery.linalg.policies import Policy

WEIGHTS = [0.5, -1.0, 2.0]


@pytest.fixture(scope="module")
def three(llama_base, tmp_path_factory):
    """Three adapters of one base: different targets, ranks, scales, rsLoRA and patterns."""
    root = tmp_path_factory.mktemp("three")
    return [
        make_adapter(
            llama_base,
            root / "a",
            target_modules=["q_proj", "v_proj"],
            r=8,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"v_proj": 6},
            alpha_pattern={"v_proj": 3},
            seed=1,
        ),
        make_adapter(
            llama_base,
            root / "b",
            target_modules=["q_proj", "k_proj", "down_proj"],
            r=4,
            lora_alpha=4,
            seed=2,
        ),
        make_adapter(
            llama_base, root / "c", target_modules=["v_proj", "embed_tokens"], r=2, lora_alpha=7, seed=3
        ),
    ]


def weighted_sum(base, adapters, weights):
    found = [deltas(base, a) for a in adapters]
    names = set().union(*found)
    return {n: sum(w * d[n] for w, d in zip(weights, found) if n in d) for n in names}


def test_exact_combination_merges_to_the_weighted_sum(llama_base, three, tmp_path):
    report = combine_adapters(
        CombineRequest(three, tmp_path / "out", weights=WEIGHTS, exact=True, dtype="fp32")
    )
    load_with_peft(llama_base, tmp_path / "out")
    expected, got = weighted_sum(llama_base, three, WEIGHTS), deltas(llama_base, tmp_path / "out")
    assert set(got) == set(expected)
    for name, delta in expected.items():
        assert relative_error(got[name], delta) < 1e-6, name
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 12 and ranks["model.layers.0.self_attn.v_proj"] == 8
    assert ranks["model.embed_tokens"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 4
    assert all(m.relative_error < 1e-6 for m in report.modules)
    # the same through PEFT's own merges of the inputs, weighted
    ours = peft_merged_state_dict(llama_base, [tmp_path / "out"])
    theirs = peft_merged_state_dict(llama_base, three, weights=WEIGHTS)
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name


def test_truncated_combination_is_the_optimal_rank_k_sum(llama_base, three, tmp_path):
    report = combine_adapters(CombineRequest(three, tmp_path / "out", weights=WEIGHTS, policy=Policy(rank=3)))
    load_with_peft(llama_base, tmp_path / "out")
    expected, got = weighted_sum(llama_base, three, WEIGHTS), deltas(llama_base, tmp_path / "out")
    by_name = {m.name: m for m in report.modules}
    for name, delta in expected.items():
        k = min(3, by_name[name].original_rank)
        best, best_error = optimal(delta, k)
        assert by_name[name].rank == k
        assert relative_error(got[name], best) < 1e-5, name
        assert by_name[name].relative_error == pytest.approx(relative_error(got[name], delta), abs=1e-6)
        assert by_name[name].relative_error == pytest.approx(best_error, abs=1e-6)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == config["rank_pattern"] and not config["use_rslora"]


def test_budget_spends_no_more_than_given(llama_base, three, tmp_path):
    saved = sum(
        t.numel() for k, t in load_file(three[2] / "adapter_model.safetensors").items() if "lora_" not in k
    )
    report = combine_adapters(
        CombineRequest(three, tmp_path / "out", weights=WEIGHTS, policy=Policy(budget=saved + 2000))
    )
    assert saved < report.totals["params"] <= saved + 2000
    load_with_peft(llama_base, tmp_path / "out")


def test_lora_biases_add_up_with_their_weights_and_scales(tmp_path):
    base = make_llama(tmp_path / "base", attention_bias=True)
    a = make_adapter(
        base, tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_bias=True, seed=1
    )
    b = make_adapter(
        base,
        tmp_path / "b",
        target_modules=["q_proj", "k_proj"],
        r=2,
        lora_alpha=6,
        lora_bias=True,
        use_rslora=True,
        seed=2,
    )
    c = make_adapter(
        base, tmp_path / "c", target_modules=["o_proj"], r=2, lora_alpha=2, seed=3
    )  # no lora_bias
    weights = [0.3, 1.5, -0.5]
    with pytest.raises(LoraSurgeryError, match="pass --base BASE"):  # does o_proj have a bias of its own?
        combine_adapters(CombineRequest([a, b, c], tmp_path / "out", weights=weights, exact=True))
    combine_adapters(
        CombineRequest([a, b, c], tmp_path / "out", weights=weights, exact=True, dtype="fp32", base=base)
    )
    load_with_peft(base, tmp_path / "out")
    ours = peft_merged_state_dict(base, [tmp_path / "out"])
    theirs = peft_merged_state_dict(base, [a, b, c], weights=weights)
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not written["base_model.model.model.layers.0.self_attn.o_proj.lora_B.bias"].any()


def test_dora_inputs_enter_as_their_effective_update(llama_base, llama_dora, llama_lora_qv, tmp_path):
    with pytest.raises(LoraSurgeryError, match="DoRA needs --base"):
        combine_adapters(CombineRequest([llama_dora, llama_lora_qv], tmp_path / "none", exact=True))
    combine_adapters(
        CombineRequest(
            [llama_dora, llama_lora_qv], tmp_path / "out", weights=[0.5, 2.0], exact=True, base=llama_base
        )
    )
    load_with_peft(llama_base, tmp_path / "out")
    expected = weighted_sum(llama_base, [llama_dora, llama_lora_qv], [0.5, 2.0])
    got = deltas(llama_base, tmp_path / "out")
    for name, delta in expected.items():
        assert relative_error(got[name], delta) < 1e-5, name


def test_identical_saved_tensors_are_written_once_and_different_ones_refused(llama_base, three, tmp_path):
    other = make_adapter(
        llama_base, tmp_path / "d", target_modules=["o_proj"], modules_to_save=["model.norm"], r=2, seed=5
    )
    twin = make_adapter(
        llama_base, tmp_path / "e", target_modules=["o_proj"], modules_to_save=["model.norm"], r=2, seed=6
    )
    with pytest.raises(MismatchError, match=r"both save the tensor model\.norm\.weight"):
        combine_adapters(CombineRequest([other, twin], tmp_path / "out", exact=True))
    report = combine_adapters(CombineRequest([three[2], three[2]], tmp_path / "same", exact=True))
    assert report.saved == ["model.embed_tokens.base_layer.weight"]
    load_with_peft(llama_base, tmp_path / "same")


def test_lora_bias_cannot_meet_an_embedding_lora(tmp_path, three):
    base = make_llama(tmp_path / "base", attention_bias=True)
    a = make_adapter(base, tmp_path / "a", target_modules=["q_proj"], r=2, lora_bias=True, seed=1)
    c = make_adapter(base, tmp_path / "c", target_modules=["embed_tokens"], r=2, seed=2)
    with pytest.raises(LoraSurgeryError, match="refuses it on embeddings"):
        combine_adapters(CombineRequest([a, c], tmp_path / "out", exact=True))
    assert not (tmp_path / "out").exists()
