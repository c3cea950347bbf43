"""transformers' `from_pretrained` on a checkpoint as lorasurgery reads it, quantized ones included.

A quantized checkpoint that lorasurgery presents dequantized (docs/design.md §13) is not handed to
transformers' own loader: on a machine without the format's kernels it dequantizes on load, and for
fine-grained FP8 that loader refuses partial edge blocks ("Weight shape (144, 72) not divisible by
scale grid (5, 3)"), which every model whose sizes are not multiples of 128 has. Where it can load,
it is still not the tensors every other command sees. So the model is built from config.json
without its quantization_config, and its state dict is the float32 tensors of `Checkpoint.read` —
the whole model in memory at once, as any transformers model is. Plain checkpoints load as before.
"""

from __future__ import annotations

import os
from pathlib import Path


def from_pretrained(cls, folder: str | os.PathLike, **kwargs):
    """`cls.from_pretrained(folder, **kwargs)`, or, for a checkpoint lorasurgery dequantizes, the same
    model built from its dequantized tensors. `cls` may be an Auto class. A quantized format that
    lorasurgery does not read is refused by name (UnsupportedError), before transformers starts."""
    from lorasurgery.io.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(folder)  # headers only
    if not checkpoint.dequantizes:
        return cls.from_pretrained(Path(folder), **kwargs)

    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(Path(folder), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if cls.__name__.startswith("Auto"):  # the concrete class the Auto class would pick for this config
        with torch.device("meta"):
            cls = type(cls.from_config(config))
    state = {name: checkpoint.read(name) for name in checkpoint.tensors}
    kwargs.pop("local_files_only", None)
    return cls.from_pretrained(None, config=config, state_dict=state, **kwargs)
