"""Data-aware extraction (`extract --calibrate --text FILE`, docs/extract.md "Calibration").

Plain extraction minimises ‖ΔW − BA‖_F, which weighs every input direction alike. What the model
feels is the error on the inputs the layer really sees, ‖(ΔW − BA)X‖_F with X (n, tokens) the
layer's inputs. With the input Gram G = XXᵀ (+ a ridge) = L Lᵀ (Cholesky), ‖MX‖_F² = tr(M G Mᵀ) =
‖ML‖_F², so the best rank-k BA in that norm truncates ΔW·L: ΔW·L ≈ U_k S_k V_kᵀ, B = U_k S_k^½,
A = S_k^½ V_kᵀ L⁻¹ (the whitening of SVD-LLM, Wang et al. 2024). Rank policies and --budget then
read the whitened spectra σ(ΔW·L): energy in data space.

The Grams come from one streamed forward pass of the fine-tune over the text (hooks on every
selected Linear, float64 accumulation, modules fed the same tensor — q/k/v, gate/up — share one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lorasurgery.causal_lm import load_causal_lm
from lorasurgery.errors import LoraSurgeryError
from lorasurgery.progress import Progress, ProgressCallback, no_progress
from lorasurgery.textdata import DEFAULT_TOKENS, token_ids, token_windows

RIDGE = 1e-2  # × the mean diagonal of G: directions the text never excites fall back to plain SVD


@dataclass
class Whitening:
    L: object  # (n, n) float64 lower-triangular, L Lᵀ = XXᵀ/tokens + ridge·mean(diag)·I
    tokens: int


def whitening(gram, tokens: int, ridge: float = RIDGE) -> Whitening:
    """Cholesky factor of the token-averaged Gram plus the ridge (float64)."""
    G = gram.to(torch.float64) / max(tokens, 1)
    n = G.shape[0]
    scale = float(G.diagonal().mean()) if n else 0.0
    G = G + (ridge * scale if scale > 0 else 1.0) * torch.eye(n, dtype=torch.float64)
    return Whitening(torch.linalg.cholesky(G), tokens)


def collect_input_grams(
    folder: str | os.PathLike,
    module_names: list[str],
    text: str | os.PathLike,
    tokens: int | None = None,
    device: str = "cpu",
    progress: ProgressCallback = no_progress,
    ridge: float = RIDGE,
) -> dict[str, Whitening]:
    """{module: Whitening} from the inputs each named Linear-like module of the model in `folder` sees."""
    ids = token_ids(folder, text, tokens or DEFAULT_TOKENS)
    model = load_causal_lm(folder, device)
    windows = token_windows(ids, model.config, f"--text {text} tokenised by {folder}")
    owner: dict[str, list] = {}  # module -> [G float64 (n, n), tokens]; modules fed one tensor share one
    # This window's inputs (data_ptr, shape) -> (the accumulator they fed, the tensor itself): holding
    # the tensor keeps its memory from being reused by a later, different input of the same shape.
    seen: dict[tuple, tuple] = {}
    handles = []

    def hook(name):
        def pre_hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key in seen:  # the same tensor as an earlier module (q/k/v, gate/up): already counted
                owner.setdefault(name, seen[key][0])
                return None
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, n)
            accumulator = owner.setdefault(
                name, [torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64), 0]
            )
            accumulator[0].addmm_(flat.T, flat)
            accumulator[1] += flat.shape[0]
            seen[key] = (accumulator, x)
            return None

        return pre_hook

    try:
        for name in module_names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise LoraSurgeryError(f"{folder}: module {name!r} is not in the loaded model") from None
            handles.append(module.register_forward_pre_hook(hook(name)))
        with torch.inference_mode():
            for done, window in enumerate(windows, start=1):
                seen.clear()
                model(window.to(device))
                progress(Progress("extract: calibration", done, len(windows), f"{window.shape[1]} tokens"))
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    by_accumulator: dict[int, Whitening] = {}
    for name, (G, count) in ((n, owner[n]) for n in module_names if n in owner):
        key = id(owner[name])
        if key not in by_accumulator:
            by_accumulator[key] = whitening(G, count, ridge)
        result[name] = by_accumulator[key]
    return result
