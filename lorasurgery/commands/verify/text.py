"""verify --text FILE: the artifact's function, its logits on the text against base + adapters by PEFT.

The reference is the base loaded by transformers (float32) with the adapters applied by PEFT, each
with its --weight (causal_lm.with_adapters). The artifact is loaded as its user would:
- a merged checkpoint folder: transformers' from_pretrained (a quantized one dequantized, §13);
- an adapter folder: the base + the artifact by PEFT, every module's scaling set to what the target
  applies (lorasurgery.targets.Target.scale: vLLM's by its release, SGLang's one global scale); an
  adapter the target refuses (vLLM 0.6.5 – 0.6.6 and use_rslora) is skipped with the refusal;
- a merged GGUF model: transformers' own GGUF loader (dequantized, under the base's config.json;
  causal_lm.load_gguf_causal_lm), skipped with the reason where transformers cannot load its
  architecture or would leave weights unread;
- a GGUF LoRA, or a checkpoint file without its folder's config.json: transformers cannot load it as
  the runtime does, so the check is skipped with that reason (llama.cpp runs GGUF LoRAs).
Both run on the same token windows of FILE (tokenised by the base folder's tokenizer, textdata);
the largest |Δlogit| must stay within the artifact dtype's tolerance × (1 + max |logit|)
(causal_lm.LOGIT_TOLERANCE; a quantized artifact's codes are coarser than BF16, so it gets its own).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorasurgery.causal_lm import LOGIT_TOLERANCE, load_causal_lm, load_gguf_causal_lm, with_adapters
from lorasurgery.errors import UnsupportedError
from lorasurgery.targets import parse_target
from lorasurgery.textdata import token_ids, token_windows

QUANTIZED_TOLERANCE = 0.25  # a quantized artifact (FP8 / 4-bit codes): its rounding, not the merge, dominates


@dataclass
class TextCheck:
    """The logits comparison of `--text`."""

    text: str
    tokens: int = 0
    max_difference: float | None = None  # max |logits(artifact) − logits(reference)|
    tolerance: float | None = None  # absolute
    dtype: str = ""  # the dtype whose tolerance applies
    skipped: str = ""  # why it did not run

    @property
    def passed(self) -> bool:
        return not self.skipped and self.max_difference is not None and self.max_difference <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "max_difference": self.max_difference,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "passed": self.passed,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class TextRun:
    """What `--text` runs: base + adapters (each with its weight) against the artifact, on `tokens`
    tokens of the file `text`."""

    base: str | os.PathLike
    adapters: Sequence[str | os.PathLike]
    weights: Sequence[float]
    artifact: Path
    text: str | os.PathLike
    tokens: int


def check_text(run: TextRun, *, kind: str, target, device, dtype: str) -> TextCheck:
    """Run the comparison, or say why it cannot run (`kind`: merged checkpoint | merged GGUF | adapter)."""
    artifact = run.artifact
    check = TextCheck(str(run.text))
    target = parse_target(target) if target is not None else None
    if target is not None and target.name == "llama.cpp":
        check.skipped = (
            "a GGUF LoRA: transformers does not run it as llama.cpp does (run llama.cpp on the text instead)"
        )
        return check
    served = target is not None and kind == "adapter"
    config = _adapter_config(artifact) if served else None  # read once: the refusal and the scales
    refused = target.refusals(config) if served else []
    if refused:
        check.skipped = f"the target does not load the adapter: {refused[0]}"
        return check
    if kind == "merged checkpoint" and not (artifact.is_dir() and (artifact / "config.json").is_file()):
        check.skipped = f"{artifact} is not a folder with config.json: transformers cannot load it as a model"
        return check
    base_folder = Path(run.base) if Path(run.base).is_dir() else Path(run.base).parent
    ids = token_ids(base_folder, run.text, run.tokens)
    check.tokens = len(ids)
    check.dtype = dtype
    with warnings.catch_warnings():  # PEFT's and transformers' notes are not verify's output
        warnings.simplefilter("ignore")
        reference_model = with_adapters(load_causal_lm(base_folder, device), run.adapters, run.weights)
        windows = token_windows(ids, reference_model.config, f"--text {run.text} tokenised by {base_folder}")
        reference = _logits(reference_model, windows, device)
        del reference_model
        if kind == "merged checkpoint":
            model = load_causal_lm(artifact, device)
        elif kind == "merged GGUF":
            try:
                model = load_gguf_causal_lm(artifact, base_folder, device)
            except UnsupportedError as why:  # the tensor checks still decide
                check.skipped, check.tokens, check.dtype = str(why), 0, ""
                return check
        else:
            model = _served(load_causal_lm(base_folder, device), artifact, target, config)
        landed = _logits(model, windows, device)
        del model
    check.max_difference = max(float((a - b).abs().max()) for a, b in zip(reference, landed))
    scale = max(float(a.abs().max()) for a in reference)
    check.tolerance = LOGIT_TOLERANCE.get(dtype, QUANTIZED_TOLERANCE) * (1.0 + scale)
    return check


def artifact_dtype(checkpoint) -> str:
    """The artifact's most common float dtype (a quantized artifact: its codes')."""
    codes = Counter(
        (info.codes.dtype if getattr(info, "dequantized", False) and info.codes is not None else info.dtype)
        for info in checkpoint.tensors.values()
        if (getattr(info, "codes", None) is not None) or info.dtype in LOGIT_TOLERANCE
    )
    return codes.most_common(1)[0][0] if codes else "F32"


def _adapter_config(artifact: Path):
    from lorasurgery.adapter import load_adapter

    return load_adapter(artifact).config


def _served(model, artifact: Path, target, config):
    """The base with the adapter artifact applied by PEFT, each module scaled as `target` (a
    targets.Target) scales it; `config` the artifact's adapter config (None without a target)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    wrapped = PeftModel.from_pretrained(model, str(artifact), adapter_name="artifact")
    if target is not None and target.name in ("vllm", "sglang"):
        for name, module in wrapped.named_modules():
            if isinstance(module, LoraLayer) and "artifact" in module.scaling:
                name = name.removeprefix("base_model.model.")  # the adapter's module name
                module.scaling["artifact"] = target.scale(config, name, module.r["artifact"])
    return wrapped.eval()


def _logits(model, windows, device):
    import torch

    with torch.no_grad():
        return [model(input_ids=w.to(device)).logits.float() for w in windows]
