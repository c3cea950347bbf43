"""merge semantics that depend on the model's structure: layouts per layer and tied embeddings.

References are PEFT's own: `merge_and_unload()` where it agrees with PEFT's adapted model, and the
adapted model's logits always (PEFT's merge writes a LoRA on a tied embedding into the shared
tensor, which changes the other side and so its own forward: there the reference is PEFT's merge of
the untied model, the fix its warning recommends, and the logits prove it).
"""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from clihelp import run_cli
from factories import load_base, make_adapter, make_gpt2, make_llama, relative_error

from lorasurgery.commands.merge import MergeRequest, merge_checkpoint, plan_merge
from lorasurgery.errors import MismatchError, UnsupportedError
from lorasurgery.io import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="peft")

FP32_RTOL = 1e-5
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def read_all(folder: Path) -> dict:
    checkpoint = open_checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


class PeftResult:
    """PEFT on `base` + `adapter`: the adapted logits, merge_and_unload's state dict and tie flag,
    and whether that merge reproduces the adapted model."""

    def __init__(self, base, adapter, kind="llama", prepare=None, untie=False):
        model = load_base(base, kind)
        if prepare:
            prepare(model)
        if untie:
            model.config.tie_word_embeddings = False
            output = model.get_output_embeddings()
            output.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            self.logits = wrapped(TOKENS).logits
            merged = wrapped.merge_and_unload()
            merged_logits = merged(TOKENS).logits
        self.state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        self.tied = bool(merged.config.tie_word_embeddings)
        self.merge_agrees = relative_error(merged_logits, self.logits) <= FP32_RTOL


def merged_logits(folder: Path, kind="llama"):
    model = load_base(folder, kind)
    with torch.no_grad():
        return model(TOKENS).logits


def assert_tensors_match(ours: dict, reference: dict, partner: dict | None = None) -> None:
    """Every reference tensor equals ours (a tied one we store once: its stored partner)."""
    for name, tensor in reference.items():
        mine = ours.get(name)
        if mine is None and partner and name in partner:
            mine = ours[partner[name]]
        assert mine is not None, name
        assert mine.shape == tensor.shape, (name, mine.shape, tensor.shape)
        assert relative_error(mine, tensor) <= FP32_RTOL, (name, relative_error(mine, tensor))


# --------------------------------------------------------------------------------------------------
# Tied embeddings: every combination against PEFT


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("untied") / "base")


SAVED = {"none": [], "lm_head": ["lm_head"], "embed": ["embed_tokens"], "both": ["lm_head", "embed_tokens"]}
COMBINATIONS = [
    (tied, lora, saved, resized)
    for tied, lora, saved, resized in itertools.product(
        ("tied", "untied"), ("q", "embed", "head", "embed+head"), SAVED, ("same-vocab", "resized")
    )
    # a resized vocabulary needs the new rows saved: the embedding (targeted or saved), and for an
    # untied base the head too
    if resized == "same-vocab"
    or (
        ("embed" in lora or saved in ("embed", "both"))
        and (tied == "tied" or "head" in lora or saved in ("lm_head", "both"))
    )
]


def _resize(model) -> None:
    model.resize_token_embeddings(136, mean_resizing=False)


@pytest.mark.parametrize("tied,lora,saved,resized", COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def test_tied_embeddings_merge_as_peft(tied, lora, saved, resized, tied_base, untied_base, tmp_path):
    base = tied_base if tied == "tied" else untied_base
    targets = (
        ["q_proj"] + (["embed_tokens"] if "embed" in lora else []) + (["lm_head"] if "head" in lora else [])
    )
    prepare = _resize if resized == "resized" else None

    def seeded_resize(model):  # the new rows are random: the same ones for the adapter and PEFT
        torch.manual_seed(5)
        _resize(model)

    prepare = seeded_resize if prepare else None
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        target_modules=targets,
        modules_to_save=SAVED[saved] or None,
        prepare=prepare,
    )
    keys = open_checkpoint(adapter / "adapter_model.safetensors").tensors
    if resized == "resized" and not any("lm_head" in k or "embed_tokens.base_layer" in k for k in keys):
        # PEFT's tied lm_head keeps the resized base's new rows, which this adapter does not carry
        with pytest.raises(MismatchError, match="must also carry lm_head.weight"):
            merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
        assert not (tmp_path / "out").exists()
        return
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    peft_result = PeftResult(base, adapter, prepare=prepare)
    ours = read_all(tmp_path / "out")
    # the merged model is PEFT's adapted model
    assert relative_error(merged_logits(tmp_path / "out"), peft_result.logits) <= FP32_RTOL
    ours_tied = config_of(tmp_path / "out").get("tie_word_embeddings", True) and "lm_head.weight" not in ours
    partner = {"lm_head.weight": "model.embed_tokens.weight"} if ours_tied else None
    if peft_result.merge_agrees:
        assert_tensors_match(ours, peft_result.state, partner)
        assert ours_tied == peft_result.tied
    else:  # PEFT's merge wrote a LoRA into the shared tensor: the reference is its untied merge
        assert tied == "tied" and ("embed" in lora or "head" in lora) and peft_result.tied
        untied = PeftResult(base, adapter, prepare=prepare, untie=True)
        assert untied.merge_agrees
        assert_tensors_match(ours, untied.state)
        assert not ours_tied
    untie_notes = [n for n in summary.notes if "tie_word_embeddings: false" in n]
    assert bool(untie_notes) == (tied == "tied" and not ours_tied)
    if tied == "tied" and not ours_tied:
        assert summary.config_changes.get("tie_word_embeddings") is False
    if resized == "resized":
        assert ours["model.embed_tokens.weight"].shape[0] == 136
        assert config_of(tmp_path / "out")["vocab_size"] == 136


def test_the_recipe_tied_llama_embedding_lora_and_modules_to_save_lm_head(tied_base, tmp_path):
    """The common recipe that was refused: PEFT writes lm_head = the saved copy, embed_tokens = E + ΔE
    and unties; the plan says so before anything is written."""
    adapter = make_adapter(
        tied_base,
        tmp_path / "adapter",
        target_modules=["embed_tokens", "q_proj"],
        modules_to_save=["lm_head"],
    )
    plan = plan_merge(tied_base, [adapter], [1.0])
    embed, head = plan.item("model.embed_tokens.weight"), plan.item("lm_head.weight")
    assert embed.recipe.updates == [(0, "model.embed_tokens")]
    assert embed.recipe.start == (0, "base_model.model.model.embed_tokens.base_layer.weight")
    assert head.recipe.start == (0, "base_model.model.lm_head.weight") and not head.recipe.updates
    assert [(t.group, t.untied) for t in plan.ties] == [
        (("model.embed_tokens.weight", "lm_head.weight"), True)
    ]
    assert plan.config_changes == {"tie_word_embeddings": False}

    merge_checkpoint(MergeRequest(tied_base, [adapter], tmp_path / "out"))
    reference = PeftResult(tied_base, adapter)
    assert reference.merge_agrees and not reference.tied
    ours = read_all(tmp_path / "out")
    assert_tensors_match(ours, reference.state)
    assert set(ours) == set(reference.state)
    assert config_of(tmp_path / "out")["tie_word_embeddings"] is False


def test_equal_saved_copies_keep_the_tie_as_peft_does(tied_base, tmp_path):
    """ensure_weight_tying: PEFT saves lm_head and embed_tokens as equal copies and keeps them tied."""
    adapter = make_adapter(
        tied_base,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        ensure_weight_tying=True,
    )
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(
        open_checkpoint(adapter / "adapter_model.safetensors").tensors
    )
    summary = merge_checkpoint(MergeRequest(tied_base, [adapter], tmp_path / "out"))
    reference = PeftResult(tied_base, adapter)
    assert reference.merge_agrees and reference.tied
    ours = read_all(tmp_path / "out")
    assert "lm_head.weight" not in ours and summary.config_changes == {} and summary.notes == []
    assert_tensors_match(ours, reference.state, {"lm_head.weight": "model.embed_tokens.weight"})


def test_conflicts_name_each_adapter_once(tied_base, tmp_path):
    first = make_adapter(
        tied_base, tmp_path / "a1", seed=1, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    second = make_adapter(
        tied_base, tmp_path / "a2", seed=2, target_modules=["v_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(MismatchError) as error:
        merge_checkpoint(MergeRequest(tied_base, [first, second], tmp_path / "out"))
    message = str(error.value)
    assert "both replace lm_head.weight" in message
    assert message.count(str(first)) == 1 and message.count(str(second)) == 1
    assert not (tmp_path / "out").exists()
    # one adapter, a LoRA on the embedding and a saved lm_head on a tied base: no conflict at all
    recipe = make_adapter(
        tied_base, tmp_path / "a3", target_modules=["embed_tokens"], modules_to_save=["lm_head"]
    )
    assert plan_merge(tied_base, [recipe], [1.0]).notes


def test_equal_shape_embeddings_without_a_config_are_two_tensors(untied_base, tmp_path):
    """embed_tokens and lm_head of equal shape, stored as two tensors, no config.json: not a tie."""
    adapter = make_adapter(
        untied_base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(untied_base / "model.safetensors", bare / "model.safetensors")
    base_tensors = read_all(untied_base)
    assert base_tensors["lm_head.weight"].shape == base_tensors["model.embed_tokens.weight"].shape
    plan = plan_merge(bare, [adapter], [1.0])
    assert plan.ties == [] and not plan.structure.known
    merge_checkpoint(MergeRequest(bare, [adapter], tmp_path / "out"))
    ours = read_all(tmp_path / "out")
    reference = PeftResult(untied_base, adapter)
    assert_tensors_match(ours, reference.state)
    assert torch.equal(ours["model.embed_tokens.weight"], base_tensors["model.embed_tokens.weight"])
    assert not torch.equal(ours["lm_head.weight"], base_tensors["lm_head.weight"])


# --------------------------------------------------------------------------------------------------
# Layouts: PEFT decides fan_in_fan_out per layer


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def without_config(base: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(base / "model.safetensors", folder / "model.safetensors")
    return folder


def set_flag(adapter: Path, value) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    if value is None:
        config.pop("fan_in_fan_out")
    else:
        config["fan_in_fan_out"] = value
    path.write_text(json.dumps(config))


def test_peft_saves_the_last_created_layers_flag(gpt2, tmp_path):
    """Conv1D c_attn/c_proj and the Linear lm_head: PEFT turns the flag on and off per layer and
    saves False, although most targets are Conv1D (c_proj square, 32×32)."""
    adapter = make_adapter(
        gpt2, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_proj", "lm_head"]
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    plan = plan_merge(gpt2, [adapter], [1.0])
    assert plan.layouts[(0, "transformer.h.0.attn.c_proj")].fan_in_fan_out  # from the structure
    assert plan.layouts[(0, "transformer.h.0.attn.c_proj")].reason == "structure"
    assert not plan.layouts[(0, "lm_head")].fan_in_fan_out
    merge_checkpoint(MergeRequest(gpt2, [adapter], tmp_path / "out"))
    reference = PeftResult(gpt2, adapter, kind="gpt2", untie=True)  # lm_head is tied to wte
    assert reference.merge_agrees
    assert_tensors_match(read_all(tmp_path / "out"), reference.state)
    assert (
        relative_error(merged_logits(tmp_path / "out", "gpt2"), PeftResult(gpt2, adapter, "gpt2").logits)
        <= FP32_RTOL
    )


def test_square_conv1d_with_the_default_flag_merges_right(gpt2, tmp_path):
    """An adapter saved with fan_in_fan_out false (the default, as transformers' add_adapter leaves
    it) on GPT-2's square c_proj: the structure says Conv1D, so ΔW is not transposed wrongly."""
    adapter = make_adapter(gpt2, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_proj"])
    set_flag(adapter, False)
    merge_checkpoint(MergeRequest(gpt2, [adapter], tmp_path / "out"))
    reference = PeftResult(gpt2, adapter, kind="gpt2")  # PEFT turns the flag on for Conv1D
    assert reference.merge_agrees
    assert_tensors_match(
        read_all(tmp_path / "out"), reference.state, {"lm_head.weight": "transformer.wte.weight"}
    )


def test_square_conv1d_with_the_flag_false_and_no_config_is_merged_as_assumed(gpt2, tmp_path):
    """GPT-2's square attn.c_proj alone, saved with fan_in_fan_out false, on a base without
    config.json: nothing tells its Conv1D from a Linear, so the flag's layout is assumed (wrongly
    here), and the summary and --json say which modules and how to be sure; with --config the merge
    is exact."""
    adapter = make_adapter(gpt2, tmp_path / "adapter", model_kind="gpt2", target_modules=["attn.c_proj"])
    set_flag(adapter, False)
    bare = without_config(gpt2, tmp_path / "bare")
    reference = PeftResult(gpt2, adapter, kind="gpt2").state  # PEFT turns the flag on for Conv1D
    partner = {"lm_head.weight": "transformer.wte.weight"}
    square = [f"transformer.h.{i}.attn.c_proj" for i in range(2)]  # 32×32

    summary = merge_checkpoint(MergeRequest(bare, [adapter], tmp_path / "assumed"))
    (assumption,) = summary.assumptions
    assert sorted(assumption.modules) == square and not assumption.fan_in_fan_out
    as_json = summary.to_dict()["assumptions"][0]
    assert as_json["assumed"] == "stored (out, in) as an nn.Linear" and "--config" in as_json["remedy"]
    ours = read_all(tmp_path / "assumed")
    name = f"{square[0]}.weight"
    update = float((reference[name] - read_all(gpt2)[name]).norm())
    assert float((ours[name] - reference[name]).norm()) > 0.5 * update  # what the assumption costs here
    result = run_cli("merge", bare, adapter, "-o", tmp_path / "cli")
    assert result.exit_code == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("assumed:")]
    assert square[0] in line and "fan_in_fan_out: false" in line and "--config" in line

    summary = merge_checkpoint(
        MergeRequest(bare, [adapter], tmp_path / "by-config", config_file=gpt2 / "config.json")
    )
    assert summary.assumptions == []
    assert_tensors_match(read_all(tmp_path / "by-config"), reference, partner)


def test_non_square_conv1d_without_the_flag_merges(gpt2, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_fc"])
    set_flag(adapter, None)
    for base in (gpt2, without_config(gpt2, tmp_path / "bare")):  # the structure, then the shapes
        out = tmp_path / f"out-{base.name}"
        merge_checkpoint(MergeRequest(base, [adapter], out))
        reference = PeftResult(gpt2, adapter, kind="gpt2")
        assert_tensors_match(read_all(out), reference.state, {"lm_head.weight": "transformer.wte.weight"})


def test_square_conv1d_without_a_config_is_refused_then_resolved(gpt2, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / "adapter", model_kind="gpt2", target_modules=["c_attn", "c_proj"])
    set_flag(adapter, False)
    bare = without_config(gpt2, tmp_path / "bare")
    with pytest.raises(UnsupportedError) as error:
        merge_checkpoint(MergeRequest(bare, [adapter], tmp_path / "out"))
    message = str(error.value)
    assert "module transformer.h.0.attn.c_proj" in message and "square (32×32)" in message
    assert "has no config.json" in message and "--config" in message and "--fan-in-fan-out REGEX" in message
    assert not (tmp_path / "out").exists()
    reference = PeftResult(gpt2, adapter, kind="gpt2").state
    partner = {"lm_head.weight": "transformer.wte.weight"}
    merge_checkpoint(MergeRequest(bare, [adapter], tmp_path / "by-option", fan_in_fan_out=r"c_attn|c_proj"))
    assert_tensors_match(read_all(tmp_path / "by-option"), reference, partner)
    merge_checkpoint(MergeRequest(bare, [adapter], tmp_path / "by-config", config_file=gpt2 / "config.json"))
    assert_tensors_match(read_all(tmp_path / "by-config"), reference, partner)
