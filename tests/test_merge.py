"""merge against PEFT's own merge, tensor by tensor, for every LoRA feature on tiny real models.

The reference is `PeftModel.from_pretrained(base, adapter).merge_and_unload()`; where PEFT's merge
and its own forward disagree (a LoRA on a tied embedding: PEFT writes ΔW into the shared tensor), the
reference is PEFT's merge on the untied model, the fix its warning recommends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorasurgery.commands.merge import MergeRequest, merge_checkpoint
from lorasurgery.errors import MismatchError, NonFiniteError, UnsupportedError, VerificationError
from lorasurgery.io import open_checkpoint
from lorasurgery.linalg import delta as kernels
from lorasurgery.linalg.delta import Update, merge_weight
from lorasurgery.model import structure_of

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from factories import load_base, make_bert, make_gpt2, make_llama, relative_error  # noqa: E402
from factories import make_adapter as make_peft_adapter  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

warnings.filterwarnings("ignore", module="peft")

FP32_RTOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Tiny bases (tests/factories.py, fixed seeds) and real PEFT adapters

BASES = {
    "llama": lambda path, **kw: make_llama(path, vocab_size=64, seed=0, **kw),
    "llama-tied": lambda path, **kw: make_llama(path, vocab_size=64, tie_word_embeddings=True, seed=1, **kw),
    "gpt2": lambda path, **kw: make_gpt2(path, vocab_size=64, seed=2, **kw),
    "bert": lambda path, **kw: make_bert(path, head="mlm", vocab_size=64, seed=3, **kw),  # BertForMaskedLM
}


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """name -> folder of a saved tiny base (sharded variants end in -sharded, bf16 in -bf16)."""
    root = tmp_path_factory.mktemp("bases")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            kind = name.removesuffix("-sharded").removesuffix("-bf16")
            options = {}
            if name.endswith("-bf16"):
                options["dtype"] = torch.bfloat16
            if name.endswith("-sharded"):
                options["max_shard_size"] = "30KB"
            made[name] = BASES[kind](root / name, **options)
        return made[name]

    return get


def make_adapter(base_folder: Path, out: Path, *, model_kind: str = "auto", **kwargs) -> Path:
    """tests/factories.py's PEFT adapter, on the model class the base's config.json names."""
    return make_peft_adapter(base_folder, out, model_kind=model_kind, **kwargs)


def load(folder: Path, model_kind: str = "auto", dtype=None):
    return load_base(folder, model_kind, dtype=dtype or "auto")


def peft_merged(base_folder, adapter, *, model_kind="auto", dtype=None, untie=False, prepare=None):
    """PEFT's merge_and_unload() state dict (untie: on the untied model, as PEFT's warning advises)."""
    model = load(base_folder, model_kind, dtype=dtype)
    if untie:
        model.config.tie_word_embeddings = False
        output = model.get_output_embeddings()
        output.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    if prepare:
        prepare(model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}, merged.config


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def assert_matches(ours: dict, reference: dict, rtol=FP32_RTOL, rename=lambda n: n) -> None:
    for name, tensor in ours.items():
        ref = reference[rename(name)]
        assert tensor.shape == ref.shape, (name, tensor.shape, ref.shape)
        assert tensor.dtype == ref.dtype, (name, tensor.dtype, ref.dtype)
        assert relative_error(tensor, ref) <= rtol, (name, relative_error(tensor, ref))


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --------------------------------------------------------------------------------------------------
# Kernels against PEFT's layers


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.linear = torch.nn.Linear(24, 40)
        self.conv1d = Conv1D(40, 24)  # GPT-2's layer: weight stored (in, out)
        self.embedding = torch.nn.Embedding(50, 16)
        self.conv = torch.nn.Conv2d(6, 10, 3)
        self.pointwise = torch.nn.Conv2d(6, 10, 1)

    def forward(self, x):
        return x


def layer_updates(peft_model, dora: bool) -> dict[str, Update]:
    updates = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or name == "":
            continue
        if name == "embedding":
            A, B, kind = module.lora_embedding_A["default"], module.lora_embedding_B["default"], "embedding"
        else:
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            kind = "conv" if "conv" in name or "pointwise" in name else "linear"
        kind = "linear" if name == "conv1d" else kind
        magnitude = module.lora_magnitude_vector["default"].weight.detach() if dora else None
        updates[name] = Update(
            name,
            kind,
            A.detach(),
            B.detach(),
            module.scaling["default"],
            transposed=name in ("conv1d", "embedding"),  # stored (in, out) / (num_emb, dim)
            magnitude=magnitude,
        )
    return updates


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernels_match_peft_layers(dora, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 64)  # several blocks even on tiny layers
    torch.manual_seed(0)
    layers = Layers().to(dtype)
    targets = ["linear", "conv1d", "embedding", "conv", "pointwise"]
    peft_model = get_peft_model(
        copy.deepcopy(layers),
        LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_dora=dora, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    updates = layer_updates(peft_model, dora)
    merged = peft_model.merge_and_unload()
    for name in targets:
        weight = getattr(layers, name).weight.detach()
        reference = getattr(merged, name).weight.detach()
        ours = merge_weight(weight.clone(), [updates[name]], out_dtype=dtype)
        exact = merge_weight(weight.double(), [updates[name]], out_dtype=torch.float64, precise=True)
        if dtype == torch.float32:
            assert relative_error(ours, reference) <= 1e-6, name
        else:  # one rounding: at least as close to the float64 merge as PEFT
            assert (ours.double() - exact).norm() <= (reference.double() - exact).norm() * (1 + 1e-9), name


def test_several_updates_add_up_exactly():
    torch.manual_seed(1)
    weight = torch.randn(30, 20)
    one = Update("m", "linear", torch.randn(3, 20), torch.randn(30, 3), 2.0, weight=0.7)
    two = Update("m", "linear", torch.randn(5, 20), torch.randn(30, 5), 0.5, weight=-0.3)
    ours = merge_weight(weight.clone(), [one, two], out_dtype=torch.float64, precise=True)
    expected = weight.double() + 0.7 * 2.0 * (one.B.double() @ one.A.double())
    expected -= 0.3 * 0.5 * (two.B.double() @ two.A.double())
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_grouped_conv_is_refused():
    update = Update("m", "conv", torch.randn(4, 6, 3, 3), torch.randn(10, 2, 1, 1), 1.0, source="ad")
    with pytest.raises(UnsupportedError, match="grouped"):
        merge_weight(torch.randn(10, 6, 3, 3), [update], out_dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Whole checkpoints against PEFT's merge_and_unload


CASES = {
    "qv-r8": ("llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    "all-rslora-patterns-sharded": (
        "llama-sharded",
        dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules="all-linear",
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 5},
            alpha_pattern={"v_proj": 3},
        ),
    ),
    "dora-linear-and-embedding": (
        "llama",
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    ),
    "embedding-lora": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"])),
    "layers-to-transform": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], layers_to_transform=[1]),
    ),
    "modules-to-save": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    "tied-modules-to-save": (
        "llama-tied",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    ),
    "gpt2-fan-in-fan-out-lora-bias": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True, bias="lora_only"),
    ),
    "gpt2-dora-conv1d-bias-all-sharded": (
        "gpt2-sharded",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True, bias="all"),
    ),
    "bert-bias-all": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(case, bases, tmp_path):
    base_name, lora = CASES[case]
    base = bases(base_name)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    reference, reference_config = peft_merged(base, adapter)
    ours = read_all(tmp_path / "out")
    assert_matches(ours, reference)
    # Tied tensors are stored once: what the output leaves out is what the base's files leave out, and
    # each is, in PEFT's merged model, the very tensor of one the output does store (transformers' tie).
    stored = set()
    for file in base.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            stored |= set(f.keys())
    assert stored <= set(ours)
    for name in set(reference) - set(ours):
        assert any(torch.equal(reference[name], reference[other]) for other in ours), name
    tied = config_of(tmp_path / "out").get("tie_word_embeddings", True)
    if "lm_head.weight" in ours and config_of(base).get("tie_word_embeddings") is not False:
        assert tied is False and reference_config.tie_word_embeddings is False
    assert summary.adapters[0].modules_merged > 0
    # the base's shard layout is kept
    assert sorted(summary.files) == sorted(p.name for p in base.glob("*.safetensors"))


def test_tied_embedding_lora_unties_and_matches_the_adapted_model(bases, tmp_path):
    base = bases("llama-tied")
    adapter = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]
    )
    assert "lm_head.weight" not in open_checkpoint(base).tensors  # tied: stored once
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out", verify=True))
    ours = read_all(tmp_path / "out")
    reference, _ = peft_merged(base, adapter, untie=True)
    assert_matches(ours, reference)
    assert config_of(tmp_path / "out")["tie_word_embeddings"] is False
    assert torch.equal(ours["lm_head.weight"], read_all(base)["model.embed_tokens.weight"])
    assert summary.notes and "tie_word_embeddings: false" in summary.notes[0]
    assert summary.verified and summary.max_logit_difference < 1e-4


def test_resized_vocabulary(bases, tmp_path):
    base = bases("llama")

    def resize(model):
        model.resize_token_embeddings(70, mean_resizing=False)

    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        prepare=resize,
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj"],
        modules_to_save=["lm_head"],
    )
    merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    reference, _ = peft_merged(base, adapter, prepare=resize)
    ours = read_all(tmp_path / "out")
    assert ours["model.embed_tokens.weight"].shape == (70, 32)
    assert_matches(ours, reference)
    assert config_of(tmp_path / "out")["vocab_size"] == 70


def test_resized_vocabulary_without_the_head_is_refused(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        prepare=lambda m: m.resize_token_embeddings(70, mean_resizing=False),
        r=4,
        lora_alpha=8,
        target_modules=["embed_tokens"],
    )
    with pytest.raises(MismatchError, match="lm_head.weight keeps 64"):
        merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bert_adapter_on_a_base_with_a_prefix(bases, tmp_path):
    base = bases("bert")  # BertForMaskedLM: tensors are bert.encoder.…
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        model_kind="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query"],
    )
    merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    reference, _ = peft_merged(base, adapter, model_kind="bert")
    ours = read_all(tmp_path / "out")
    inner = {n: t for n, t in ours.items() if n.startswith("bert.") and n.removeprefix("bert.") in reference}
    assert len(inner) > 10
    assert_matches(inner, reference, rename=lambda n: n.removeprefix("bert."))


def test_bf16_is_at_least_as_close_to_the_exact_merge_as_peft(bases, tmp_path):
    base = bases("llama-bf16")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=32, target_modules="all-linear")
    merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    ours = read_all(tmp_path / "out")
    reference, _ = peft_merged(base, adapter)
    exact, _ = peft_merged(base, adapter, dtype=torch.float64)
    changed = [n for n in ours if not torch.equal(ours[n], read_all(base)[n])]
    assert len(changed) >= 14
    ours_error = sum(float((ours[n].double() - exact[n]).norm()) for n in changed)
    peft_error = sum(float((reference[n].double() - exact[n]).norm()) for n in changed)
    assert all(ours[n].dtype == torch.bfloat16 for n in ours)
    assert ours_error <= peft_error * (1 + 1e-9), (ours_error, peft_error)


def test_untouched_tensors_are_byte_identical(bases, tmp_path):
    base = bases("llama-sharded")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    source, output = open_checkpoint(base), open_checkpoint(tmp_path / "out")
    untouched = [n for n in source.tensors if "q_proj" not in n]
    for name in untouched:
        assert raw_bytes(source, name) == raw_bytes(output, name), name
    assert summary.tensors_copied == len(untouched)
    assert summary.tensors_merged == 2


def raw_bytes(checkpoint, name) -> bytes:
    info = checkpoint.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return hashlib.sha256(f.read(info.nbytes)).digest()


def test_several_adapters_with_weights(bases, tmp_path):
    base = bases("llama")
    first = make_adapter(
        base, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    second = make_adapter(
        base, tmp_path / "a2", seed=2, r=6, lora_alpha=3, target_modules=["v_proj", "down_proj"]
    )
    summary = merge_checkpoint(
        MergeRequest(base, [first, second], tmp_path / "out", weights=[0.7, -0.3], verify=True)
    )
    ours = read_all(tmp_path / "out")
    original = read_all(base)
    one, _ = peft_merged(base, first)
    two, _ = peft_merged(base, second)
    for name, tensor in ours.items():
        expected = original[name].double()
        expected = expected + 0.7 * (one[name].double() - expected) - 0.3 * (two[name].double() - expected)
        assert relative_error(tensor, expected) <= FP32_RTOL, name
    assert [a.modules_merged for a in summary.adapters] == [4, 4]


def test_subtract_is_the_inverse_of_a_plain_merge(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "merged", precise=True))
    merge_checkpoint(
        MergeRequest(tmp_path / "merged", [adapter], tmp_path / "back", subtract=True, precise=True)
    )
    original, back = read_all(base), read_all(tmp_path / "back")
    for name, tensor in original.items():
        assert relative_error(back[name], tensor) <= 1e-6, name  # fp32 rounding of W + ΔW only


def test_subtract_is_refused_for_dora(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(
        base, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]
    )
    with pytest.raises(UnsupportedError, match="--subtract is refused for DoRA"):
        merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out", subtract=True))
    assert not (tmp_path / "out").exists()


def test_conflicting_modules_to_save_are_refused(bases, tmp_path):
    base = bases("llama")
    first = make_adapter(
        base, tmp_path / "a1", seed=1, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    second = make_adapter(
        base, tmp_path / "a2", seed=2, r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(MismatchError, match="both replace lm_head.weight"):
        merge_checkpoint(MergeRequest(base, [first, second], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dtype_and_max_shard_size(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    summary = merge_checkpoint(
        MergeRequest(base, [adapter], tmp_path / "out", dtype="bf16", max_shard_bytes=20_000)
    )
    assert len(summary.files) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ours = read_all(tmp_path / "out")
    reference, _ = peft_merged(base, adapter)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name  # one rounding of the fp32 merge
    config = config_of(tmp_path / "out")
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert summary.config_changes


def test_merged_folder_loads_in_transformers_with_the_adapted_logits(bases, tmp_path):
    base = bases("llama")
    assert (base / "generation_config.json").is_file()  # so that its copy below is checked
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out"))
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        adapted = PeftModel.from_pretrained(load(base), str(adapter)).eval()
        difference = (merged(tokens).logits - adapted(tokens).logits).abs().max()
    assert float(difference) < 1e-4
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (
        base / "generation_config.json"
    ).read_bytes()


def test_verify_fails_when_the_merge_is_wrong(bases, tmp_path, monkeypatch):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    original = kernels.merge_weight

    def wrong(weight, updates, **kwargs):  # drop the adapter's sign: a plausible bug
        for update in updates:
            update.weight = -update.weight
        return original(weight, updates, **kwargs)

    monkeypatch.setattr(kernels, "merge_weight", wrong)
    with pytest.raises(VerificationError, match="differ from base \\+ adapters by up to"):
        merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out", verify=True))
    assert not (tmp_path / "out").exists()


def test_nonfinite_results_name_the_module(bases, tmp_path):
    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    big = math.inf
    update = Update(
        "model.layers.0.self_attn.q_proj", "linear", torch.ones(4, 32), torch.full((32, 4), big), 1.0
    )
    with pytest.raises(NonFiniteError, match="model.layers.0.self_attn.q_proj"):
        merge_weight(torch.zeros(32, 32), [update], out_dtype=torch.float32, name="w")
    out = merge_weight(torch.zeros(32, 32), [update], out_dtype=torch.float32, allow_nonfinite=True)
    assert not torch.isfinite(out).any()
    assert adapter.exists()


def test_tied_lm_head_lora_writes_both_and_unties(bases, tmp_path):
    base = bases("llama-tied")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head"])
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out", verify=True))
    ours = read_all(tmp_path / "out")
    reference, _ = peft_merged(base, adapter, untie=True)
    assert_matches(ours, reference)
    embedding = read_all(base)["model.embed_tokens.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"], embedding)  # copied, not changed
    assert not torch.equal(ours["lm_head.weight"], embedding)
    assert config_of(tmp_path / "out")["tie_word_embeddings"] is False
    assert summary.config_changes == {"tie_word_embeddings": False}


def test_verify_passes_on_bf16(bases, tmp_path):
    base = bases("llama-bf16")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    summary = merge_checkpoint(MergeRequest(base, [adapter], tmp_path / "out", verify=True))
    assert summary.verified
    # What verify measured is bf16 rounding (> 0), far below the adapter's own effect on the logits,
    # so a merge that dropped or flipped the adapter could not pass it.
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = load(base, dtype=torch.float32)(tokens).logits
        adapted = PeftModel.from_pretrained(load(base, dtype=torch.float32), str(adapter))(tokens).logits
    effect = float((adapted - plain).abs().max())
    assert 0 < summary.max_logit_difference < 0.1 * effect, (summary.max_logit_difference, effect)


@pytest.mark.slow
def test_peak_memory_is_a_few_largest_tensors(tmp_path, monkeypatch):
    """A merge in a fresh process: peak RSS above the bare interpreter stays within 4 × the largest
    tensor (plus allocator slack) on a 380 MB checkpoint whose largest tensor is 16 MB. The model's
    skeleton is cached beforehand: its one-time build runs in a child that imports transformers."""
    import subprocess
    import sys

    from lorasurgery.io import SafetensorsWriter, TensorSpec, plan_shards

    config = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    specs = [TensorSpec(name, "F32", shape) for name, shape in shapes.items()]
    (tmp_path / "base").mkdir()
    generator = torch.Generator().manual_seed(0)
    with SafetensorsWriter(tmp_path / "base", plan_shards(specs)) as writer:
        for spec in specs:
            writer.write(spec.name, torch.randn(spec.shape, generator=generator) * 0.02)
    config.save_pretrained(tmp_path / "base")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config)
    peft_model = get_peft_model(meta, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    for module in peft_model.modules():
        for part in ("lora_A", "lora_B"):
            layers = getattr(module, part, None)
            if isinstance(layers, torch.nn.ModuleDict) and "default" in layers:
                shape = layers["default"].weight.shape
                layers["default"].weight = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    largest = max(t.nbytes for t in open_checkpoint(tmp_path / "base").tensors.values())
    total = open_checkpoint(tmp_path / "base").total_bytes
    assert total > 20 * largest
    monkeypatch.setenv("LORASURGERY_CACHE", str(tmp_path / "cache"))
    assert structure_of(open_checkpoint(tmp_path / "base")).known  # cached for the child below

    def peak(code: str, *args) -> int:
        wrapper = (
            "import resource, subprocess, sys;"
            "subprocess.run(sys.argv[1:], check=True);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
        )
        out = subprocess.run(
            [sys.executable, "-c", wrapper, sys.executable, "-c", code, *map(str, args)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.split()[-1])

    bare = peak(
        "import torch, lorasurgery.cli, lorasurgery.commands.merge, lorasurgery.adapter; torch.ones(9)"
    )
    merged = peak(
        "import sys; from lorasurgery.cli import main; sys.argv[0] = 'lorasurgery'; main()",
        "--quiet",
        "merge",
        tmp_path / "base",
        adapter,
        "-o",
        tmp_path / "out",
    )
    assert merged - bare <= 4 * largest + 32 * 2**20, (merged - bare, largest, total)


def peft_merged_together(base_folder, adapters) -> dict:
    """PEFT's merge_and_unload() with every adapter loaded and active, in the given order."""
    model = PeftModel.from_pretrained(load(base_folder), str(adapters[0]), adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(str(adapter), adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("dora_first", [True, False], ids=["dora-first", "dora-last"])
def test_dora_and_plain_lora_on_one_weight_merge_in_order_as_peft(bases, tmp_path, dora_first):
    """PEFT merges (and runs) active adapters in order; a DoRA rescales what came before it.
    --verify compares with PEFT's forward with both adapters active, in the same order."""
    base = bases("llama")
    dora = make_adapter(
        base, tmp_path / "dora", seed=3, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]
    )
    plain = make_adapter(
        base, tmp_path / "plain", seed=4, r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"]
    )
    adapters = [dora, plain] if dora_first else [plain, dora]
    summary = merge_checkpoint(MergeRequest(base, adapters, tmp_path / "out", verify=True))
    assert summary.verified and summary.max_logit_difference < 1e-4
    assert_matches(read_all(tmp_path / "out"), peft_merged_together(base, adapters))


def test_pytorch_bin_base_gives_safetensors(bases, tmp_path):
    base = bases("llama")
    state = read_all(base)
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_bytes((base / "config.json").read_bytes())
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    merge_checkpoint(MergeRequest(tmp_path / "bin", [adapter], tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    reference, _ = peft_merged(base, adapter)
    assert_matches(read_all(tmp_path / "out"), reference)


def test_weighted_adapters_match_the_factories_peft_reference(
    llama_base, llama_lora_qv, llama_dora, tmp_path
):
    """tests/factories.py's reference merges each adapter in turn into the model merged so far, its
    scaling × weight. With the DoRA adapter first that is exactly one merge of both; with it last,
    its norm would come from the already merged W: that is chaining two merges, not one."""
    from factories import peft_merged_state_dict

    together = merge_checkpoint(
        MergeRequest(
            llama_base, [llama_dora, llama_lora_qv], tmp_path / "both", weights=[1.4, 0.6], verify=True
        )
    )
    assert together.verified and together.max_logit_difference < 1e-4
    reference = peft_merged_state_dict(llama_base, [llama_dora, llama_lora_qv], weights=[1.4, 0.6])
    assert_matches(read_all(tmp_path / "both"), reference)

    merge_checkpoint(MergeRequest(llama_base, [llama_lora_qv], tmp_path / "first", weights=[0.6]))
    merge_checkpoint(MergeRequest(tmp_path / "first", [llama_dora], tmp_path / "chained", weights=[1.4]))
    reference = peft_merged_state_dict(llama_base, [llama_lora_qv, llama_dora], weights=[0.6, 1.4])
    assert_matches(read_all(tmp_path / "chained"), reference)
    # one merge of both in this order is what PEFT runs with both adapters active (--verify)
    summary = merge_checkpoint(
        MergeRequest(
            llama_base, [llama_lora_qv, llama_dora], tmp_path / "one", weights=[0.6, 1.4], verify=True
        )
    )
    assert summary.verified and summary.max_logit_difference < 1e-4
