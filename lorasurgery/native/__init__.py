"""Compiled kernels for the few loops torch cannot fuse on a CPU (docs/design.md §13, "Native kernels").

`build.py` compiles a C source on first use and loads it; each kernel module (`fp8.py`) passes torch
tensors in and returns None where the kernels cannot take them, so callers keep their torch code,
which computes the same bytes.
"""
