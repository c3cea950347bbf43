"""Float64 dense references for resize/combine tests, and PEFT loading with warnings checked.

Every ΔW here comes from PEFT itself (`peft_delta_weights`: `get_delta_weight`, in the base weight's
layout), so a reference never shares code with what it checks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import torch
from factories import load_base, peft_delta_weights, peft_merged_state_dict
from safetensors.torch import load_file


def load_with_peft(base: Path, adapter: Path, kind: str = "llama"):
    """PeftModel.from_pretrained, failing on any warning PEFT raises (missing keys, lora_bias, tying …)."""
    model = load_base(base, kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = peft.PeftModel.from_pretrained(model, str(adapter))
    ours = [
        str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message).lower()
    ]
    assert not ours, ours
    return wrapped.eval()


def deltas(base: Path, adapter: Path, kind: str = "llama") -> dict[str, torch.Tensor]:
    """PEFT's ΔW per module (float64, base layout); for DoRA the effective W' − W of merge_and_unload."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if config.get("use_dora"):
        merged = peft_merged_state_dict(base, [adapter], model_kind=kind)
        plain, _ = peft_delta_weights(base, adapter, model_kind=kind)
        original = load_file(Path(base) / "model.safetensors")
        return {m: merged[f"{m}.weight"].double() - original[f"{m}.weight"].double() for m in plain}
    found, _ = peft_delta_weights(base, adapter, model_kind=kind)
    return {m: d.double() for m, d in found.items()}


def optimal(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The best rank-k approximation of `delta` (float64 dense SVD) and its relative error."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    return best, float((S[k:].square().sum() / S.square().sum()).sqrt())
