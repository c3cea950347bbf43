"""extract against PEFT: recovering PEFT merges, PEFT round trips, embeddings, 1-D tensors, true errors.

Every adapter written here is loaded by `PeftModel.from_pretrained` with warnings recorded; any
PEFT warning (missing/unexpected keys, tied weights) fails the test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from factories import (
    load_base,
    make_adapter,
    make_llama,
    model_class,
    peft_delta_weights,
    peft_merged_state_dict,
)
from safetensors.torch import load_file, save_file
from surgery_reference import load_with_peft

from lorasurgery.commands.extract.extract import ExtractRequest, Policy, extract_adapter

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------ helpers


def finetune_from_adapter(base: Path, adapter: Path, out: Path, kind: str = "llama") -> Path:
    """A full checkpoint W + ΔW made by PEFT's own merge_and_unload: ΔW is exactly the adapter's."""
    model = load_base(base, kind)
    model.load_state_dict(peft_merged_state_dict(base, [adapter], model_kind=kind))
    model.save_pretrained(out)
    return out


def finetune_with(base: Path, out: Path, change) -> Path:
    """A copy of `base` whose tensors are change(name, tensor) (same names, shapes, config)."""
    tensors = load_file(base / "model.safetensors")
    changed = {name: change(name, tensor.clone()) for name, tensor in tensors.items()}
    out.mkdir(parents=True)
    save_file(changed, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def low_rank(d: int, n: int, r: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d, r, generator=g) @ torch.randn(r, n, generator=g) / math.sqrt(r)


def logits(model, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(base: Path, adapter: Path, finetuned: Path, kind: str = "llama", atol: float = 1e-5):
    ours = logits(load_with_peft(base, adapter, kind))
    expected = logits(model_class(kind).from_pretrained(finetuned).eval())
    assert torch.allclose(ours, expected, atol=atol), float((ours - expected).abs().max())


def adapter_files(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "adapter_config.json").read_text()), load_file(out / "adapter_model.safetensors")


# ------------------------------------------------------------------------------- PEFT merges, PEFT


@pytest.fixture(scope="module")
def llama_merge(llama_base, tmp_path_factory):
    """A PEFT adapter with mixed ranks (rank_pattern) and the full fine-tune PEFT merges from it."""
    root = tmp_path_factory.mktemp("llama_merge")
    adapter = make_adapter(
        llama_base,
        root / "adapter",
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    return adapter, finetune_from_adapter(llama_base, adapter, root / "ft")


def test_extracting_a_peft_merge_recovers_the_adapters_delta(llama_base, llama_merge, tmp_path):
    adapter, ft = llama_merge
    report = extract_adapter(ExtractRequest(llama_base, ft, tmp_path / "out", policy=Policy(auto=True)))
    ranks = {m.name: m.rank for m in report.modules}
    expected_deltas, _ = peft_delta_weights(llama_base, adapter)
    assert ranks == {name: (2 if "v_proj" in name else 4) for name in expected_deltas}  # the planted ranks
    config, tensors = adapter_files(tmp_path / "out")
    for name, expected in expected_deltas.items():
        ours = tensors[f"{PREFIX}{name}.lora_B.weight"] @ tensors[f"{PREFIX}{name}.lora_A.weight"]
        # float32 precision: W + ΔW was rounded once when PEFT merged, so ΔW carries eps·|W| noise
        assert torch.allclose(ours, expected, atol=2e-7 * 8, rtol=1e-4), float((ours - expected).abs().max())
    assert report.totals["relative_error"] < 1e-5
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["task_type"] == "CAUSAL_LM"
    assert (
        config["rank_pattern"]
        == config["alpha_pattern"]
        == {f"model.layers.{i}.self_attn.v_proj": 2 for i in (0, 1)}
    )
    assert config["target_modules"] == sorted(expected_deltas, key=lambda n: (n.split(".")[2], n))
    model = load_with_peft(llama_base, tmp_path / "out")
    layers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert set(n.removeprefix(PREFIX) for n in layers) == set(expected_deltas)  # no extra module wrapped
    assert {m.scaling["default"] for m in layers.values()} == {1.0}
    assert {n.removeprefix(PREFIX): m.r["default"] for n, m in layers.items()} == ranks


def test_round_trip_on_llama_reproduces_the_finetune(llama_base, llama_merge, tmp_path):
    _, ft = llama_merge
    extract_adapter(ExtractRequest(llama_base, ft, tmp_path / "out", policy=Policy(rank=4), svd="exact"))
    assert_same_logits(llama_base, tmp_path / "out", ft)


def test_gpt2_conv1d_round_trip_uses_fan_in_fan_out(gpt2_base, tmp_path):
    adapter = make_adapter(
        gpt2_base, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_fc"], r=3
    )
    ft = finetune_from_adapter(gpt2_base, adapter, tmp_path / "ft", kind="gpt2")
    report = extract_adapter(
        ExtractRequest(gpt2_base, ft, tmp_path / "out", policy=Policy(rank=3), include=r"c_attn|c_fc")
    )
    assert {m.rank for m in report.modules} == {3} and report.totals["relative_error"] < 1e-5
    config, tensors = adapter_files(tmp_path / "out")
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    A = tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_A.weight"]
    B = tensors[f"{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"]
    assert A.shape == (3, 32) and B.shape == (96, 3)  # PEFT's (r, in) and (out, r); the weight is (in, out)
    deltas, _ = peft_delta_weights(gpt2_base, adapter, model_kind="gpt2")
    assert torch.allclose((B @ A).T, deltas["transformer.h.0.attn.c_attn"], atol=2e-6)
    assert_same_logits(gpt2_base, tmp_path / "out", ft, kind="gpt2")


def test_report_errors_are_the_true_errors_of_the_written_adapter(llama_base, tmp_path):
    """Dense ΔW (not low rank), bf16 output: each reported error equals ‖ΔW − BA‖/‖ΔW‖ computed here
    from the written file, and sits within 1% (plus bf16 rounding) of the Eckart–Young optimum."""
    ft = finetune_with(
        llama_base, tmp_path / "ft", lambda n, t: t + 0.01 * torch.randn_like(t) if t.dim() == 2 else t
    )
    report = extract_adapter(
        ExtractRequest(llama_base, ft, tmp_path / "out", policy=Policy(rank=3), dtype="bf16")
    )
    _, written = adapter_files(tmp_path / "out")
    base_t, ft_t = load_file(llama_base / "model.safetensors"), load_file(ft / "model.safetensors")
    total_err = total = 0.0
    for module in report.modules:
        delta = (ft_t[module.name + ".weight"] - base_t[module.name + ".weight"]).double()
        A = written[f"{PREFIX}{module.name}.lora_A.weight"]
        B = written[f"{PREFIX}{module.name}.lora_B.weight"]
        assert A.dtype == B.dtype == torch.bfloat16
        err = float(torch.linalg.norm(delta - B.double() @ A.double()))
        assert module.relative_error == pytest.approx(err / float(delta.norm()), rel=1e-5)
        assert module.retained_energy == pytest.approx(1 - (err / float(delta.norm())) ** 2, rel=1e-5)
        S = torch.linalg.svdvals(delta)
        optimum = float(S[3:].norm() / S.norm())
        assert optimum < module.relative_error <= 1.01 * optimum + 4e-3  # bf16 rounding on top
        total_err += err**2
        total += float(delta.norm()) ** 2
    assert report.totals["relative_error"] == pytest.approx(math.sqrt(total_err / total), rel=1e-5)
    assert report.totals["params"] == sum(t.numel() for t in written.values())
    assert report.totals["bytes"] == 2 * report.totals["params"]


@pytest.mark.parametrize("svd", ["exact", "randomized", "auto"])
def test_every_module_is_within_one_percent_of_the_optimum(tmp_path, svd):
    """Matrices large enough for the randomized route (min side ≥ 512), spectra decaying slowly."""
    g = torch.Generator().manual_seed(3)
    base, ft = {}, {}
    for i, (d, n) in enumerate([(512, 1024), (768, 512)]):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        base[name] = torch.randn(d, n, generator=g) * 0.02
        U, _ = torch.linalg.qr(torch.randn(d, min(d, n), generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, min(d, n), generator=g))
        S = torch.arange(1, min(d, n) + 1, dtype=torch.float32) ** -0.3  # slow decay: hard for sketches
        ft[name] = base[name] + 0.01 * (U * S) @ V.T
    for folder, tensors in (("base", base), ("ft", ft)):
        (tmp_path / folder).mkdir()
        save_file(tensors, tmp_path / folder / "model.safetensors")
        (tmp_path / folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    report = extract_adapter(
        ExtractRequest(tmp_path / "base", tmp_path / "ft", tmp_path / "out", policy=Policy(rank=24), svd=svd)
    )
    for module in report.modules:
        delta = (ft[module.name + ".weight"] - base[module.name + ".weight"]).double()
        S = torch.linalg.svdvals(delta)
        optimum = float(S[24:].norm() / S.norm())
        assert module.relative_error <= 1.01 * optimum, (module.name, module.relative_error / optimum)


# -------------------------------------------------------------------------------------- embeddings


def test_untied_embeddings_as_lora(llama_base, tmp_path):
    def change(name, t):
        if name == "model.embed_tokens.weight":
            return t + low_rank(128, 32, 3, seed=1)
        if name == "lm_head.weight":
            return t + low_rank(128, 32, 2, seed=2)
        return t + low_rank(*t.shape, 2, seed=3) if name.endswith("q_proj.weight") else t

    ft = finetune_with(llama_base, tmp_path / "ft", change)
    skipped = extract_adapter(ExtractRequest(llama_base, ft, tmp_path / "skip", policy=Policy(auto=True)))
    assert {s.name for s in skipped.skipped} == {"model.embed_tokens", "lm_head"}
    assert any("--embeddings lora" in note for note in skipped.notes)
    report = extract_adapter(
        ExtractRequest(llama_base, ft, tmp_path / "out", policy=Policy(auto=True), embeddings="lora")
    )
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["model.embed_tokens"] == 3 and ranks["lm_head"] == 2 and not report.skipped
    config, tensors = adapter_files(tmp_path / "out")
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (3, 128)  # (r, vocab)
    assert tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (32, 3)  # (dim, r)
    assert tensors[f"{PREFIX}lm_head.lora_A.weight"].shape == (2, 32)
    assert config["ensure_weight_tying"] is False
    assert_same_logits(llama_base, tmp_path / "out", ft)


def test_tied_embeddings_as_lora_give_lm_head_the_same_factors(llama_base_tied, tmp_path):
    ft = finetune_with(
        llama_base_tied,
        tmp_path / "ft",
        lambda n, t: t + low_rank(128, 32, 3, seed=4) if n == "model.embed_tokens.weight" else t,
    )
    report = extract_adapter(
        ExtractRequest(llama_base_tied, ft, tmp_path / "out", policy=Policy(rank=3), embeddings="lora")
    )
    config, tensors = adapter_files(tmp_path / "out")
    A_emb = tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"]
    B_emb = tensors[f"{PREFIX}model.embed_tokens.lora_embedding_B"]
    # PEFT's own layout for a tied lm_head (ensure_weight_tying shares exactly these numbers)
    assert torch.equal(tensors[f"{PREFIX}lm_head.lora_B.weight"], A_emb.T)
    assert torch.equal(tensors[f"{PREFIX}lm_head.lora_A.weight"], B_emb.T)
    assert {m.name: m.kind for m in report.modules} == {"model.embed_tokens": "embedding", "lm_head": "tied"}
    assert report.totals["params"] == 2 * 3 * (128 + 32)
    assert config["ensure_weight_tying"] is True and {"model.embed_tokens", "lm_head"} == set(
        config["target_modules"]
    )
    assert any("tied" in n for n in report.notes)
    assert_same_logits(llama_base_tied, tmp_path / "out", ft)  # the output side too


def embeddings_and_q_proj(name: str, t: torch.Tensor) -> torch.Tensor:
    """Dense changes to the embedding matrices (not low rank: full is their right mode), low rank to q_proj."""
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name)))
    return t + low_rank(*t.shape, 2, seed=8) if "q_proj" in name else t


def test_embeddings_full_untied_saves_modules_to_save(llama_base, tmp_path):
    ft = finetune_with(
        llama_base,
        tmp_path / "ft",
        embeddings_and_q_proj,
    )
    report = extract_adapter(
        ExtractRequest(
            llama_base, ft, tmp_path / "out", policy=Policy(rank=2), embeddings="full", include="q_proj"
        )
    )
    config, tensors = adapter_files(tmp_path / "out")
    assert config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert {k for k in tensors if "lm_head" in k or "embed" in k} == {
        f"{PREFIX}model.embed_tokens.weight",
        f"{PREFIX}lm_head.weight",
    }
    assert report.saved == ["lm_head", "model.embed_tokens"]
    assert_same_logits(llama_base, tmp_path / "out", ft)


def test_embeddings_full_tied_ties_lm_head_to_the_saved_matrix(llama_base_tied, tmp_path):
    ft = finetune_with(
        llama_base_tied,
        tmp_path / "ft",
        embeddings_and_q_proj,
    )
    extract_adapter(
        ExtractRequest(
            llama_base_tied, ft, tmp_path / "out", policy=Policy(rank=2), embeddings="full", include="q_proj"
        )
    )
    config, tensors = adapter_files(tmp_path / "out")
    assert config["modules_to_save"] == ["model.embed_tokens"] and config["ensure_weight_tying"] is True
    # PEFT's loader needs the tied copy under lm_head's key too (its own save writes both)
    assert {k for k in tensors if "lm_head" in k or "embed" in k} == {
        f"{PREFIX}model.embed_tokens.weight",
        f"{PREFIX}lm_head.weight",
    }
    assert torch.equal(tensors[f"{PREFIX}lm_head.weight"], tensors[f"{PREFIX}model.embed_tokens.weight"])
    assert_same_logits(llama_base_tied, tmp_path / "out", ft)  # lm_head follows the saved copy


def test_resized_vocabulary_with_embeddings_full_is_saved_whole(tmp_path):
    base = make_llama(tmp_path / "base")
    ft = make_llama(tmp_path / "ft", vocab_size=136)  # different weights, 8 new tokens
    report = extract_adapter(
        ExtractRequest(base, ft, tmp_path / "out", policy=Policy(rank=2), embeddings="full")
    )
    config, tensors = adapter_files(tmp_path / "out")
    assert tensors[f"{PREFIX}model.embed_tokens.weight"].shape == (136, 32)
    assert tensors[f"{PREFIX}lm_head.weight"].shape == (136, 32)
    assert set(config["modules_to_save"]) == {"model.embed_tokens", "lm_head"}
    assert {"model.embed_tokens", "lm_head"} <= set(report.saved)


# ------------------------------------------------------------------------------------ 1-D tensors


def test_save_1d_on_llama_puts_changed_norms_into_modules_to_save(llama_base, tmp_path):
    def change(name, t):
        if t.dim() == 1 and "layers.1" in name:
            return t + 0.05
        return t + low_rank(*t.shape, 2, seed=5) if name.endswith("o_proj.weight") else t

    ft = finetune_with(llama_base, tmp_path / "ft", change)
    plain = extract_adapter(ExtractRequest(llama_base, ft, tmp_path / "plain", policy=Policy(rank=2)))
    assert {s.name for s in plain.skipped} == {
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    }
    assert all("--save-1d" in s.reason for s in plain.skipped)
    report = extract_adapter(
        ExtractRequest(llama_base, ft, tmp_path / "out", policy=Policy(rank=2), save_1d=True)
    )
    config, tensors = adapter_files(tmp_path / "out")
    assert config["modules_to_save"] == [
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]
    assert f"{PREFIX}model.layers.1.input_layernorm.weight" in tensors and not report.skipped
    assert_same_logits(llama_base, tmp_path / "out", ft)


def test_save_1d_on_gpt2_saves_lora_layer_biases_as_peft_does(gpt2_base, tmp_path):
    def change(name, t):
        if (
            name.endswith("attn.c_attn.bias")
            or name.endswith("ln_2.weight")
            or name.endswith("mlp.c_fc.bias")
        ):
            return t + 0.03
        if name.endswith("attn.c_attn.weight"):  # Conv1D (in, out)
            return t + low_rank(*t.shape, 2, seed=6)
        return t

    ft = finetune_with(gpt2_base, tmp_path / "ft", change)
    report = extract_adapter(
        ExtractRequest(gpt2_base, ft, tmp_path / "out", policy=Policy(rank=2), include="c_attn", save_1d=True)
    )
    config, tensors = adapter_files(tmp_path / "out")
    assert config["bias"] == "lora_only"
    assert f"{PREFIX}transformer.h.0.attn.c_attn.base_layer.bias" in tensors  # PEFT's own key for it
    assert config["modules_to_save"] == ["transformer.h.0.ln_2", "transformer.h.1.ln_2"]
    # c_fc is not in the adapter: its bias alone cannot be saved without its whole weight
    assert {s.name for s in report.skipped} == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    assert all("not in the adapter" in s.reason for s in report.skipped)
    # with c_fc's bias back to the base's, the adapter reproduces the fine-tune exactly
    reference = finetune_with(
        gpt2_base, tmp_path / "reference", lambda n, t: t if n.endswith("c_fc.bias") else change(n, t)
    )
    assert_same_logits(gpt2_base, tmp_path / "out", reference, kind="gpt2")


# -------------------------------------------------------------------------------------------- budget


def test_budget_is_respected_and_finds_the_planted_ranks(llama_base, llama_merge, tmp_path):
    _, ft = llama_merge
    tight = extract_adapter(ExtractRequest(llama_base, ft, tmp_path / "tight", policy=Policy(budget=700)))
    assert tight.totals["params"] <= 700
    assert sum(m.params for m in tight.modules) == tight.totals["params"]
    generous = extract_adapter(
        ExtractRequest(llama_base, ft, tmp_path / "generous", policy=Policy(budget=100_000))
    )
    assert {m.name: m.rank for m in generous.modules} == {
        f"model.layers.{i}.{m}": (2 if m == "self_attn.v_proj" else 4)
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }  # rounding noise gets no budget
    assert_same_logits(llama_base, tmp_path / "generous", ft)


def test_budget_pays_for_the_tied_lm_head_copy(llama_base_tied, tmp_path):
    ft = finetune_with(
        llama_base_tied,
        tmp_path / "ft",
        lambda n, t: (
            t + low_rank(*t.shape, 3, seed=7, scale=0.2)
            if n.endswith("embed_tokens.weight") or "q_proj" in n
            else t
        ),
    )
    for budget in (300, 700, 1500):
        report = extract_adapter(
            ExtractRequest(
                llama_base_tied, ft, tmp_path / f"b{budget}", policy=Policy(budget=budget), embeddings="lora"
            )
        )
        assert report.totals["params"] <= budget, (budget, report.totals["params"])
    load_with_peft(llama_base_tied, tmp_path / "b1500")
