"""--device for every command: cpu, cuda, or auto (cuda when available); torch's thread count for small kernels."""

from __future__ import annotations

from lorasurgery.errors import UnsupportedError


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device  # without importing torch (rank-report of W never needs it)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise UnsupportedError(f"--device {device}: expected cpu, cuda or auto")
    return device
