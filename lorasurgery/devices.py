"""--device for every command: cpu, cuda, or auto (cuda when available); torch's thread count for small kernels."""

from __future__ import annotations

from contextlib import contextmanager

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


@contextmanager
def torch_threads(n: int | None):
    """torch on `n` intra-op threads inside the block. Small per-module kernels (QRs of (d, r),
    r × r SVDs) are many times slower under OpenMP teams spinning at every barrier on a busy machine
    (docs/extract.md measured 10×); one thread each is the robust choice for them. None keeps torch's count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
