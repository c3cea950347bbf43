"""Load a checkpoint as a transformers causal LM: the forward passes of `rank-report --probe`,
`extract --calibrate`, `merge --verify` and `verify --text` share it (a shared layer, so no command
imports another), with PEFT's adapters applied on top (`with_adapters`) and the logit tolerance
each dtype allows (`LOGIT_TOLERANCE`).

torch and transformers are imported inside `load_causal_lm`: they cost seconds, and only the two
forward-pass features need them (docs/architecture.md, "Lazy imports").
"""

from __future__ import annotations

import os

from lorasurgery.errors import LoraSurgeryError

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
