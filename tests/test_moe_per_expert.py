"""Per-expert MoE adapters (transformers 4.x's and most trainers' layout) on transformers-5 bases.

transformers 5 fuses a MoE block's experts into 3-D parameters; an adapter trained on 4.x names one
LoRA per expert and projection (`…experts.3.gate_proj`, Mixtral's `…block_sparse_moe.experts.3.w1`).
The oracle is PEFT on the 4.x-style model itself (tests/factories.per_expert_model: one nn.Linear per
expert holding the transformers-5 checkpoint's weights): its merge_and_unload gives each expert's
merged weights, fused back independently of lorasurgery (factories.fused_state). lorasurgery's merge
into the transformers-5 checkpoint — stored per expert as transformers saves Qwen3-MoE and Mixtral, or
fused as gpt-oss ships (and as a Qwen3-MoE/Mixtral copy written fused) — must equal it and load in
AutoModelForCausalLM with the same logits. PEFT 0.21.2 converts such adapters itself for Qwen3-MoE
and Mixtral (peft/utils/transformers_weight_conversion.py): a second oracle; it refuses gpt-oss.
Bad input goes through the CLI (docs/design.md §7).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import (
    PER_EXPERT_NAMES,
    fused_state,
    make_gpt_oss,
    per_expert_model,
    randomize_adapter,
    relative_error,
)
from peft_matrix import Bases, _quiet
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-6  # float32: PEFT adds s·(B@A) after the product, lorasurgery in one addmm


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("moe-bases"))


def fused_copy(source, folder):
    """The checkpoint at `source` written with its experts fused, as transformers 5 holds them."""
    shutil.copytree(source, folder)
    model = load(source)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def load(folder):
    with _quiet():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def per_expert_adapter(kind, base, out, *, seed=1, **lora):
    """PEFT's adapter of the 4.x-style model of `base` (every factor random), and PEFT's merged
    per-expert weights fused back into the transformers-5 state dict (the expected merge)."""
    import peft

    model = load(base)
    net = per_expert_model(kind, model)
    _, gate, up, down = PER_EXPERT_NAMES[kind]
    names = [gate, up, down] if up is not None else rf".*experts\.({gate}|{down})\.\d+"  # in ModuleLists
    lora = {"r": 2, "lora_alpha": 5, "target_modules": names, **lora}
    with _quiet():
        wrapped = peft.get_peft_model(net, peft.LoraConfig(**lora))
    randomize_adapter(wrapped, seed, std=0.2, a_std=0.2, magnitude=0.05)
    with _quiet():
        wrapped.save_pretrained(out)
        merged = wrapped.merge_and_unload()
    return out, fused_state(kind, model, {k: v.detach() for k, v in merged.state_dict().items()})


def logits(model_or_folder, state=None):
    model = load(model_or_folder) if state is None else model_or_folder
    if state is not None:
        model.load_state_dict(state)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
    with torch.no_grad():
        return model(ids).logits


def assert_merged(kind, base, merged, expected, tolerance=TOLERANCE):
    ours = load(merged).state_dict()
    base_state = load(base).state_dict()
    assert set(ours) == set(expected)
    for name, value in expected.items():
        if torch.equal(value, base_state[name]):
            assert torch.equal(ours[name], value), name  # untouched
        else:
            assert relative_error(ours[name], value) < tolerance, (name, relative_error(ours[name], value))
    assert "experts" in " ".join(n for n in expected if not torch.equal(expected[n], base_state[n]))
    reference = logits(load(base), expected)
    assert relative_error(logits(merged), reference) < 1e-5


CASES = [
    ("gpt-oss-unsloth", "fused"),
    ("qwen3-moe", "split"),
    ("qwen3-moe", "fused"),
    ("mixtral", "split"),
    ("mixtral", "fused"),
    ("gpt-oss", "fused"),
]


@pytest.mark.parametrize(("kind", "stored"), CASES)
def test_merge_equals_peft_on_the_per_expert_model(kind, stored, bases, tmp_path):
    base = bases.get(kind.removesuffix("-unsloth"))
    if stored == "fused" and not kind.startswith("gpt-oss"):
        base = fused_copy(base, tmp_path / "fused")
    adapter, expected = per_expert_adapter(kind, base, tmp_path / "a")
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any(".experts.1." in k or "_projs.1." in k for k in keys)  # a per-expert layout
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert_merged(kind, base, out, expected)
    # verify finds every slice landed, and a copy of the base missing them
    assert run_cli("verify", base, adapter, out).exit_code == 0
    broken = run_cli("verify", base, adapter, base, "--json")
    assert broken.exit_code != 0
    assert "experts" in broken.stdout


@pytest.mark.parametrize("kind", ["qwen3-moe", "gpt-oss"])
def test_verify_finds_one_expert_slice_misplaced(kind, bases, tmp_path):
    """A merged fused checkpoint whose experts 0 and 1 of gate_up_proj are swapped (each slice merged
    right, in the wrong expert) fails verify on that tensor alone; the untouched swap is not 'landed'."""
    base = bases.get(kind)
    if kind != "gpt-oss":
        base = fused_copy(base, tmp_path / "fused")
    adapter, _ = per_expert_adapter(kind, base, tmp_path / "a")
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out).exit_code == 0
    landed = run_cli("verify", base, adapter, out, "--json")
    assert landed.exit_code == 0, landed.stdout
    files = sorted(out.glob("*.safetensors"))
    [(path, state)] = [
        (f, load_file(f)) for f in files if any(k.endswith("gate_up_proj") for k in load_file(f))
    ]
    [name] = [k for k in state if k.endswith("gate_up_proj")]
    state[name] = state[name][[1, 0, *range(2, state[name].shape[0])]].contiguous()
    save_file(state, path, metadata={"format": "pt"})
    broken = run_cli("verify", base, adapter, out, "--json")
    assert broken.exit_code == 1, broken.stderr
    checks = {c["tensor"]: c["verdict"] for c in json.loads(broken.stdout)["checks"]}
    assert checks[name] != "landed"
    assert all(v == "landed" for t, v in checks.items() if t != name), checks


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral"])
def test_peft_conversion_agrees(kind, bases, tmp_path):
    """PEFT 0.21.2 loads a 4.x per-expert adapter on the transformers-5 model itself (it fuses gate
    and up with rank 2r and alpha 2α, a block-diagonal lora_B): its merge equals ours."""
    import peft

    base = bases.get(kind)
    adapter, _ = per_expert_adapter(kind, base, tmp_path / "a")
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out).exit_code == 0
    with _quiet():
        wrapped = peft.PeftModel.from_pretrained(load(base), str(adapter))
    config = wrapped.peft_config["default"]
    assert "gate_up_proj" in config.target_parameters
    with _quiet(), torch.no_grad():
        theirs = wrapped.merge_and_unload().state_dict()
    ours = load(out).state_dict()
    for name, value in theirs.items():
        assert relative_error(ours[name], value) < TOLERANCE, name


def test_peft_refuses_gpt_oss_per_expert(bases, tmp_path):
    """PEFT has no conversion for gpt-oss (its checkpoints were always fused): lorasurgery's merge is
    the only way such an adapter reaches the model."""
    import peft

    base = bases.get("gpt-oss")
    adapter, _ = per_expert_adapter("gpt-oss", base, tmp_path / "a")
    with _quiet(), pytest.raises(ValueError, match="not found in the base model"):
        peft.PeftModel.from_pretrained(load(base), str(adapter))


def test_shared_expert_stays_apart(bases, tmp_path):
    """Qwen2-MoE: `gate_proj` names the routed experts' and the shared expert's; each lands on its own."""
    base = bases.get("qwen2-moe")
    adapter, expected = per_expert_adapter("qwen2-moe", base, tmp_path / "a")
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any("shared_expert.gate_proj" in k for k in keys)
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out).exit_code == 0
    assert_merged("qwen2-moe", base, out, expected)


def test_partial_experts_merge_what_is_there(bases, tmp_path):
    """An adapter on some experts' projections only (legal in PEFT on 4.x): those slices change."""
    base = bases.get("mixtral")
    adapter, expected = per_expert_adapter(
        "mixtral", base, tmp_path / "a", target_modules=r".*experts\.[02]\.(w1|w2)"
    )
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out).exit_code == 0
    assert_merged("mixtral", base, out, expected)
    base_state, ours = load(base).state_dict(), load(out).state_dict()
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(ours[gate_up][1], base_state[gate_up][1])  # expert 1 untouched
    assert torch.equal(ours[gate_up][0][8:], base_state[gate_up][0][8:])  # w3 (up) untouched


@pytest.mark.parametrize(
    ("kind", "stored"), [("qwen3-moe", "fused"), ("gpt-oss", "fused"), ("mixtral", "split")]
)
def test_inspect_norms_are_peft_per_expert_deltas(kind, stored, bases, tmp_path):
    import peft

    base = bases.get(kind)
    if stored == "fused" and kind != "gpt-oss":
        base = fused_copy(base, tmp_path / "fused")
    adapter, _ = per_expert_adapter(kind, base, tmp_path / "a")
    result = run_cli("inspect", adapter, "--base", base, "--json")
    assert result.exit_code == 0, result.stderr
    modules = {m["name"]: m for m in json.loads(result.stdout)["modules"]}
    net = per_expert_model(kind, load(base))
    with _quiet():
        wrapped = peft.PeftModel.from_pretrained(net, str(adapter))
    groups: dict[str, list] = {}  # `…experts.gate_proj` -> [(expert, ‖ΔW_e‖², ‖W_e‖²)]
    for name, layer in wrapped.named_modules():
        if not hasattr(layer, "get_delta_weight") or not hasattr(layer, "base_layer"):
            continue
        path = name.removeprefix("base_model.model.")
        head, expert, leaf = path.rsplit(".", 2)
        delta = layer.get_delta_weight("default").double()
        W = layer.get_base_layer().weight.double()
        groups.setdefault(f"{head}.{leaf}", []).append((int(expert), delta.square().sum(), W.square().sum()))
    assert set(modules) == set(groups) and len(groups) == 3  # one row per projection, E slices each
    for name, members in groups.items():
        entry = modules[name]
        delta_norm = float(sum(d for _, d, _ in members) ** 0.5)
        assert entry["experts"] == sorted(e for e, _, _ in members)
        assert entry["shape"][0] == len(members)
        assert abs(entry["delta_fro_norm"] - delta_norm) < 1e-5 * delta_norm
        relative = delta_norm / float(sum(w for _, _, w in members) ** 0.5)
        assert abs(entry["relative_norm"] - relative) < 1e-5 * relative


@pytest.mark.parametrize(("kind", "stored"), [("gpt-oss", "fused"), ("qwen3-moe", "split")])
def test_rank_report_and_probe_read_each_slice(kind, stored, bases, tmp_path):
    """rank-report ADAPTER --base analyses each expert's (out, in) slice; the probe's fine-tune (its
    `tune`) is PEFT's merged model, and --probe runs on it."""
    from lorasurgery.adapter import load_adapter
    from lorasurgery.binding import bind
    from lorasurgery.commands.rank_report.probe import tune
    from lorasurgery.io import open_checkpoint

    base = make_gpt_oss(tmp_path / "oss") if kind == "gpt-oss" else bases.get(kind)
    adapter, expected = per_expert_adapter(kind, base, tmp_path / "a")
    result = run_cli("rank-report", adapter, "--base", base, "--json", "-")
    assert result.exit_code == 0, result.stderr
    model = load(base)
    (bound,) = bind([load_adapter(adapter)], open_checkpoint(base))
    tune(model, bound)
    for name, value in model.state_dict().items():
        assert relative_error(value, expected[name]) < TOLERANCE, name
    if kind == "gpt-oss":  # vocabulary 128: its tokens are bytes of an ASCII text
        (base / "byte_tokens.json").write_text('{"byte_tokens": true}')
        text = tmp_path / "text.txt"
        text.write_text("the quick brown fox jumps over the lazy dog " * 8)
        args = ["--probe", "--text", text, "--tokens", "32", "--probe-fractions", "0.5"]
        probe = run_cli("rank-report", adapter, "--base", base, *args)
        assert probe.exit_code == 0, probe.stderr


# ----------------------------------------------------------------------------------------- bad input


def _renamed(adapter, folder, rename):
    folder = shutil.copytree(adapter, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("stored", ["split", "fused"])
def test_expert_beyond_the_base_is_refused(stored, bases, tmp_path):
    base = bases.get("mixtral")
    if stored == "fused":
        base = fused_copy(base, tmp_path / "fused")
    adapter, _ = per_expert_adapter("mixtral", base, tmp_path / "a", target_modules=r".*experts\.2\.w1")
    bad = _renamed(adapter, tmp_path / "bad", lambda k: k.replace(".experts.2.", ".experts.7."))
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, bad, "-o", out],
        "block_sparse_moe.experts.7.w1 names expert 7 but the base has 3 experts (0–2)",
        inputs=[base, bad],
        output=out,
    )


@pytest.mark.parametrize("kind", ["gpt-oss", "qwen3-moe"])
def test_expert_shape_mismatch_is_refused(kind, bases, tmp_path):
    base = bases.get("gpt-oss") if kind == "gpt-oss" else fused_copy(bases.get(kind), tmp_path / "fused")
    adapter, _ = per_expert_adapter(kind, base, tmp_path / "a")
    bad = shutil.copytree(adapter, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    a_key = next(k for k in tensors if ".experts.1.up_proj.lora_A" in k)
    b_key = a_key.replace("lora_A", "lora_B")
    tensors[b_key] = torch.zeros(tensors[b_key].shape[0] + 2, tensors[b_key].shape[1])  # 2 more outputs
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    result = assert_refused(
        ["merge", base, bad, "-o", out], "experts.1.up_proj", inputs=[base, bad], output=out
    )
    assert str(bad) in result.stderr
    assert_refused(["inspect", bad, "--base", base], "experts.1.up_proj", inputs=[base, bad])


@pytest.mark.parametrize("kind", ["gpt-oss", "mixtral"])
def test_dora_per_expert_merges_and_resizes_on_its_slice(kind, bases, tmp_path):
    """DoRA on a per-expert Linear normalises that expert's rows (its slice's, stored (in, out) for
    gpt-oss: per column): merge equals PEFT's; resize --base writes the effective update as a plain
    LoRA (full rank: exact), which merges to the same weights; combine --base of it twice, to twice."""
    base = bases.get(kind) if kind == "gpt-oss" else fused_copy(bases.get(kind), tmp_path / "fused")
    adapter, expected = per_expert_adapter(kind, base, tmp_path / "a", use_dora=True)
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out).exit_code == 0
    assert_merged(kind, base, out, expected)
    resized = tmp_path / "resized"
    result = run_cli("resize", adapter, "--base", base, "--rank", "8", "-o", resized)
    assert result.exit_code == 0, result.stderr
    # the per-expert modules are nn.Linear in their model, whatever gpt-oss's fused storage is
    assert json.loads((resized / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    again = tmp_path / "again"
    assert run_cli("merge", base, resized, "-o", again).exit_code == 0
    assert_merged(kind, base, again, expected, tolerance=1e-5)
    combined = tmp_path / "combined"  # twice the effective update, as one plain LoRA
    result = run_cli("combine", adapter, adapter, "--exact", "--base", base, "-o", combined)
    assert result.exit_code == 0, result.stderr
    twice = tmp_path / "twice"
    assert run_cli("merge", base, combined, "-o", twice).exit_code == 0
    base_state = load(base).state_dict()
    doubled = {name: 2 * value - base_state[name] for name, value in expected.items()}
    assert_merged(kind, base, twice, doubled, tolerance=1e-5)


def test_mxfp4_gpt_oss_per_expert(tmp_path):
    """gpt-oss as it ships (experts in MXFP4): a per-expert adapter merges into the dequantized experts'
    slices exactly as into transformers' own decoding of them, and verify finds it landed."""
    from quantized_checks import dequantized_copy, store_mxfp4

    plain = make_gpt_oss(tmp_path / "plain", hidden_size=64)
    Q = store_mxfp4(plain, tmp_path / "mxfp4")
    D = dequantized_copy(Q, tmp_path / "dequantized")
    adapter, expected = per_expert_adapter("gpt-oss", D, tmp_path / "a")
    outputs = {}
    for label, base in (("Q", Q), ("D", D)):
        outputs[label] = tmp_path / f"out-{label}"
        result = run_cli("merge", base, adapter, "-o", outputs[label])
        assert result.exit_code == 0, result.stderr
    assert_merged("gpt-oss", D, outputs["Q"], expected)
    ours, theirs = (
        load_file(outputs["Q"] / "model.safetensors"),
        load_file(outputs["D"] / "model.safetensors"),
    )
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert run_cli("verify", Q, adapter, outputs["Q"]).exit_code == 0


@pytest.mark.parametrize("kind", ["gpt-oss", "qwen3-moe"])
def test_rank_report_of_a_model_analyses_each_expert(kind, bases, tmp_path):
    """rank-report of a model TARGET with fused 3-D experts: one entry per expert, its (out, in)
    matrix (gpt-oss's stored (in, out), transposed back), W's norms and ΔW's against torch's SVD."""
    if kind == "gpt-oss":  # hidden 32, inner 32: gate_up_proj (E, 32, 64), so [64, 32] proves the layout
        base = make_gpt_oss(tmp_path / "oss")
    else:
        base = fused_copy(bases.get(kind), tmp_path / "fused")
    adapter, _ = per_expert_adapter(kind, base, tmp_path / "a")
    merged = tmp_path / "merged"
    assert run_cli("merge", base, adapter, "-o", merged).exit_code == 0
    W0, W1 = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    transposed = kind == "gpt-oss"
    for args, mode in (([merged], "weight"), ([merged, "--base", base], "delta")):
        result = run_cli("rank-report", *args, "--json", "-")
        assert result.exit_code == 0, result.stderr
        entries = {(m["name"], m["kind"]): m for m in json.loads(result.stdout)["modules"]}
        checked = 0
        for name in W0:
            if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            for e in range(W0[name].shape[0]):
                M = W1[name][e] if mode == "weight" else W1[name][e].double() - W0[name][e].double()
                M = (M.T if transposed else M).double()
                entry = entries[(f"{name}[{e}]", mode)]
                assert entry["shape"] == list(M.shape)
                S = torch.linalg.svdvals(M)
                assert abs(entry["metrics"]["fro_norm"] - float(S.norm())) < 1e-5 * float(S.norm())
                assert abs(entry["metrics"]["spectral_norm"] - float(S[0])) < 1e-5 * float(S[0])
                checked += 1
        assert checked == 2 * W0["model.layers.0.mlp.experts.gate_up_proj"].shape[0]  # both parameters
    if kind == "gpt-oss":
        assert entries[("model.layers.0.mlp.experts.gate_up_proj[0]", "delta")]["shape"] == [64, 32]
