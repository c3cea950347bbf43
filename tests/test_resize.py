"""`resize` against float64 dense references and PEFT: the optimal rank-k update of every module
(Eckart–Young), the joint budget, honest errors after the cast, layouts (embedding, Conv1D), lora_bias,
saved tensors, DoRA → LoRA; every output reloaded by `PeftModel.from_pretrained` with warnings checked."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from factories import make_adapter, make_llama, peft_merged_state_dict, relative_error
from safetensors.torch import load_file
from surgery_reference import deltas, load_with_peft, optimal

from lorasurgery.commands.surgery.resize import ResizeRequest, resize_adapter
from lorasurgery.errors import UnsupportedError
from lorasurgery.factored import module_svd, truncated_factors
from lorasurgery.linalg.lowrank import factors_error, lowrank_svd
from lorasurgery.linalg.policies import Policy


@pytest.fixture(scope="module")
def bias_base(tmp_path_factory):
    """Tiny Llama with q/k/v/o biases (lora_bias needs them)."""
    return make_llama(tmp_path_factory.mktemp("bias_base"), attention_bias=True)


@pytest.fixture(scope="module")
def rich(llama_base, tmp_path_factory):
    """rsLoRA r = 8 with patterns, on attention, MLP, the input embedding and lm_head."""
    return make_adapter(
        llama_base,
        tmp_path_factory.mktemp("rich"),
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"],
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"v_proj": 6, "down_proj": 4},
        alpha_pattern={"v_proj": 3},
        seed=3,
    )


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncated_factors_are_optimal_and_their_error_is_that_of_the_cast_factors(dtype, k):
    g = torch.Generator().manual_seed(k)
    A, B = torch.randn(6, 40, generator=g), torch.randn(24, 6, generator=g)
    dense = 0.7 * B.double() @ A.double()
    best, best_error = optimal(dense, k)
    A2, B2, error = truncated_factors(lowrank_svd(A, B, 0.7), k, dtype)
    assert A2.dtype == B2.dtype == dtype and A2.shape == (k, 40) and B2.shape == (24, k)
    written = B2.double() @ A2.double()
    assert error == pytest.approx(relative_error(written, dense), rel=1e-9, abs=1e-13)
    assert error >= best_error * (1 - 1e-12)
    cast = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert relative_error(written, best) < cast + 1e-12


def test_factors_error_of_a_concatenation_wider_than_the_matrix():
    g = torch.Generator().manual_seed(0)
    A, B = (
        torch.randn(10, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 10, generator=g, dtype=torch.float64),
    )
    svd = lowrank_svd(A, B)  # Σr = 10 > min(d, n) = 6
    assert svd.U.shape == (6, 6) and svd.Vh.shape == (6, 8)
    assert relative_error((svd.U * svd.S) @ svd.Vh, B @ A) < 1e-13
    assert factors_error(svd, A, B) < 1e-13
    assert factors_error(svd, A.float(), B.float()) == pytest.approx(
        relative_error(B.float().double() @ A.float().double(), B @ A), rel=1e-6
    )


# ----------------------------------------------------------------------------------- against PEFT


def test_resize_to_rank_k_gives_every_module_its_optimal_update(llama_base, rich, tmp_path):
    report = resize_adapter(ResizeRequest(rich, tmp_path / "out", policy=Policy(rank=3)))
    load_with_peft(llama_base, tmp_path / "out")
    before, after = deltas(llama_base, rich), deltas(llama_base, tmp_path / "out")
    assert set(after) == set(before) and len(before) == 10
    by_name = {m.name: m for m in report.modules}
    for name, delta in before.items():
        best, best_error = optimal(delta, 3)
        assert relative_error(after[name], best) < 1e-5, name
        assert by_name[name].rank == 3 and by_name[name].original_rank in (4, 6, 8)
        assert by_name[name].relative_error == pytest.approx(relative_error(after[name], delta), abs=1e-6)
        assert by_name[name].relative_error == pytest.approx(best_error, abs=1e-6)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (
        config["r"] == config["lora_alpha"] == 3 and not config["use_rslora"] and not config["rank_pattern"]
    )
    assert by_name["model.embed_tokens"].kind == "embedding"


def test_resize_with_a_rank_above_some_modules_keeps_them_whole(llama_base, rich, tmp_path):
    report = resize_adapter(ResizeRequest(rich, tmp_path / "out", policy=Policy(rank=6), dtype="fp32"))
    load_with_peft(llama_base, tmp_path / "out")
    before, after = deltas(llama_base, rich), deltas(llama_base, tmp_path / "out")
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["model.layers.0.mlp.down_proj"] == 4 and ranks["model.layers.0.self_attn.q_proj"] == 6
    for name, delta in before.items():
        assert relative_error(after[name], optimal(delta, ranks[name])[0]) < 1e-5, name
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {m: 4 for m in ranks if "down_proj" in m} == config["alpha_pattern"]


# Planted spectra (scale 1): the ranks and errors each policy must give, worked out by hand.
# energy 0.8 (smallest k with Σ_{i≤k} σᵢ² ≥ 0.8·Σσ²), ratio 0.2 (count of σᵢ ≥ 0.2·σ₁):
#   [8, 4, 2, 1, .5, .25]        σ² = 64, 16, 4, 1, .25, .0625 (Σ 85.3125): 64 < 68.25 ≤ 80 → 2; σ ≥ 1.6 → 3
#   [3, 2.9, 2.8, .1, .05, .01]  σ² = 9, 8.41, 7.84, … (Σ 25.2626): 17.41 < 20.21 ≤ 25.25 → 3; σ ≥ 0.6 → 3
#   [5, .1, .05, .02, .01, .005] σ² = 25, .01, … (Σ 25.013): 25 ≥ 20.01 → 1; σ ≥ 1 → 1
PLANTED = {
    "model.layers.0.self_attn.q_proj": [8, 4, 2, 1, 0.5, 0.25],
    "model.layers.0.self_attn.v_proj": [3, 2.9, 2.8, 0.1, 0.05, 0.01],
    "model.layers.1.self_attn.q_proj": [5, 0.1, 0.05, 0.02, 0.01, 0.005],
    "model.layers.1.self_attn.v_proj": [8, 4, 2, 1, 0.5, 0.25],
}
PLANTED_RANKS = {  # policy -> ranks in PLANTED's order
    "energy": [2, 3, 1, 2],
    "ratio": [3, 3, 1, 3],
}


@pytest.fixture(scope="module")
def planted(llama_base, tmp_path_factory):
    """A PEFT-made r = 6, alpha = 6 adapter on q/v whose factors are replaced by B = U·diag(σ), A = Vᵀ
    (U, V orthonormal): each ΔW has exactly the singular values PLANTED gives it."""
    from safetensors.torch import save_file

    folder = make_adapter(
        llama_base, tmp_path_factory.mktemp("planted"), target_modules=["q_proj", "v_proj"], r=6, lora_alpha=6
    )
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(11)
    for name, sigma in PLANTED.items():
        key = f"base_model.model.{name}"
        (k, n), (d, _) = tensors[f"{key}.lora_A.weight"].shape, tensors[f"{key}.lora_B.weight"].shape
        U = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
        tensors[f"{key}.lora_B.weight"] = (U * torch.tensor(sigma, dtype=torch.float64)).float().contiguous()
        tensors[f"{key}.lora_A.weight"] = V.T.float().contiguous()
    save_file(tensors, path)
    return folder


def test_per_module_policies_choose_the_ranks_of_the_planted_spectra(llama_base, planted, rich, tmp_path):
    before = deltas(llama_base, planted)
    for name, sigma in PLANTED.items():  # the planting worked: PEFT's ΔW has those singular values
        assert torch.allclose(torch.linalg.svdvals(before[name])[:6], torch.tensor(sigma).double(), rtol=1e-5)
    for policy, key in ((Policy(energy=0.8), "energy"), (Policy(ratio=0.2), "ratio")):
        report = resize_adapter(ResizeRequest(planted, tmp_path / "out", policy=policy, force=True))
        by_name = {m.name: m for m in report.modules}
        for (name, sigma), k in zip(PLANTED.items(), PLANTED_RANKS[key]):
            assert by_name[name].rank == k, (key, name)
            tail = sum(s * s for s in sigma[k:]) / sum(s * s for s in sigma)
            assert by_name[name].relative_error == pytest.approx(tail**0.5, rel=1e-4, abs=1e-6), (key, name)
    report = resize_adapter(ResizeRequest(rich, tmp_path / "out", policy=Policy(auto=True), force=True))
    # A rank-r product has r nonzero σ and min(d, n) − r exact zeros: Gavish–Donoho's median is 0,
    # so --auto keeps every numerically nonzero direction.
    assert all(m.rank == m.original_rank for m in report.modules)


def test_budget_is_within_one_sigma_squared_of_the_brute_force_optimum(llama_base, llama_lora_qv, tmp_path):
    before = deltas(llama_base, llama_lora_qv)
    names = sorted(before)
    spectra = {n: torch.linalg.svdvals(before[n]).square()[:4] for n in names}
    cost = {n: sum(before[n].shape) for n in names}
    budget = 500
    report = resize_adapter(ResizeRequest(llama_lora_qv, tmp_path / "out", policy=Policy(budget=budget)))
    ranks = {m.name: m.rank for m in report.modules}
    spent = sum(ranks.get(n, 0) * cost[n] for n in names)
    assert spent <= budget and report.totals["params"] == spent
    energy = sum(float(spectra[n][: ranks.get(n, 0)].sum()) for n in names)
    best = max(
        sum(float(spectra[n][:k].sum()) for n, k in zip(names, combo))
        for combo in itertools.product(range(5), repeat=len(names))
        if sum(k * cost[n] for n, k in zip(names, combo)) <= budget
    )
    largest_skipped = max(float(spectra[n][ranks.get(n, 0)]) for n in names if ranks.get(n, 0) < 4)
    assert best - largest_skipped <= energy <= best * (1 + 1e-12)
    total = sum(float(s.sum()) for s in spectra.values())
    assert report.totals["relative_error"] == pytest.approx(((total - energy) / total) ** 0.5, rel=1e-5)
    load_with_peft(llama_base, tmp_path / "out")


def test_gpt2_conv1d_layout_comes_back_as_peft_applies_it(gpt2_base, gpt2_lora, tmp_path):
    report = resize_adapter(ResizeRequest(gpt2_lora, tmp_path / "out", policy=Policy(rank=2)))
    load_with_peft(gpt2_base, tmp_path / "out", "gpt2")
    before, after = deltas(gpt2_base, gpt2_lora, "gpt2"), deltas(gpt2_base, tmp_path / "out", "gpt2")
    assert len(report.modules) == len(before) == 4
    for name, delta in before.items():
        assert delta.shape[0] != delta.shape[1]  # (in, out) of a Conv1D, as PEFT returns it
        assert relative_error(after[name], optimal(delta, 2)[0]) < 1e-5, name
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_lora_bias_and_saved_tensors_are_carried(bias_base, tmp_path):
    adapter = make_adapter(
        bias_base,
        tmp_path / "bias",
        target_modules=["q_proj", "k_proj"],
        r=4,
        lora_alpha=12,
        lora_bias=True,
        modules_to_save=["model.norm"],
        seed=4,
    )
    resize_adapter(ResizeRequest(adapter, tmp_path / "out", policy=Policy(rank=4), dtype="fp32"))
    load_with_peft(bias_base, tmp_path / "out")
    expected = peft_merged_state_dict(bias_base, [adapter])
    merged = peft_merged_state_dict(bias_base, [tmp_path / "out"])
    for name in expected:
        assert torch.allclose(merged[name], expected[name], atol=2e-6), name
    source, written = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    saved = [k for k in source if "lora_" not in k]
    assert saved and all(torch.equal(written[k], source[k]) for k in saved)


def test_dora_becomes_a_plain_lora_of_its_effective_update(llama_base, llama_dora, tmp_path):
    with pytest.raises(UnsupportedError, match="DoRA needs --base"):
        resize_adapter(ResizeRequest(llama_dora, tmp_path / "none", policy=Policy(rank=2)))
    assert not (tmp_path / "none").exists()
    effective = deltas(llama_base, llama_dora)
    report = resize_adapter(
        ResizeRequest(llama_dora, tmp_path / "out", policy=Policy(rank=3), base=llama_base)
    )
    load_with_peft(llama_base, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["use_dora"] is False
    after = deltas(llama_base, tmp_path / "out")
    by_name = {m.name: m for m in report.modules}
    for name, delta in effective.items():
        best, best_error = optimal(delta, 3)
        assert relative_error(after[name], best) < 1e-4, name
        assert by_name[name].relative_error == pytest.approx(best_error, abs=1e-5)
    svd = module_svd(llama_dora, "model.layers.0.self_attn.q_proj", base=llama_base)
    assert relative_error((svd.U * svd.S) @ svd.Vh, effective["model.layers.0.self_attn.q_proj"]) < 1e-5


@pytest.mark.parametrize("flag", [True, False])
def test_gpt2_dora_layout_comes_from_the_model_not_the_adapters_flag(gpt2_base, tmp_path, flag):
    dora = make_adapter(
        gpt2_base, tmp_path / "dora", model_kind="gpt2", target_modules=["c_attn"], r=4, use_dora=True, seed=7
    )
    effective = deltas(gpt2_base, dora, "gpt2")  # (in, out): Conv1D as stored
    config_file = dora / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["fan_in_fan_out"] = flag  # PEFT saves it from its last-created layer: only a hint
    config_file.write_text(json.dumps(config))
    report = resize_adapter(ResizeRequest(dora, tmp_path / "out", policy=Policy(rank=6), base=gpt2_base))
    load_with_peft(gpt2_base, tmp_path / "out", "gpt2")
    after = deltas(gpt2_base, tmp_path / "out", "gpt2")
    by_name = {m.name: m for m in report.modules}
    for name, delta in effective.items():
        best, best_error = optimal(delta, 6)
        assert relative_error(after[name], best) < 1e-4, name
        assert by_name[name].relative_error == pytest.approx(best_error, abs=1e-5)


def test_conv2d_lora_is_resized_in_its_flattened_layout(tmp_path):
    """PEFT's Conv2d LoRA: lora_A a (r, in, kh, kw) conv, lora_B a 1×1 (out, r) conv; ΔW (out, in·kh·kw)."""
    import peft

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    wrapped = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["conv"], r=4, lora_alpha=8))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    with torch.no_grad():
        expected = wrapped.base_model.model.conv.get_delta_weight("default").double().flatten(1)  # (8, 27)
    wrapped.save_pretrained(tmp_path / "conv")
    report = resize_adapter(
        ResizeRequest(tmp_path / "conv", tmp_path / "out", policy=Policy(rank=2), dtype="fp32")
    )
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Net(), str(tmp_path / "out"))
    with torch.no_grad():
        got = loaded.base_model.model.conv.get_delta_weight("default").double().flatten(1)
    best, best_error = optimal(expected, 2)
    assert relative_error(got, best) < 1e-5
    assert report.modules[0].kind == "conv" and report.modules[0].relative_error == pytest.approx(
        best_error, abs=1e-6
    )
