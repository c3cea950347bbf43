"""Load a checkpoint as a transformers causal LM: the forward passes of `rank-report --probe` and
`extract --calibrate` share it (a shared layer, so neither command imports the other).

torch and transformers are imported inside `load_causal_lm`: they cost seconds, and only the two
forward-pass features need them (docs/architecture.md, "Lazy imports").
"""

from __future__ import annotations

import os

from lorasurgery.errors import LoraSurgeryError


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
