"""Load a checkpoint as a transformers causal LM: the forward passes of `rank-report --probe`,
`extract --calibrate`, `merge --verify` and `verify --text` share it (a shared layer, so no command
imports another), with PEFT's adapters applied on top (`with_adapters`) and the logit tolerance
each dtype allows (`LOGIT_TOLERANCE`). A merged GGUF model is loaded by transformers' own GGUF
reader (`load_gguf_causal_lm`, for `verify --text`; docs/verify.md "--text").

torch and transformers are imported inside `load_causal_lm`: they cost seconds, and only the two
forward-pass features need them (docs/architecture.md, "Lazy imports").
"""

from __future__ import annotations

import os

from lorasurgery.errors import LoraSurgeryError, UnsupportedError

# Largest |logits(artifact) − logits(base + adapters by PEFT)| a model stored in each dtype may show,
# × (1 + max |logit|): float32 summation order, or one rounding of every weight to F16 / BF16.
LOGIT_TOLERANCE = {"F32": 1e-4, "F16": 2e-2, "BF16": 6e-2}


def load_causal_lm(folder: str | os.PathLike, device: str = "cpu"):
    """The checkpoint in `folder` as a float32 transformers causal LM in eval mode, local files only.

    A quantized checkpoint is read as every command reads it (docs/design.md §13): dequantized by
    lorasurgery's reader (io.pretrained), or refused by name, not left to transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lorasurgery.io.pretrained import from_pretrained

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no "Loading weights" chatter: the core never prints
    hf_logging.disable_progress_bar()
    try:
        model = from_pretrained(AutoModelForCausalLM, folder, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise LoraSurgeryError(f"{folder}: transformers cannot load it as a causal LM ({error})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return model.to(device).eval()


def with_adapters(model, adapters, weights):
    """`model` with every adapter applied by PEFT at once, adapter i's scaling times weights[i]."""
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.base_model.set_adapter(names)
    # A weight w scales s: exactly w·ΔW for plain LoRA (and lora_bias), and DoRA's w·s as merged.
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict):
            continue
        for name, weight in zip(names, weights):
            if name in scaling and weight != 1.0:
                scaling[name] *= weight
    return peft_model.eval()


def load_gguf_causal_lm(path: str | os.PathLike, config_folder: str | os.PathLike, device: str = "cpu"):
    """The merged GGUF model at `path` as a float32 transformers causal LM in eval mode: its tensors
    read and dequantized by transformers' GGUF loader (`gguf_file=`), under the config.json of
    `config_folder` (the base's: transformers' reading of GGUF metadata misses Qwen3's head_dim and
    GPT-2's n_positions), the word embeddings tied exactly when the file stores no `output.weight`
    (llama.cpp's rule). UnsupportedError, naming the architecture or the weights, where transformers
    cannot load the file or would leave weights of the model unread (e.g. a --fuse-qkv attn_qkv)."""
    import contextlib
    import io
    from pathlib import Path

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    reader = gguf.GGUFReader(path)
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = field.contents() if field is not None else None
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # a transformers without GGUF loading
        GGUF_SUPPORTED_ARCHITECTURES = []
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(f"{path}: transformers does not load GGUF architecture {arch!r}")
    config = AutoConfig.from_pretrained(Path(config_folder), local_files_only=True)
    config.tie_word_embeddings = all(t.name != "output.weight" for t in reader.tensors)
    del reader
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # transformers' GGUF loader draws its own tqdm bar on stderr: the core never prints
        with contextlib.redirect_stderr(io.StringIO()):
            model, info = AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                config=config,
                dtype=torch.float32,
                local_files_only=True,
                output_loading_info=True,
            )
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise UnsupportedError(f"{path}: transformers cannot load it as a causal LM ({error})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    unread = sorted(
        {
            key if isinstance(key, str) else key[0]
            for part in ("missing_keys", "mismatched_keys")
            for key in info.get(part) or ()
        }
    )
    if unread:
        raise UnsupportedError(
            f"{path}: transformers' GGUF loader leaves {len(unread)} weights unread ({', '.join(unread[:3])}"
            f"{' …' if len(unread) > 3 else ''}): its model would not be the file's"
        )
    model.requires_grad_(False)
    return model.to(device).eval()
