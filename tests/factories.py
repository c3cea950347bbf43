"""Builders of tiny real checkpoints and real PEFT adapters for tests: seeded, deterministic, < 1 s each.

Bases are real transformers models saved with ``save_pretrained``; adapters are made by PEFT itself
(``get_peft_model`` + ``save_pretrained``) and then randomized so that ΔW ≠ 0 (PEFT initialises
``lora_B`` and, for embeddings, ``lora_embedding_A`` to zero). The references a test compares against
come from PEFT too: ``peft_merged_state_dict`` (``merge_and_unload``) and ``peft_delta_weights``
(``LoraLayer.get_delta_weight`` and ``scaling``).

    from factories import make_llama, make_adapter, peft_merged_state_dict
    base = make_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"], r=4)
    expected = peft_merged_state_dict(base, [adapter], model_kind="llama")
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PREFIX = "base_model.model."
MODEL_KINDS = ("llama", "gpt2", "bert", "bert-cls", "bert-mlm", "auto")


# --------------------------------------------------------------------------------------------- bases


def _perturb_norms(model: torch.nn.Module, generator: torch.Generator, names: Iterable[str]) -> None:
    """Move norm weights/biases off their all-ones/all-zeros init, so merges are checked on real values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(n in name for n in names):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_((0.1 * noise).to(parameter.dtype))


def _save(model, path: Path, dtype: torch.dtype, max_shard_size: str | int | None) -> Path:
    path = Path(path)
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with _quiet():
        model.save_pretrained(path, **kwargs)
    return path


def make_llama(
    path,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    attention_bias: bool = False,
) -> Path:
    """A tiny ``LlamaForCausalLM`` (GQA 4/2 heads, intermediate 2·hidden, RMSNorm weights ≠ 1) at `path`.

    A small `max_shard_size` such as ``"20KB"`` gives ``model.safetensors.index.json`` plus shards.
    `attention_bias` gives q/k/v/o biases (Llama has none by default; ``lora_bias=True`` needs them).
    """
    import transformers

    torch.manual_seed(seed)
    config = _decoder_config(
        transformers.LlamaConfig,
        vocab_size,
        hidden_size,
        layers,
        tie_word_embeddings,
        attention_bias=attention_bias,
    )
    model = transformers.LlamaForCausalLM(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["norm"])
    return _save(model, path, dtype, max_shard_size)


def _decoder_config(config_class, vocab_size, hidden_size, layers, tie_word_embeddings, **extra):
    """The tiny decoders' shared shape: GQA 4/2 heads, intermediate 2·hidden, 64 positions, no
    bos/eos/pad token ids."""
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **extra,
    )


CAUSAL_LM_KINDS = ("qwen2", "qwen3", "mistral", "phi3")


def make_causal_lm(
    path,
    kind: str,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny decoder of another family than Llama at `path`: ``Qwen2ForCausalLM`` (q/k/v biases),
    ``Qwen3ForCausalLM`` (q_norm/k_norm, head_dim 8), ``MistralForCausalLM`` or ``Phi3ForCausalLM``
    (fused qkv_proj and gate_up_proj); GQA 4/2 heads, intermediate 2·hidden, norm weights and
    biases randomised. Load it with ``model_kind="auto"``."""
    import transformers

    torch.manual_seed(seed)
    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }
    config_class, model_class_ = classes[kind]
    config = _decoder_config(
        config_class,
        vocab_size,
        hidden_size,
        layers,
        tie_word_embeddings,
        **({"head_dim": hidden_size // 4} if kind == "qwen3" else {}),
    )
    model = model_class_(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["norm", ".bias"])
    return _save(model, path, dtype, None)


def save_tiny_tokenizer(path, vocab_size: int = 128) -> Path:
    """A Llama-style byte-fallback BPE tokenizer of `vocab_size` tokens (<unk>, <s>, </s>, then byte
    tokens) saved beside a tiny model at `path`, built in memory: llama.cpp's convert_hf_to_gguf.py
    needs a tokenizer to convert a model (its LlamaHfVocab branch)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(vocab_size - len(vocab)):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(Path(path))
    return Path(path)


def make_gpt2(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny ``GPT2LMHeadModel`` (Conv1D c_attn/c_proj/c_fc, lm_head tied to wte, LayerNorms ≠ 1/0)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["ln_"])
    return _save(model, path, dtype, max_shard_size)


def make_bert(
    path,
    *,
    head: bool | str = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny ``BertModel``, or with `head` a ``BertForSequenceClassification`` (tensors under ``bert.``,
    plus ``classifier``; 2 labels), or with ``head="mlm"`` a ``BertForMaskedLM`` (``bert.`` and a
    ``cls`` head tied to the word embeddings). LayerNorm weights and biases randomized."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        num_labels=2,
    )
    cls = {"mlm": transformers.BertForMaskedLM, True: transformers.BertForSequenceClassification}.get(
        head, transformers.BertModel
    )
    model = cls(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["LayerNorm"])
    return _save(model, path, dtype, max_shard_size)


def make_gpt_oss(
    path,
    *,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
    experts: int = 4,
    seed: int = 0,
) -> Path:
    """A tiny ``GptOssForCausalLM`` (1 layer, `experts` experts with fused ``gate_up_proj`` (E, hidden,
    2·inner) and ``down_proj`` (E, inner, hidden) parameters, biases and sinks). `hidden_size` a
    multiple of 32 lets its experts be stored as MXFP4 (32-value blocks) as gpt-oss ships them."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.GptOssForCausalLM(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["norm"])
    return _save(model, path, dtype, None)


# ------------------------------------------------------------------------------------------ adapters


def model_class(model_kind: str):
    """The transformers class of a `model_kind`: llama, gpt2, bert, bert-cls, bert-mlm."""
    import transformers

    classes = {
        "llama": transformers.LlamaForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertModel,
        "bert-cls": transformers.BertForSequenceClassification,
        "bert-mlm": transformers.BertForMaskedLM,
    }
    if model_kind not in classes:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, not {model_kind!r}")
    return classes[model_kind]


def load_base(base_path, model_kind: str = "llama", dtype="auto"):
    """The base model in eval mode, in the dtype it was saved in (or `dtype`). ``model_kind="auto"``
    loads the class its config.json names."""
    import transformers

    if model_kind == "auto":
        config = transformers.AutoConfig.from_pretrained(Path(base_path))
        cls = getattr(transformers, config.architectures[0])
    else:
        cls = model_class(model_kind)
    with _quiet():
        model = cls.from_pretrained(Path(base_path), dtype=dtype)
    return model.eval()


def randomize_adapter(
    model,
    seed: int = 0,
    std: float = 0.05,
    *,
    a_std: float | None = None,
    magnitude: float = 0.03,
    other: float = 0.02,
) -> None:
    """Make a fresh PEFT model's adapter non-trivial, deterministically (in `named_parameters` order):
    the tests' one randomiser.

    - every ``lora_B`` weight/bias and ``lora_embedding_A``/``lora_embedding_B``: N(0, std²)
      (PEFT zero-initialises lora_B, lora_B.bias and lora_embedding_A); with `a_std`, every LoRA
      factor (lora_A too) is drawn anew from N(0, a_std²) instead;
    - ``lora_magnitude_vector`` (DoRA): scaled by 1 + N(0, magnitude²) per feature;
    - every other trainable non-LoRA parameter (modules_to_save copies — an inactive adapter's too —,
      trainable-token rows, biases of bias="all" / "lora_only"): plus N(0, other²).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            noise = noise.to(parameter.dtype)
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + magnitude * noise)
            elif a_std is not None and "lora_" in name:
                parameter.copy_(a_std * noise)
            elif ".lora_B." in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                parameter.copy_(std * noise)
            elif "lora_" not in name and (
                parameter.requires_grad or ".modules_to_save." in name or "trainable_tokens_delta" in name
            ):
                parameter.add_(other * noise)


# ------------------------------------------------------------------------------- in-memory models
# Tiny real transformers models built in memory (seeded, < 1 s each), and PEFT-made fine-tunes and
# adapters of them, for tests that need a model object rather than a folder.


def tiny_llama(tie: bool = False, vocab: int = 64, hidden: int = 32, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_bert(head: bool = False, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:  # not all ones/zeros: merges must be checked on real values
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def peft_finetune(model, seed: int = 1, **lora):
    """A fine-tune whose ΔW is exactly low rank: a randomized PEFT adapter, merged by PEFT."""
    import peft

    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    randomize_adapter(wrapped, seed=seed, std=0.1)
    return wrapped.merge_and_unload()


def peft_adapter(model, out, seed: int = 1, **lora):
    """A real PEFT adapter of an in-memory model saved to `out`, every zero-initialised factor randomized."""
    import peft

    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    randomize_adapter(wrapped, seed=seed, std=0.1)
    wrapped.save_pretrained(out)
    return wrapped


def make_adapter(
    base_path, out_path, *, model_kind: str = "llama", seed: int = 0, prepare=None, **lora_config_kwargs
) -> Path:
    """A real PEFT LoRA adapter of the base at `base_path`, saved to `out_path`, with ΔW ≠ 0.

    `lora_config_kwargs` go to ``peft.LoraConfig`` (target_modules defaults to q_proj/v_proj for llama,
    c_attn for gpt2, query/value for bert; fan_in_fan_out defaults to True for gpt2's Conv1D).
    `prepare(model)` runs on the base model first (e.g. ``resize_token_embeddings``).
    """
    import peft

    defaults = {
        "llama": {"target_modules": ["q_proj", "v_proj"]},
        "gpt2": {"target_modules": ["c_attn"], "fan_in_fan_out": True},
        "bert": {"target_modules": ["query", "value"]},
        "bert-cls": {"target_modules": ["query", "value"]},
    }
    kwargs = {**defaults.get(model_kind, {}), "r": 4, "lora_alpha": 8, **lora_config_kwargs}
    base = load_base(base_path, model_kind)
    if prepare is not None:
        prepare(base)
    torch.manual_seed(seed)  # lora_A's init
    with _quiet():
        model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    randomize_adapter(model, seed=seed)
    out_path = Path(out_path)
    with _quiet():
        model.save_pretrained(out_path)
    (out_path / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    return out_path


# ---------------------------------------------------------------------------------------- references


def peft_merged_state_dict(
    base_path,
    adapter_paths,
    *,
    model_kind: str = "llama",
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The reference merge, by PEFT: ``PeftModel.from_pretrained(base, a).merge_and_unload()``.

    Several adapters are applied one after the other, each on the model merged so far; adapter i's
    ``scaling["default"]`` is multiplied by ``weights[i]`` (default 1) in every LoRA layer before its
    merge, so plain LoRA gives W + Σ wᵢ·ΔWᵢ (and ``lora_bias`` b + Σ wᵢ·sᵢ·bᵢ); a DoRA adapter
    renormalises what was merged before it, as PEFT does; modules_to_save and saved biases replace.
    Returns the merged model's ``state_dict`` (cloned, base tensor names).
    """
    import peft
    from peft.tuners.lora import LoraLayer

    if isinstance(adapter_paths, (str, Path)):
        adapter_paths = [adapter_paths]
    weights = [1.0] * len(adapter_paths) if weights is None else list(weights)
    if len(weights) != len(adapter_paths):
        raise ValueError("one weight per adapter")
    model = load_base(base_path, model_kind)
    for adapter, weight in zip(adapter_paths, weights):
        with _quiet():
            wrapped = peft.PeftModel.from_pretrained(model, str(adapter))
        if weight != 1.0:
            for module in wrapped.modules():
                if isinstance(module, LoraLayer) and "default" in module.scaling:
                    module.scaling["default"] *= weight
        with _quiet():
            model = wrapped.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_checkpoint(
    base_path, adapter_path, out_path, dtype: torch.dtype = torch.bfloat16, model_kind: str = "llama"
) -> Path:
    """A full fine-tune as users store it: the base at `base_path` with the adapter merged by PEFT
    (``peft_merged_state_dict``), saved by transformers' ``save_pretrained`` in `dtype`."""
    model = load_base(base_path, model_kind)
    model.load_state_dict(peft_merged_state_dict(base_path, adapter_path, model_kind=model_kind))
    with _quiet():
        model.to(dtype).save_pretrained(Path(out_path))
    return Path(out_path)


def peft_delta_weights(
    base_path, adapter_path, *, model_kind: str = "llama"
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT's own ΔW and scale per LoRA module: ``({name: layer.get_delta_weight("default")},
    {name: layer.scaling["default"]})``, names without ``base_model.model.``
    (``model.layers.0.self_attn.q_proj``). ΔW is in the base weight's layout (Conv1D: in × out;
    embedding: num_embeddings × dim) and, for DoRA, is the plain s·BA without the magnitude."""
    import peft
    from peft.tuners.lora import LoraLayer

    model = load_base(base_path, model_kind)
    with _quiet():
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter_path))
    deltas, scales = {}, {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if "default" not in module.lora_A and "default" not in module.lora_embedding_A:
            continue
        name = name.removeprefix(PREFIX)
        with torch.no_grad():
            deltas[name] = module.get_delta_weight("default").detach().clone()
        scales[name] = float(module.scaling["default"])
    return deltas, scales


# ------------------------------------------------------------------------------------------- helpers


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ours − reference‖_F / ‖reference‖_F in float64 (a zero reference divides by 1e-30)."""
    difference = (ours.double() - reference.double()).norm()
    return float(difference / max(float(reference.double().norm()), 1e-30))


def silence_libraries() -> None:
    """Quiet transformers/huggingface_hub logging and progress bars. PEFT's own warnings (missing or
    unexpected keys, tied weights) are left alone: tests assert on them with ``warnings``."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


@contextlib.contextmanager
def _quiet():
    """Swallow the warnings and chatter PEFT/transformers emit while the factories build things."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


E4M3_MAX = 448.0  # the largest float8_e4m3fn value


def quantize_fp8(W: torch.Tensor, block, scale_dtype=torch.float32, ue8m0=False):
    """(e4m3 codes, weight_scale_inv) of W as transformers' fine-grained FP8 stores it: per block of `block` rows × columns (None: one scale),
    scale = amax/448, powers of two rounded up under ue8m0, codes = W / scale."""
    W = W.float()
    if block is None:
        scale = W.abs().amax().clamp_min(1e-12) / E4M3_MAX
        scale = scale.to(scale_dtype)
        return (W / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale
    rows, cols = block
    out, inner = W.shape
    grid = (-(-out // rows), -(-inner // cols))
    padded = torch.zeros(grid[0] * rows, grid[1] * cols)
    padded[:out, :inner] = W
    blocks = padded.reshape(grid[0], rows, grid[1], cols)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / E4M3_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(scale_dtype)
    codes = (blocks / scale.float()[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    codes = codes.reshape(padded.shape)[:out, :inner].to(torch.float8_e4m3fn)
    return codes, scale


E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between 0, ½, 1, 1½, 2, 3, 4, 6


def quantize_mxfp4(W: torch.Tensor):
    """(blocks, scales) of an expert parameter W (experts, in, out) as gpt-oss stores it: per output,
    blocks of 32 inputs; the scale byte e of a block is 2^(e − 127) = amax/6 rounded up to a power
    of two (triton_kernels' downcast_to_mxfp_torch, ROUND_UP, which transformers' quantize_to_mxfp4
    calls); each value / scale rounded to the nearest e2m1 (ties away from zero), sign in bit 3;
    two codes a byte, the first in the low nibble. blocks (E, out, in/32, 16) uint8, scales
    (E, out, in/32) uint8."""
    groups = W.float().transpose(-1, -2).reshape(*W.shape[:-2], W.shape[-1], -1, 32)
    dequant = groups.abs().amax(-1, keepdim=True) / 6.0
    bits = (dequant.view(torch.int32) + 0x007FFFFF) & 0x7F800000  # round the float up to 2^k
    scale = bits.view(torch.float32)
    scaled = groups * torch.where(scale == 0, 0.0, 1.0 / scale)
    magnitude = torch.bucketize(scaled.abs().contiguous(), torch.tensor(E2M1_MIDPOINTS), right=True)
    codes = (magnitude | (torch.signbit(scaled).to(torch.int64) << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (bits >> 23).squeeze(-1).to(torch.uint8)


def _weight_ranges(W: torch.Tensor, args):
    """(min, max) of W over each scale's reach, as llm-compressor's min-max observer sees a weight."""
    from compressed_tensors.quantization.utils.helpers import maybe_pad_tensor_for_block_quant

    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "tensor":
        return W.amin().reshape(1), W.amax().reshape(1)
    if strategy == "channel":
        return W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        groups = W.unflatten(-1, (-1, args.group_size))
        return groups.amin(-1), groups.amax(-1)
    if strategy == "block":  # padded with zeros, as the package pads, so edge blocks count 0 too
        rows, cols = args.block_structure
        blocks = maybe_pad_tensor_for_block_quant(W, args.block_structure)
        blocks = blocks.unflatten(0, (-1, rows)).unflatten(-1, (-1, cols))
        return blocks.amin((1, 3)), blocks.amax((1, 3))
    raise ValueError(f"no ranges for strategy {strategy!r}")


def quantize_compressed(
    plain, folder, weights: dict | None = None, input_activations: dict | None = None, groups=None
) -> Path:
    """`plain` quantized by compressed-tensors' own tools and saved as llm-compressor saves it.

    One config group targets every Linear but lm_head (`apply_quantization_config`), or `groups`
    ({name: {"targets": […], "weights": {…}, "input_activations": {…}}}, a format per group: what
    the package saves as "mixed-precision"); each weight's
    scale (and zero point, global scale) comes from the package's `calculate_qparams` /
    `generate_gparam` over the weight's min and max; `ModelCompressor.compress_model` writes the
    codes in the format the package infers (float-, int-, pack-, nvfp4-pack-quantized) and
    `update_config` the quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model = load_base(plain)
    if groups is None:
        groups = {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": input_activations}
        }
    schemes = {
        name: QuantizationScheme(
            targets=group["targets"],
            weights=QuantizationArgs(**group["weights"]),
            input_activations=(
                None
                if group.get("input_activations") is None
                else QuantizationArgs(**group["input_activations"])
            ),
        )
        for name, group in groups.items()
    }
    with _quiet():
        apply_quantization_config(model, QuantizationConfig(config_groups=schemes, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            W, args = module.weight.detach(), scheme.weights
            global_scale = None
            if hasattr(module, "weight_global_scale"):  # NVFP4: one float32 scale over the group scales
                global_scale = generate_gparam(W.amin(), W.amax())
                module.weight_global_scale.copy_(global_scale)
            scale, zero_point = calculate_qparams(*_weight_ranges(W, args), args, global_scale=global_scale)
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point)
        compressor = ModelCompressor.from_pretrained_model(model)
        with _quiet():
            compressor.compress_model(model)
            model.save_pretrained(folder)
        compressor.update_config(folder)
    return Path(folder)


def bnb_reference_decode() -> bool:
    """Route bitsandbytes' CPU `dequantize_4bit` to its own reference code (the generic path it uses
    without its native library) where its native CPU kernel disagrees with that code; True if it did.

    bitsandbytes 0.50.2's native CPU kernel decodes a weight whose rows are not a whole number of
    blocks with blocks that restart at each row, while its quantize_4bit (and its reference decode,
    CUDA's, ours) counts blocks over the flattened tensor: measured, a 40×80 NF4 weight (blocks of 64)
    decodes with relative error 0.27 instead of 0.09 (docs/quantized.md, "bitsandbytes on the CPU").
    Whether the native kernel loads depends on the machine, so the oracles the bnb tests compare
    against (dequantize_4bit, transformers' dequantize_bnb_weight, PEFT's merge into Linear4bit) are
    bitsandbytes' reference arithmetic on every machine (with FP4's code 0b1000 decoded to −0.0, as
    its CUDA and CPU kernels do). Process-wide, once."""
    global _BNB_REFERENCE
    if _BNB_REFERENCE is None:
        import bitsandbytes.functional as F
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        def reference(A, absmax, blocksize, quant_type, shape, dtype):
            A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
            code = _get_4bit_code(quant_type, A.device)
            if quant_type == "fp4":  # its kernels decode code 0b1000 to −0.0, its table says +0.0
                code = code.clone().index_fill_(0, torch.tensor([8]), -0.0)
            return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

        probe = torch.linspace(-1, 1, 40 * 80).reshape(40, 80).sin()
        packed, state = F.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        expected = reference(packed, state.absmax, 64, "nf4", (40, 80), torch.float32)
        _BNB_REFERENCE = not torch.equal(F.dequantize_4bit(packed, state), expected)
        if _BNB_REFERENCE:
            with warnings.catch_warnings():  # "Overriding a previously registered kernel"
                warnings.simplefilter("ignore")
                torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", reference)
    return _BNB_REFERENCE


_BNB_REFERENCE: bool | None = None


def quantize_bnb(base_path, out_path, **bnb_config) -> Path:
    """The model at `base_path` loaded by transformers with ``BitsAndBytesConfig(**bnb_config)`` on the
    CPU (bitsandbytes quantizes it as it loads) and saved with ``save_pretrained``: the real
    serialized bitsandbytes layout, quantization_config included. ``load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True`` is a QLoRA "bnb-4bit" base;
    ``load_in_8bit=True`` LLM.int8()."""
    import transformers

    bnb_reference_decode()
    config = transformers.BitsAndBytesConfig(**bnb_config)
    with _quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            Path(base_path), quantization_config=config, device_map="cpu", dtype="auto"
        )
        model.save_pretrained(Path(out_path))
    return Path(out_path)


# ------------------------------------------------------------------------------------------ MoE
# Tiny transformers-5 MoE models (fused 3-D expert parameters) and their transformers-4.x-style twins
# (one nn.Linear per expert and projection, holding the same weights): the oracle a per-expert adapter
# runs on in PEFT. transformers 4.x and most trainers keep one nn.Linear per expert and projection, and
# their LoRA adapters name those. The fused → per-expert split (_expert_weights) is written here
# independently of lorasurgery/model/experts.py: Qwen3-MoE and Mixtral concatenate gate (w1) before up
# (w3) along the output rows of gate_up_proj (E, 2·inner, hidden); gpt-oss stores gate_up_proj
# (E, hidden, 2·inner) with gate and up interleaved (gate = [..., ::2], up = [..., 1::2], as
# GptOssExperts' forward). PerExpertExperts is the one per-expert experts module: per_expert_twin
# puts it in a runnable copy of the model, per_expert_model under 4.x names in a tree of Linears.

MOE_KINDS = ("qwen3-moe", "mixtral", "gpt-oss")
PER_EXPERT_NAMES = {  # model kind -> (MoE block's name, gate, up, down) as 4.x / trainers name them
    "qwen3-moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen2-moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "gpt-oss": ("mlp", "gate_proj", "up_proj", "down_proj"),
    # Unsloth's gpt-oss: per expert one Linear (hidden → 2·inner) whose outputs keep gate/up
    # interleaved (its forward splits gate_up[..., ::2], gate_up[..., 1::2]), and one for down
    "gpt-oss-unsloth": ("mlp", "gate_up_projs", None, "down_projs"),
}


def _expert_weights(kind: str, experts_module) -> list[dict[str, torch.Tensor]]:
    """[{gate, up, down: (out, in) nn.Linear weights}] per expert of a transformers-5 experts module."""
    gate_up, down = experts_module.gate_up_proj.detach(), experts_module.down_proj.detach()
    if kind == "gpt-oss-unsloth":
        return [{"gate": gate_up[e].T, "down": down[e].T} for e in range(gate_up.shape[0])]
    if kind == "gpt-oss":  # (E, hidden, 2·inner) interleaved; down (E, inner, hidden)
        return [
            {"gate": gate_up[e][:, ::2].T, "up": gate_up[e][:, 1::2].T, "down": down[e].T}
            for e in range(gate_up.shape[0])
        ]
    inner = gate_up.shape[1] // 2  # (E, 2·inner, hidden): gate rows first; down (E, hidden, inner)
    return [
        {"gate": gate_up[e][:inner], "up": gate_up[e][inner:], "down": down[e]}
        for e in range(gate_up.shape[0])
    ]


# per-expert projection names (gate, up, down) of each kind whose 4.x experts are `{e}.<proj>`
MOE_NAMES = {kind: names[1:] for kind, names in PER_EXPERT_NAMES.items() if names[2] is not None}


def tiny_moe(kind: str, seed: int = 0):
    """A tiny transformers MoE causal LM (1 layer) of `kind` (MOE_KINDS), seeded."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    if kind == "qwen2-moe":  # routed experts fused, plus a shared expert (a plain MLP) beside them
        config = transformers.Qwen2MoeConfig(
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            **common,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif kind == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, **common
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif kind == "mixtral":
        config = transformers.MixtralConfig(
            intermediate_size=8, num_local_experts=3, num_experts_per_tok=2, **common
        )
        model = transformers.MixtralForCausalLM(config)
    elif kind == "gpt-oss":
        config = transformers.GptOssConfig(
            intermediate_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
        model = transformers.GptOssForCausalLM(config)
    else:
        raise ValueError(kind)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), ["norm", "bias"])
    return model.eval()


class _Expert(torch.nn.Module):
    def __init__(self, names, gate, up, down, gpt_oss=None):
        super().__init__()
        self.names, self.gpt_oss = names, gpt_oss
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        if self.gpt_oss is None:
            act = self.act
            return down(act(gate(x)) * up(x))
        alpha, limit = self.gpt_oss  # GptOssExperts._apply_gate
        g, u = gate(x).clamp(max=limit), up(x).clamp(min=-limit, max=limit)
        return down((u + 1) * (g * torch.sigmoid(g * alpha)))


class PerExpertExperts(torch.nn.ModuleList):
    """A transformers-5 experts module as transformers 4.x built it: `{e}.<gate/up/down>` nn.Linear
    per expert with the fused parameters' weights (gpt-oss: gate the even, up the odd outputs of
    gate_up_proj (E, in, 2I), biases kept), routed like the original's forward."""

    def __init__(self, fused, kind: str):
        gpt_oss = kind == "gpt-oss"
        names = MOE_NAMES[kind]
        experts = []
        for e, weights in enumerate(_expert_weights(kind, fused)):  # the one fused → per-expert split
            biases = [None] * 3
            if gpt_oss:  # gate_up_proj_bias interleaved like gate_up_proj's outputs
                b = fused.gate_up_proj_bias[e].detach()
                biases = [b[0::2], b[1::2], fused.down_proj_bias[e].detach()]
            parts = zip((weights["gate"], weights["up"], weights["down"]), biases)
            linears = []
            for weight, bias in parts:
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if bias is not None:
                        linear.bias.copy_(bias)
                linears.append(linear)
            expert = _Expert(names, *linears, gpt_oss=(fused.alpha, fused.limit) if gpt_oss else None)
            if not gpt_oss:
                expert.act = fused.act_fn
            experts.append(expert)
        super().__init__(experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, position = torch.where(top_k_index == e)
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, position, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def per_expert_twin(model, kind: str):
    """A copy of transformers-5 MoE `model` whose every experts module is a PerExpertExperts. Its
    config's model_type is renamed so that PEFT does not convert a LoRA of its per-expert modules into
    the fused layout while creating it (peft/utils/transformers_weight_conversion.py does that for
    the model types transformers 5 fused)."""
    import copy

    twin = copy.deepcopy(model)
    twin.config.model_type = f"{model.config.model_type}-per-expert"
    for name, module in list(twin.named_modules()):
        if name.endswith("mlp.experts"):
            parent = twin.get_submodule(name.rpartition(".")[0])
            parent.experts = PerExpertExperts(module, kind)
    return twin.eval()


def per_expert_model(kind: str, model) -> torch.nn.Module:
    """A module tree holding, under 4.x names (`model.layers.{i}.<block>.experts.{e}.<proj>`, Mixtral's
    block_sparse_moe, Unsloth's gpt-oss `experts.gate_up_projs.{e}`), the PerExpertExperts of
    transformers-5 `model`'s fused experts, plus every other nn.Linear of `model` (attention, shared
    experts) under its own name: what a 4.x-named adapter's keys address (not a runnable model; the
    runnable one is per_expert_twin)."""
    block, gate, up, down = PER_EXPERT_NAMES[kind]
    root = torch.nn.Module()

    def place(path: str, module: torch.nn.Module) -> None:
        parent = root
        *parents, leaf_name = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.ModuleDict() if part.isdigit() else torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf_name, module)

    def linear(weight: torch.Tensor) -> torch.nn.Linear:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        layer.weight.data.copy_(weight)
        return layer

    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.nn.Parameter):
            layer = name.rsplit(".experts", 1)[0].rsplit(".", 1)[0]  # model.layers.{i}
            if up is None:  # Unsloth's: experts.gate_up_projs.{e}, experts.down_projs.{e}
                weights = _expert_weights(kind, module)
                experts = torch.nn.Module()
                experts.add_module(gate, torch.nn.ModuleList([linear(w["gate"]) for w in weights]))
                experts.add_module(down, torch.nn.ModuleList([linear(w["down"]) for w in weights]))
                place(f"{layer}.{block}.experts", experts)
                continue
            experts = PerExpertExperts(module, kind)  # the twin's experts, under 4.x's block name
            place(f"{layer}.{block}.experts", experts)
        elif isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            place(name, linear(module.weight.detach()))
    return root


def fused_state(kind: str, model, per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 `model`'s state dict with its fused experts rebuilt from the per-expert weights
    `per_expert` (a per_expert_model's state dict, e.g. merged by PEFT), the inverse of _expert_weights."""
    block, gate, up, down = PER_EXPERT_NAMES[kind]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if not (hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.nn.Parameter)):
            continue
        layer = name.rsplit(".experts", 1)[0].rsplit(".", 1)[0]
        gate_up, down_w = state[f"{name}.gate_up_proj"], state[f"{name}.down_proj"]
        for e in range(gate_up.shape[0]):
            if up is None:
                prefix = f"{layer}.{block}.experts."
                gate_up[e] = per_expert[f"{prefix}{gate}.{e}.weight"].T
                down_w[e] = per_expert[f"{prefix}{down}.{e}.weight"].T
                continue
            prefix = f"{layer}.{block}.experts.{e}."
            g, u, d = (per_expert[f"{prefix}{p}.weight"] for p in (gate, up, down))
            if kind.startswith("gpt-oss"):
                gate_up[e][:, ::2], gate_up[e][:, 1::2], down_w[e] = g.T, u.T, d.T
            else:
                inner = g.shape[0]
                gate_up[e][:inner], gate_up[e][inner:], down_w[e] = g, u, d
    for name, value in per_expert.items():  # the other Linear layers (attention, shared experts)
        if ".experts." not in name and name in state:
            state[name] = value.clone()
    return state


# ---------------------------------------------------------------------------------------------- GGUF

# K-quant layouts as gguf.quants' dequantizers read them: (bits of the codes, elements per scale,
# bits of the sub-block scales, affine: a min per sub-block, else symmetric codes around 0).
GGUF_K_QUANTS = {"Q2_K": (2, 16, 4, True), "Q3_K": (3, 16, 6, False), "Q4_K": (4, 32, 6, True),
                 "Q5_K": (5, 32, 6, True), "Q6_K": (6, 16, 8, False)}  # fmt: skip


def _fp16_bytes(values):
    import numpy as np

    return np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _k_quantize(x, bits: int, group: int, scale_bits: int, affine: bool):
    """(codes (n, 256) unsigned, sub-block scale codes, min codes, d, dmin) of `x` (n, 256) rounded
    to the nearest code under scales quantized as the K-quants store them (fp16 d, integer sub-scales).
    A plain nearest-code quantizer, not llama-quantize's search: rounding errs by ½ step at most
    except where a quantized scale clips the sub-block's extremes."""
    import numpy as np

    n = x.shape[0]
    sub = x.reshape(n, -1, group).astype(np.float64)
    levels = 2**bits - 1
    if affine:
        low = np.minimum(sub.min(axis=2), 0.0)
        scale = (sub.max(axis=2) - low) / levels
        top = 2**scale_bits - 1
        d = np.float16(scale.max(axis=1, keepdims=True) / top).astype(np.float64)
        dmin = np.float16((-low).max(axis=1, keepdims=True) / top).astype(np.float64)
        sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), 0, top)
        mn = np.clip(np.rint(np.divide(-low, dmin, out=np.zeros_like(low), where=dmin > 0)), 0, top)
        step, offset = (d * sc)[..., None], (dmin * mn)[..., None]
        q = np.clip(np.rint(np.divide(sub + offset, step, out=np.zeros_like(sub), where=step > 0)), 0, levels)
        return q.reshape(n, -1).astype(np.uint8), sc.astype(np.uint8), mn.astype(np.uint8), d, dmin
    half = 2 ** (bits - 1)
    scale = np.abs(sub).max(axis=2) / (half - 1)
    top = 2 ** (scale_bits - 1) - 1
    d = np.float16(scale.max(axis=1, keepdims=True) / top).astype(np.float64)
    sc = np.clip(np.rint(np.divide(scale, d, out=np.zeros_like(scale), where=d > 0)), 0, top)
    step = (d * sc)[..., None]
    q = np.clip(np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step > 0)), -half, half - 1)
    return (q + half).reshape(n, -1).astype(np.uint8), sc.astype(np.int16), None, d, None


def _pack_bits(q, shifts: int, width: int, chunk: int):
    """Bytes holding `shifts` fields of `width` bits each: element h·shifts·chunk + s·chunk + i of
    a block goes to byte h·chunk + i at bit s·width (gguf.quants' `>> [0, width, …]` unpacking)."""
    import numpy as np

    n = q.shape[0]
    fields = q.reshape(n, -1, shifts, chunk).astype(np.uint16)
    packed = sum(fields[:, :, s, :] << (s * width) for s in range(shifts))
    return packed.reshape(n, -1).astype(np.uint8)


def quantize_gguf(x, type_name: str):
    """The raw blocks (rows, bytes per row) of float32 `x` (rows, columns) in GGML type `type_name`:
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 by the `gguf` package's own quantizer; Q2_K … Q6_K (which it cannot
    write) by `_k_quantize`'s nearest rounding, packed in the layout gguf.quants.dequantize reads."""
    import gguf
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if type_name not in GGUF_K_QUANTS:
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])
    rows = x.shape[0]
    bits, group, scale_bits, affine = GGUF_K_QUANTS[type_name]
    q, sc, mn, d, dmin = _k_quantize(x.reshape(-1, 256), bits, group, scale_bits, affine)
    if type_name == "Q2_K":
        parts = [sc | (mn << 4), _pack_bits(q, 4, 2, 32), _fp16_bytes(d), _fp16_bytes(dmin)]
    elif type_name in ("Q4_K", "Q5_K"):
        scales = np.concatenate(
            [
                sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
            ],
            axis=1,
        )
        low = _pack_bits(q & 0x0F, 2, 4, 32)
        high = [_pack_bits(q >> 4, 8, 1, 32)] if type_name == "Q5_K" else []
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), scales, *high, low]
    elif type_name == "Q3_K":
        signed = (sc + 32).astype(np.uint8)  # six bits, offset 32
        low = signed & 0x0F
        scales = np.concatenate([low[:, :8] | (low[:, 8:] << 4), _pack_bits(signed >> 4, 4, 2, 4)], axis=1)
        hmask = _pack_bits((q >> 2) & 1, 8, 1, 32)  # the high bit set: offset 0, else −4
        parts = [hmask, _pack_bits(q & 3, 4, 2, 32), scales, _fp16_bytes(d)]
    else:  # Q6_K
        parts = [_pack_bits(q & 0x0F, 2, 4, 64), _pack_bits(q >> 4, 4, 2, 32), sc.astype(np.int8).view(np.uint8),
                 _fp16_bytes(d)]  # fmt: skip
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def write_gguf_model(state: dict[str, torch.Tensor], base_path, out, type_of) -> Path:
    """A merged GGUF model of the tiny Llama at `base_path` holding `state` (HF names) as
    convert_hf_to_gguf.py lays it out (gguf's names, q/k rows permuted), each tensor in the GGML type
    `type_of(name, tensor)` gives ("F32", "F16", "Q4_K" …)."""
    import json

    import gguf
    import numpy as np

    from lorasurgery.llamacpp import llama_permute, permuted_heads

    config = json.loads((Path(base_path) / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    for name, value in state.items():
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        heads = permuted_heads(name, config)
        value = value.detach().float()
        if heads is not None:
            value = llama_permute(value, *heads)
        kind = type_of(name, value)
        array = value.numpy()
        if kind in ("F32", "F16"):
            writer.add_tensor(mapped, array.astype(np.float32 if kind == "F32" else np.float16))
        else:
            raw = quantize_gguf(array.reshape(-1, array.shape[-1]), kind)
            writer.add_tensor(mapped, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
