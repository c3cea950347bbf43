"""Builders for the PEFT-matrix test: small models, PEFT-made adapters and PEFT's own merge of them.

The cases follow the LoRA configurations of PEFT's own test matrix (its custom small models: an MLP,
Embedding + transformers Conv1D, Conv1d/2d/3d, nn.MultiheadAttention, a module holding a bare
nn.Parameter) and the tiny transformers models users fine-tune (Llama, GPT-2 with Conv1D, BERT, MoE
models with fused expert parameters). Every adapter is made by PEFT (``get_peft_model``, a second one
with ``add_adapter``), every adapter parameter is randomised (PEFT starts lora_B at zero, which hides
layout bugs), and the reference is PEFT's ``merge_and_unload()`` of that very model.

The custom models have no config.json, exactly like a base saved as bare safetensors; the transformers
models are saved with ``save_pretrained`` (config.json included) and, where it matters, copied
without it. Bases are built once per session (`Bases`), adapters once per case.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from factories import randomize_adapter, relative_error  # noqa: F401 (relative_error: test_peft_matrix's too)
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------ custom models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)


class Block(nn.Module):
    """PEFT's DeepMLP block: two square Linear layers."""

    def __init__(self, size: int = 10):
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.lin1 = nn.Linear(size, size)


class DeepMLP(nn.Module):
    """PEFT's DeepMLP (its TestMultiRankAdapter model), 3 blocks instead of 12: square Linear layers
    of two names, which no shape tells from Conv1D."""

    def __init__(self, blocks: int = 3, size: int = 10):
        super().__init__()
        self.layers = nn.ModuleList([Block(size) for _ in range(blocks)])
        self.out = nn.Linear(size, 2)


class Mlp2xSameShape(nn.Module):
    """PEFT's MLP_2x_same_shape: lin1 and lin2 square and of one shape."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 20)
        self.lin3 = nn.Linear(20, 2)


class EmbConv1D(nn.Module):
    """An embedding and a transformers Conv1D (weight stored (in, out)) next to a Linear."""

    def __init__(self, square: bool = False):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(5, 5) if square else Conv1D(1, 5)  # Conv1D(nf=out, nx=in)
        self.lin0 = nn.Linear(10, 2) if not square else nn.Linear(5, 5)


class Conv1DThenSquareLinear(nn.Module):
    """A non-square transformers Conv1D, then a square Linear: PEFT saves the Linear's flag (false)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.conv1d = Conv1D(3, 5)  # weight (5, 3): (in, out)
        self.lin0 = nn.Linear(5, 5)


class ConvModel(nn.Module):
    """One ConvNd named conv1d/conv2d/conv3d, and a Linear lin0 after it."""

    def __init__(self, dims: int, cin: int, cout: int, kernel, groups: int = 1, lin=(10, 2)):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        setattr(self, f"conv{dims}d", conv(cin, cout, kernel, groups=groups))
        self.lin0 = nn.Linear(*lin)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)


class _LinearUsingParameter(nn.Module):
    """A layer whose weight is a bare nn.Parameter stored (in, out), reachable only by target_parameters."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_in, fan_out))
        self.bias = nn.Parameter(torch.ones(fan_out))


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20)
        self.lin1 = _LinearUsingParameter(20, 2)


class Experts(nn.Module):
    """Fused expert weights (num_experts, out, in), as MoE blocks keep them."""

    def __init__(self, experts: int = 3, hidden: int = 6, inner: int = 4):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))


class MoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()
        self.lin0 = nn.Linear(6, 6)


CUSTOM_MODELS = {
    "MLP": MLP,
    "DeepMLP": DeepMLP,
    "MLP_2x_same_shape": Mlp2xSameShape,
    "EmbConv1D": EmbConv1D,
    "EmbConv1DSquare": lambda: EmbConv1D(square=True),
    "Conv1DThenSquareLinear": Conv1DThenSquareLinear,
    "Conv1d": lambda: ConvModel(1, 1, 1, 2, lin=(9, 2)),
    "Conv1dKernel1": lambda: ConvModel(1, 3, 10, 1, lin=(100, 2)),
    "Conv2d": lambda: ConvModel(2, 5, 10, 3),
    "Conv2d1x1": lambda: ConvModel(2, 1, 10, (1, 1), lin=(90, 2)),
    "Conv2dGroups": lambda: ConvModel(2, 16, 16, 3, groups=8, lin=(16, 2)),
    "Conv2dGroups2": lambda: ConvModel(2, 16, 32, 3, groups=2, lin=(32, 2)),
    "Conv3d": lambda: ConvModel(3, 5, 10, 3),
    "Conv3d1x1": lambda: ConvModel(3, 5, 10, 1),
    "MHA": Mha,
    "MlpUsingParameters": MlpUsingParameters,
    "Moe": MoeBlock,
}


def _perturb(model: nn.Module, seed: int) -> None:
    """Every base parameter random (LayerNorm-like ones/zeros inits would hide replaced biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def build_custom(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = CUSTOM_MODELS[name]()
    _perturb(model, 1)
    return model.eval()


# ------------------------------------------------------------------------------ transformers models


def _tiny_transformers(kind: str):
    import transformers

    common = dict(vocab_size=64, max_position_embeddings=32, bos_token_id=None, eos_token_id=None)
    if kind in ("llama", "llama-tied"):
        config = transformers.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=kind == "llama-tied",
            pad_token_id=None,
            **common,
        )
        return transformers.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert-cls":
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
        return transformers.BertForSequenceClassification(config)
    if kind == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=None,
            **common,
        )
        return transformers.Qwen3MoeForCausalLM(config)
    if kind == "qwen2-moe":  # routed experts beside a shared expert (nn.Linear gate/up/down_proj)
        config = transformers.Qwen2MoeConfig(
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=None,
            **common,
        )
        return transformers.Qwen2MoeForCausalLM(config)
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=16,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=3,
            num_experts_per_tok=2,
            pad_token_id=None,
            **common,
        )
        return transformers.MixtralForCausalLM(config)
    if kind == "llama4":
        config = transformers.Llama4TextConfig(
            hidden_size=16,
            intermediate_size=8,
            intermediate_size_mlp=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=3,
            num_experts_per_tok=1,
            moe_layers=[0],
            pad_token_id=None,
            **common,
        )
        return transformers.Llama4ForCausalLM(config)
    if kind == "gpt-oss":
        config = transformers.GptOssConfig(
            hidden_size=16,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            pad_token_id=None,
            **common,
        )
        return transformers.GptOssForCausalLM(config)
    raise ValueError(kind)


TRANSFORMERS_MODELS = (
    "llama",
    "llama-tied",
    "gpt2",
    "bert-cls",
    "qwen3-moe",
    "qwen2-moe",
    "mixtral",
    "llama4",
    "gpt-oss",
)


def transformers_class(kind: str):
    return type(_tiny_transformers_cached(kind))


_CLASSES: dict = {}


def _tiny_transformers_cached(kind: str):
    if kind not in _CLASSES:
        torch.manual_seed(0)
        _CLASSES[kind] = _tiny_transformers(kind)
    return _CLASSES[kind]


# ------------------------------------------------------------------------------------------- bases


class Bases:
    """Base checkpoints built on first use, once per session: (model, dtype, with config.json)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.paths: dict[tuple, Path] = {}

    def get(self, model: str, dtype: str = "fp32", config_json: bool = True) -> Path:
        key = (model, dtype, config_json)
        if key in self.paths:
            return self.paths[key]
        folder = self.root / f"{model}-{dtype}{'' if config_json else '-noconfig'}"
        if model in CUSTOM_MODELS:
            from safetensors.torch import save_file

            folder.mkdir(parents=True)
            state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in build_custom(model).state_dict().items()}
            save_file(state, folder / "model.safetensors")
        elif not config_json:
            shutil.copytree(self.get(model, dtype, True), folder)
            (folder / "config.json").unlink()
        else:
            torch.manual_seed(0)
            net = _tiny_transformers(model)
            _perturb(net, 1)
            with _quiet():
                net.to(DTYPES[dtype]).save_pretrained(folder)
        self.paths[key] = folder
        return folder

    def load(self, model: str, dtype: str = "fp32", as_dtype: torch.dtype | None = None) -> nn.Module:
        """A fresh module holding the base's weights (optionally cast, e.g. to float64)."""
        folder = self.get(model, dtype, True)
        if model in CUSTOM_MODELS:
            from safetensors.torch import load_file

            net = CUSTOM_MODELS[model]() if model != "EmbConv1DSquare" else EmbConv1D(square=True)
            net = net.to(DTYPES[dtype])
            net.load_state_dict(load_file(folder / "model.safetensors"))
        else:
            with _quiet():
                net = transformers_class(model).from_pretrained(folder, dtype=DTYPES[dtype])
        if as_dtype is not None:
            net = net.to(as_dtype)
        return net.eval()


# ------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a base, one or two LoRA configs, and what lorasurgery must do.

    expect "merge": equal to PEFT's merge_and_unload. "refuse": exit 1 with `refusal` in the message
    (research variants, and what PEFT itself does not merge). "resolve": refused with `refusal`
    naming how to resolve it, then merged with `option` added, equal to PEFT. "assume": a base
    without config.json whose square layers the adapter's flag describes wrongly: merged with the
    layout assumed from the flag, the merge's --json naming module `assumed` among its assumptions,
    then merged with `option` added, equal to PEFT."""

    id: str
    model: str
    lora: dict
    second: dict | None = None  # a second adapter, added with add_adapter and merged together
    dtype: str = "fp32"
    config_json: bool = True  # transformers bases only; custom models never have one
    expect: str = "merge"
    refusal: str = ""
    assumed: str = ""  # expect "assume": a module whose layout the merge says it assumed
    option: tuple = ()
    forward_input: tuple = ()  # where PEFT cannot merge: compare layer outputs on inputs of this shape
    untie_first: bool = False  # the reference unties the embeddings before PEFT merges (see below)


def lora_config(kwargs: dict):
    import peft

    kwargs = dict(kwargs)
    for name, cls in (
        ("velora_config", peft.VeloraConfig),
        ("kasa_config", peft.KasaConfig),
        ("monteclora_config", peft.MontecloraConfig),
    ):
        if name in kwargs and isinstance(kwargs[name], dict):
            kwargs[name] = cls(**kwargs[name])
    if isinstance(kwargs.get("use_bdlora"), dict):
        from peft.tuners.lora.config import BdLoraConfig

        kwargs["use_bdlora"] = BdLoraConfig(**kwargs["use_bdlora"])
    return peft.LoraConfig(**kwargs)


def make_peft(bases: Bases, case: Case, out: Path, *, seed: int = 0):
    """PEFT's model for `case` (randomised, saved to `out`) and its merge_and_unload() state dict.

    Returns (adapter folders, the PEFT model before merging, PEFT's merged state dict or None when
    PEFT refuses to merge)."""
    import peft

    model = bases.load(case.model, case.dtype)
    if case.untie_first:  # PEFT's advice for a LoRA on one side of tied embeddings: untie, then merge
        model.config.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    torch.manual_seed(seed)
    with _quiet():
        wrapped = peft.get_peft_model(model, lora_config(case.lora))
        if case.second is not None:
            wrapped.add_adapter("other", lora_config(case.second))
    # every factor drawn anew (lora_A too), larger than make_adapter's: the matrix's settings
    randomize_adapter(wrapped, seed, std=0.2, a_std=0.2, magnitude=0.05, other=0.1)
    with _quiet():
        wrapped.save_pretrained(out)
    folders = [out] + ([out / "other"] if case.second is not None else [])
    unmerged = copy.deepcopy(wrapped)
    names = ["default"] + (["other"] if case.second is not None else [])
    try:
        with _quiet(), torch.no_grad():
            merged = wrapped.merge_and_unload(adapter_names=names)
    except (NotImplementedError, RuntimeError, ValueError):  # PEFT cannot merge it
        return folders, unmerged, None
    return folders, unmerged, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def float64_merge(bases: Bases, case: Case, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """The exact merge: the half-precision base widened to float64, the saved adapters merged by PEFT."""
    import peft

    model = bases.load(case.model, case.dtype, as_dtype=torch.float64)
    with _quiet():
        wrapped = peft.PeftModel.from_pretrained(model, str(adapters[0]), autocast_adapter_dtype=False)
        names = ["default"]
        if len(adapters) > 1:
            wrapped.load_adapter(str(adapters[1]), adapter_name="other", autocast_adapter_dtype=False)
            names.append("other")
        wrapped = wrapped.to(torch.float64)
        with torch.no_grad():
            merged = wrapped.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def layers_differing(unmerged, ours: dict, shape: tuple, tolerance: float = 1e-5) -> list[str]:
    """Where PEFT cannot merge: each adapted layer's PEFT forward against the same layer holding
    lorasurgery's merged weights, on a random input of `shape`. Returns the layers that differ."""
    from peft.tuners.lora import LoraLayer

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    wrong = []
    for name, module in unmerged.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        path = name.removeprefix("base_model.model.")
        params = {p: ours[f"{path}.{p}"] for p, _ in base.named_parameters()}
        with torch.no_grad():
            expected = module(x)
            got = torch.func.functional_call(base, params, (x,))
        if relative_error(got, expected) > tolerance:
            wrong.append(path)
    return wrong


def read_output(bases: Bases, case: Case, folder: Path) -> dict[str, torch.Tensor]:
    """lorasurgery's output as a state dict under the model's own names: the safetensors file of a
    custom model, or what transformers loads from the folder (fused experts, untied pairs)."""
    if case.model in CUSTOM_MODELS:
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if not (folder / "config.json").exists():  # a base without config.json: take the base's
        shutil.copy(bases.get(case.model, case.dtype, True) / "config.json", folder / "config.json")
    with _quiet():
        net = transformers_class(case.model).from_pretrained(folder, dtype=DTYPES[case.dtype])
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


def _quiet():
    import contextlib
    import io
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack
