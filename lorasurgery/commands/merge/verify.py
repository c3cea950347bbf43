"""merge --verify: base + adapters applied by PEFT against the merged model, on the same token batches.

Both run in float32 through transformers; when --dtype changed the dtype, the base is rounded to it
first, so that what is compared is the merge, not the precision the user asked for.
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from lorasurgery.causal_lm import LOGIT_TOLERANCE, with_adapters
from lorasurgery.errors import VerificationError
from lorasurgery.io import open_checkpoint
from lorasurgery.io.pretrained import from_pretrained
from lorasurgery.io.safetensors_format import torch_dtype_of

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def require_verification_libraries() -> None:
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise VerificationError(
            f"--verify needs {' and '.join(missing)} (pip install {' '.join(missing)}); nothing was written"
        )


def verify_merge(
    base, adapters, merged, *, weights, merged_dtype: str | None = None, batches: int = 2
) -> float:
    """Max |logits(base + adapters) − logits(merged)| on deterministic token batches, in float32.

    Raises VerificationError when it exceeds the tolerance of the merged checkpoint's dtype. When
    --dtype changed the dtype, the base is rounded to it first, so that what is compared is the
    merge, not the precision the user asked for."""

    code = merged_dtype or _checkpoint_float_dtype(merged)
    with _quiet_transformers():
        reference_model = _load_model(base)
        if merged_dtype:
            rounded = torch_dtype_of(merged_dtype)
            with torch.no_grad():
                for parameter in reference_model.parameters():
                    parameter.copy_(parameter.to(rounded))
        config = reference_model.config
        vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randint(0, vocab, (2, 16), generator=generator) for _ in range(batches)]
        peft_model = with_adapters(reference_model, adapters, weights)
        reference = _run(peft_model, inputs)
        del peft_model, reference_model
        merged_model = _load_model(merged)
        outputs = _run(merged_model, inputs)
        del merged_model
    difference = max(float((a - b).abs().max()) for a, b in zip(reference, outputs))
    scale = max(float(a.abs().max()) for a in reference)
    tolerance = LOGIT_TOLERANCE.get(code, 1e-4) * (1.0 + scale)
    if not difference <= tolerance:
        raise VerificationError(
            f"verification failed: the merged model's logits differ from base + adapters by up to "
            f"{difference:.3g} (tolerance {tolerance:.3g} for {code}); nothing was written"
        )
    return difference


@contextmanager
def _quiet_transformers():
    """No loading bars or deprecation warnings from transformers/peft in the middle of our output."""
    import transformers  # --verify's own heavy dependency (docs/architecture.md, "Lazy imports")

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _checkpoint_float_dtype(folder) -> str:
    codes = [t.dtype for t in open_checkpoint(folder).tensors.values() if t.dtype in FLOAT_CODES]
    return max(set(codes), key=codes.count) if codes else "F32"


def _load_model(path):
    import transformers

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    try:  # a quantized base as lorasurgery reads it: dequantized (docs/design.md §13)
        model = from_pretrained(cls, folder, dtype=torch.float32)
    except Exception as error:  # transformers raises many kinds; report which model failed
        raise VerificationError(f"--verify: transformers cannot load {folder}: {error}") from None
    return model.eval()


def _run(model, inputs):
    outputs = []
    with torch.no_grad():
        for ids in inputs:
            result = model(input_ids=ids)
            value = getattr(result, "logits", None)
            if value is None:
                value = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
            outputs.append(value.float())
    return outputs
