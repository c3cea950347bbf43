"""`export --for peft` of MoE expert LoRA on tiny real Qwen3-MoE, Mixtral and gpt-oss (docs/export.md,
"MoE experts"): per-expert adapters (made by PEFT on the transformers-4.x-style twin, every factor
randomised) become target_parameters on the fused parameters that PEFT loads on the transformers-5
model without a missing or unexpected key, and whose forward equals PEFT's per-expert adapter on the
twin; round trips are bit-identical; what a target cannot carry is refused through the CLI."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import MOE_KINDS, MOE_NAMES, per_expert_twin, randomize_adapter, relative_error, tiny_moe
from safetensors.torch import load_file

from lorasurgery.adapter.experts import FusedFactors, PartFactors, fuse, split

EXPERTS = {"qwen2-moe": 4, "qwen3-moe": 4, "mixtral": 3, "gpt-oss": 4}  # tiny_moe's expert counts
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _save_base(model, folder):
    model.save_pretrained(folder)
    return folder


def _per_expert_adapter(kind, twin, folder, seed=1, **lora):
    """A PEFT adapter of the per-expert twin on attention and every expert projection, all factors drawn."""
    torch.manual_seed(seed)
    targets = ["q_proj", "v_proj", *MOE_NAMES[kind]]
    config = peft.LoraConfig(target_modules=targets, **{"r": 4, "lora_alpha": 8, **lora})
    wrapped = peft.get_peft_model(twin, config)
    randomize_adapter(wrapped, seed=seed, a_std=0.2)
    wrapped.save_pretrained(folder)
    return wrapped.eval()


def _fused_adapter(model, folder, seed=2):
    """A PEFT target_parameters adapter of the transformers-5 model on both fused parameters."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        r=3,
        lora_alpha=6,
    )
    wrapped = peft.get_peft_model(model, config)
    randomize_adapter(wrapped, seed=seed, a_std=0.2)
    wrapped.save_pretrained(folder)
    return wrapped.eval()


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _load_exported(kind, folder):
    """The export loaded by PEFT on a fresh transformers-5 model: (PeftModel, missing, unexpected)."""
    model = tiny_moe(kind)
    config = peft.LoraConfig.from_pretrained(folder)
    wrapped = peft.get_peft_model(model, config)
    result = peft.set_peft_model_state_dict(wrapped, load_file(folder / "adapter_model.safetensors"))
    lora = {k for k, _ in wrapped.named_parameters() if "lora_" in k}
    missing = sorted(k for k in result.missing_keys if k in lora)
    return wrapped.eval(), missing, sorted(result.unexpected_keys)


@pytest.fixture(scope="module", params=MOE_KINDS)
def case(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = tiny_moe(kind)
    base = _save_base(model, root / "base")
    twin = per_expert_twin(model, kind)
    reference = _per_expert_adapter(kind, twin, root / "per-expert")
    return {"kind": kind, "root": root, "base": base, "adapter": root / "per-expert", "reference": reference}


def test_per_expert_to_fused_loads_in_peft_and_computes_the_same(case, tmp_path):
    out = tmp_path / "fused"
    result = run_cli("export", case["adapter"], "--for", "peft", "--base", case["base"], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]
    rows = {m["name"]: m for m in report["modules"]}
    # gate and up were trained with different lora_A: the fused rank is r_gate + r_up, said
    assert rows["model.layers.0.mlp.experts.gate_up_proj"]["rank_out"] == 8
    assert rows["model.layers.0.mlp.experts.down_proj"]["rank_out"] == 4
    assert any("r_gate + r_up" in note for note in report["notes"])
    assert report["max_relative_error"] == 0.0  # stacked and copied, nothing rounded
    exported, missing, unexpected = _load_exported(case["kind"], out)
    assert missing == [] and unexpected == []
    expected, base = _logits(case["reference"]), _logits(tiny_moe(case["kind"]))
    got = _logits(exported)
    assert relative_error(got - base, expected - base) < 1e-5
    assert relative_error(expected, base) > 1e-3  # the adapter does something


def test_round_trip_per_expert_fused_per_expert_is_bit_identical(case, tmp_path):
    out = tmp_path / "fused"
    assert (
        run_cli("export", case["adapter"], "--for", "peft", "--base", case["base"], "-o", out).exit_code == 0
    )
    source, fused = (
        load_file(case["adapter"] / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    gate, up, down = MOE_NAMES[case["kind"]]
    interleaved = case["kind"] == "gpt-oss"
    prefix = "base_model.model.model.layers.0.mlp.experts"
    E = sum(1 for k in source if k.endswith(f".{down}.lora_A.weight"))

    def parts_of(name):
        return [
            (source[f"{prefix}.{e}.{name}.lora_A.weight"], source[f"{prefix}.{e}.{name}.lora_B.weight"])
            for e in range(E)
        ]

    for keys, names in ((f"{prefix}.base_layer", (gate, up)), (prefix, (down,))):
        A, B = fused[f"{keys}.lora_A.weight"], fused[f"{keys}.lora_B.weight"]
        back = split(FusedFactors(A, B, A.shape[0] // E, E, 2.0), len(names), interleaved)
        for name, part in zip(names, back):
            for (a, b), a2, b2 in zip(parts_of(name), part.A, part.B):
                assert torch.equal(a, a2) and torch.equal(b, b2)
    # the attention modules are copied byte for byte
    for key, tensor in source.items():
        if "self_attn" in key:
            assert torch.equal(fused[key], tensor)


def test_round_trip_fused_per_expert_fused_is_bit_identical(case, tmp_path):
    kind = case["kind"]
    _fused_adapter(tiny_moe(kind), tmp_path / "fused")
    tensors = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts"
    for keys, parts in ((f"{prefix}.base_layer", 2), (prefix, 1)):
        A, B = tensors[f"{keys}.lora_A.weight"], tensors[f"{keys}.lora_B.weight"]
        E = EXPERTS[kind]
        fused = FusedFactors(A, B, A.shape[0] // E, E, 2.0)
        pieces = split(fused, parts, kind == "gpt-oss")
        assert all(a.shape[0] == fused.rank for p in pieces for a in p.A)  # shared A: each half keeps r
        again = fuse(pieces, kind == "gpt-oss")
        assert torch.equal(again.A, A) and torch.equal(again.B, B) and again.method == "copied"


def test_fused_adapter_exports_with_peft_keys_and_same_forward(case, tmp_path):
    kind = case["kind"]
    reference = _fused_adapter(tiny_moe(kind), tmp_path / "fused")
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "fused", "--for", "peft", "--base", case["base"], "-o", out)
    assert result.exit_code == 0, result.stderr
    source, written = (
        load_file(tmp_path / "fused" / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert sorted(source) == sorted(written)
    assert all(torch.equal(source[k], written[k]) for k in source)
    exported, missing, unexpected = _load_exported(kind, out)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(_logits(exported), _logits(reference), rtol=0, atol=1e-6)


def test_experts_of_different_scales_are_folded_and_reported(tmp_path):
    kind = "qwen3-moe"
    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    twin = per_expert_twin(model, kind)
    pattern = {r"model.layers.0.mlp.experts.1.down_proj": 2}
    reference = _per_expert_adapter(
        kind, twin, tmp_path / "a", rank_pattern=pattern, alpha_pattern={"experts.2.down_proj": 3}
    )
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "a", "--for", "peft", "--base", base, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    rows = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    down = rows["model.layers.0.mlp.experts.down_proj"]
    assert "folded" in down["method"] and "padded" in down["method"] and down["rank_out"] == 4
    assert 0 < down["relative_error"] < 1e-6
    exported, missing, unexpected = _load_exported(kind, out)
    assert missing == [] and unexpected == []
    expected, plain = _logits(reference), _logits(tiny_moe(kind))
    assert relative_error(_logits(exported) - plain, expected - plain) < 1e-5


def test_experts_the_adapter_leaves_out_get_zero_factors(tmp_path):
    """An adapter on some experts only (expert-specialised fine-tuning): the others get ΔW = 0."""
    kind = "mixtral"
    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    twin = per_expert_twin(model, kind)
    torch.manual_seed(3)
    targets = [f"model.layers.0.mlp.experts.0.{n}" for n in MOE_NAMES[kind]]
    wrapped = peft.get_peft_model(twin, peft.LoraConfig(target_modules=targets, r=2, lora_alpha=4))
    randomize_adapter(wrapped, seed=3, a_std=0.2)
    wrapped.save_pretrained(tmp_path / "a")
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "a", "--for", "peft", "--base", base, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert all("zero-filled" in m["method"] for m in json.loads(result.stdout)["modules"])
    exported, missing, unexpected = _load_exported(kind, out)
    assert missing == [] and unexpected == []
    expected, plain = _logits(wrapped.eval()), _logits(tiny_moe(kind))
    assert relative_error(_logits(exported) - plain, expected - plain) < 1e-5


ROLES = ("gate", "up", "down")


def _reference_deltas(kind, wrapped) -> dict:
    """{(expert, role): PEFT's ΔW (out, in)} of a per-expert adapter on the twin or a target_parameters
    one on the transformers-5 model, as the model's forward splits gate_up_proj (Qwen3-MoE, Mixtral:
    chunk(2) of the out axis; gpt-oss: even/odd columns of (E, in, 2I))."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer) or "experts" not in name or "default" not in module.lora_A:
            continue
        with torch.no_grad():
            delta = module.get_delta_weight("default").float()
        leaf = name.rsplit(".", 1)[-1]
        if leaf in MOE_NAMES[kind] and name.split(".")[-2].isdigit():  # per-expert nn.Linear
            deltas[(int(name.split(".")[-2]), ROLES[MOE_NAMES[kind].index(leaf)])] = delta
            continue
        parameter = module.parameter_name
        for e in range(delta.shape[0]):
            d = delta[e].T if kind == "gpt-oss" else delta[e]  # (out, in)
            if parameter == "down_proj":
                deltas[(e, "down")] = d
            elif kind == "gpt-oss":
                deltas[(e, "gate")], deltas[(e, "up")] = d[0::2], d[1::2]
            else:
                deltas[(e, "gate")], deltas[(e, "up")] = d.chunk(2, dim=0)
    return deltas


def _served_deltas(kind, folder, target) -> dict:
    """{(expert, role): ΔW} the target computes from the export, by its own rules (docs/export.md):
    one global scale lora_alpha / r; per-expert modules by name, or vLLM's fused layout
    (`experts.base_layer` = gate_up_proj, `experts` = down_proj; lora_A (E·r, in), lora_B (out, r·E))."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas = {}
    for key, A in tensors.items():
        if "experts" not in key or ".lora_A." not in key:
            continue
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removesuffix(".lora_A.weight")
        leaf = module.rsplit(".", 1)[-1]
        if leaf in MOE_NAMES[kind]:
            deltas[(int(module.split(".")[-2]), ROLES[MOE_NAMES[kind].index(leaf)])] = scale * B @ A
            continue
        E = EXPERTS[kind]
        A3 = A.reshape(E, -1, A.shape[1])
        B3 = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)
        for e in range(E):
            d = scale * B3[e] @ A3[e]
            if leaf == "base_layer":  # gate_up_proj, gpt-oss's gate/up interleaved
                deltas[(e, "gate")], deltas[(e, "up")] = d[0::2], d[1::2]
            else:
                deltas[(e, "down")] = d
    return deltas


def _assert_served_like_peft(kind, out, target, wrapped):
    served, reference = _served_deltas(kind, out, target), _reference_deltas(kind, wrapped)
    assert sorted(served) == sorted(reference)
    for key in reference:
        assert relative_error(served[key], reference[key]) < 1e-6, key


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_serving_exports_of_a_per_expert_adapter_compute_peft_delta(case, target, tmp_path):
    out = tmp_path / "out"
    args = ["export", case["adapter"], "--for", target, "--base", case["base"], "-o", out, "--json"]
    if case["kind"] == "gpt-oss" and target == "sglang":
        assert_refused(args, "interleaved", inputs=[case["adapter"], case["base"]], output=out)
        return
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    if case["kind"] == "gpt-oss":  # vLLM loads gpt-oss's expert LoRA fused (is_3d_moe_weight)
        assert config["target_parameters"] and any(".experts.base_layer.lora_A" in k for k in tensors)
    else:  # one module per expert under the checkpoint's names (Mixtral: block_sparse_moe.experts.{e}.w1)
        stored = load_file(case["base"] / "model.safetensors")
        modules = {
            k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors if "experts" in k
        }
        assert modules and all(f"{m}.weight" in stored for m in modules)
    if target == "sglang":  # one rank for every module
        assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {config["r"]}
    _assert_served_like_peft(case["kind"], out, target, case["reference"])


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_serving_exports_of_a_fused_adapter_compute_peft_delta(case, target, tmp_path):
    kind = case["kind"]
    if kind == "gpt-oss" and target == "sglang":
        pytest.skip("refused (test above)")
    wrapped = _fused_adapter(tiny_moe(kind), tmp_path / "fused")
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "fused", "--for", target, "--base", case["base"], "-o", out)
    assert result.exit_code == 0, result.stderr
    _assert_served_like_peft(kind, out, target, wrapped)


def test_fused_adapter_without_base_is_refused(tmp_path):
    _fused_adapter(tiny_moe("qwen3-moe"), tmp_path / "fused")
    out = tmp_path / "out"
    assert_refused(
        ["export", tmp_path / "fused", "--for", "peft", "-o", out],
        "pass --base BASE",
        inputs=[tmp_path / "fused"],
        output=out,
    )


def test_a_projection_left_out_of_every_expert_is_refused(tmp_path):
    kind = "qwen3-moe"
    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    torch.manual_seed(4)
    wrapped = peft.get_peft_model(
        per_expert_twin(model, kind), peft.LoraConfig(target_modules=["gate_proj"], r=2)
    )
    randomize_adapter(wrapped, seed=4, a_std=0.2)
    wrapped.save_pretrained(tmp_path / "a")
    out = tmp_path / "out"
    assert_refused(
        ["export", tmp_path / "a", "--for", "peft", "--base", base, "-o", out],
        "model.layers.0.mlp.experts.gate_up_proj",
        inputs=[tmp_path / "a", base],
        output=out,
    )


def test_fuse_of_parts_with_one_lora_a_keeps_rank_r():
    """PEFT's fused gate_up LoRA shares one lora_A: splitting and joining keeps it at rank r."""
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(3, 5, generator=g) for _ in range(2)]
    gate = PartFactors(A, [torch.randn(4, 3, generator=g) for _ in range(2)], [2.0, 2.0])
    up = PartFactors([a.clone() for a in A], [torch.randn(4, 3, generator=g) for _ in range(2)], [2.0, 2.0])
    fused = fuse([gate, up], interleaved=True)
    assert fused.rank == 3 and fused.method == "copied"
    for e in range(2):
        delta = fused.B.reshape(8, 3, 2)[:, :, e] @ fused.A.reshape(2, 3, 5)[e]
        assert torch.equal(delta[0::2], gate.B[e] @ A[e]) and torch.equal(delta[1::2], up.B[e] @ A[e])


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral"])
def test_fused_tensors_equal_peft_own_conversion_bit_for_bit(kind, tmp_path):
    """PEFT converts a transformers-4.x per-expert adapter while loading it on a transformers-5 model
    (peft/utils/transformers_weight_conversion.py: block-diagonal gate/up); export writes the same."""
    from peft.utils import get_peft_model_state_dict

    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    _per_expert_adapter(kind, per_expert_twin(model, kind), tmp_path / "a")
    out = tmp_path / "out"
    assert run_cli("export", tmp_path / "a", "--for", "peft", "--base", base, "-o", out).exit_code == 0
    converted = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path / "a")
    theirs = {
        f"base_model.model.{k.removeprefix('base_model.model.')}": v
        for k, v in get_peft_model_state_dict(converted).items()
    }
    ours = load_file(out / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_inspect_for_says_what_export_does_with_the_experts(case):
    kind, adapter, base = case["kind"], case["adapter"], case["base"]

    def inspect(target, folder=adapter):
        result = run_cli("inspect", folder, "--for", target, "--base", base, "--json")
        rule = next(r for r in json.loads(result.stdout)["rules"] if r["id"] == "experts")
        return result.exit_code, rule

    code, rule = inspect("peft")  # per-expert: export fuses it (transformers 5)
    assert (
        code == 3
        and rule["status"] == "fixed"
        and "model.layers.0.mlp.experts.gate_up_proj" in rule["modules"]
    )
    code, rule = inspect("sglang")
    if kind == "gpt-oss":
        assert code == 4 and rule["status"] == "impossible" and "lorasurgery merge" in rule["action"]
    else:  # the twin names Mixtral's experts mlp.experts.{e}.w1, the checkpoint block_sparse_moe…
        assert rule["status"] == ("pass" if kind == "qwen3-moe" else "fixed")


def test_shared_experts_stay_apart_from_routed_ones(tmp_path):
    """Qwen2-MoE: a shared expert (a plain MLP: shared_expert.gate_proj …) beside the routed experts. Its
    LoRA stays three 2-D modules; only the routed experts' become target_parameters. (PEFT 0.21.2's
    own loading of this 4.x adapter on transformers 5 leaves the routed experts' LoRA out.)"""
    kind = "qwen2-moe"
    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    reference = _per_expert_adapter(kind, per_expert_twin(model, kind), tmp_path / "a")
    out = tmp_path / "out"
    assert run_cli("export", tmp_path / "a", "--for", "peft", "--base", base, "-o", out).exit_code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    shared = [f"model.layers.0.mlp.shared_expert.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    assert set(shared) <= set(config["target_modules"])
    assert config["target_parameters"] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]
    source, written = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    for key, tensor in source.items():
        if "shared_expert" in key:
            assert torch.equal(written[key], tensor)
    exported, missing, unexpected = _load_exported(kind, out)
    assert missing == [] and unexpected == []
    expected, plain = _logits(reference), _logits(tiny_moe(kind))
    assert relative_error(_logits(exported) - plain, expected - plain) < 1e-5
    out = tmp_path / "vllm"
    assert run_cli("export", tmp_path / "a", "--for", "vllm", "--base", base, "-o", out).exit_code == 0
    written = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(written[k], t) for k, t in source.items() if "shared_expert" in k)


def test_without_base_per_expert_names_get_a_hint_not_a_guess(case, tmp_path):
    out = tmp_path / "out"
    result = run_cli("export", case["adapter"], "--for", "peft", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert any("pass --base BASE" in note for note in json.loads(result.stdout)["notes"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert "target_parameters" not in config  # nothing fused on a guess


def test_a_parameter_adapted_both_ways_is_refused(tmp_path):
    """target_parameters on gate_up_proj and per-expert gate/up modules in one adapter: PEFT would apply
    both, no single layout holds them."""
    import shutil

    from safetensors.torch import save_file

    kind = "qwen3-moe"
    model = tiny_moe(kind)
    base = _save_base(model, tmp_path / "base")
    _fused_adapter(tiny_moe(kind), tmp_path / "fused")
    _per_expert_adapter(kind, per_expert_twin(model, kind), tmp_path / "per-expert")
    both = shutil.copytree(tmp_path / "fused", tmp_path / "both")
    tensors = load_file(both / "adapter_model.safetensors")
    extra = load_file(tmp_path / "per-expert" / "adapter_model.safetensors")
    tensors.update(
        {k: v for k, v in extra.items() if ".experts." in k and ("gate_proj" in k or "up_proj" in k)}
    )
    save_file(tensors, both / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((both / "adapter_config.json").read_text())
    config["target_modules"] = sorted(set(config["target_modules"]) | {"gate_proj", "up_proj"})
    config["rank_pattern"] = {r"experts\.\d+\.(gate|up)_proj": 4}
    (both / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(
        ["export", both, "--for", "peft", "--base", base, "-o", out],
        "model.layers.0.mlp.experts.gate_up_proj is adapted twice",
        inputs=[both, base],
        output=out,
    )
