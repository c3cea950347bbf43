"""The compiled FP8 kernels (lorasurgery/native, docs/design.md §13 "Native kernels") compute what
torch computes, bit for bit, and the package works the same without them.

The oracle is the torch code beside them: a merge with the kernels unloaded (`without_kernels`)
must write the same bytes, and each kernel is compared with torch's own float8 conversions on
bands whose shapes are not multiples of anything (partial scale blocks, rows not a multiple of the
16 summing lanes). tests/test_quantized_bands.py runs with the kernels loaded (as every test does
where a C compiler exists) against transformers' decoder and the whole-tensor route.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from factories import make_adapter, make_llama, quantize_fp8
from quantized_checks import merged_two_ways
from test_quantized_bands import info_of, reader
from test_quantized_fp8 import TARGETS, fp8_config, store_fp8

from lorasurgery.io import fp8
from lorasurgery.linalg import delta
from lorasurgery.native import build
from lorasurgery.native import fp8 as kernels

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture
def without_kernels(monkeypatch):
    """The package as it runs on a machine without a C compiler."""
    monkeypatch.setitem(build._LOADED, "fp8", None)


def torch_blocks(scales: torch.Tensor, shape, block) -> torch.Tensor:
    """The (rows, cols) scale of each element from its block grid."""
    rows, cols = shape
    return scales.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


@needs_compiler
def test_the_kernels_build_here_and_agree_with_torch_on_every_code():
    lib = kernels._lib()
    assert lib is not None, build.why_not("fp8")
    assert kernels.agrees_with_torch(lib)


@needs_compiler
@pytest.mark.parametrize("shape, block", [((70, 200), (32, 32)), ((33, 17), (16, 5)), ((5, 131), (128, 128))])
def test_each_kernel_equals_torch_on_partial_blocks(shape, block):
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=generator)
    merged = W + torch.randn(shape, generator=generator) * 0.05
    codes, scale = quantize_fp8(W, block, torch.float32, False)
    old = codes.view(torch.uint8)
    # decode: bit for bit torch's float8 → float32 times the scale
    out = torch.empty(shape)
    assert kernels.decode(codes, scale, 0, block, out)
    assert torch.equal(out, codes.float() * torch_blocks(scale, shape, block))
    # block amax, then the fused encode, decode again, sums and count
    amax = kernels.block_amax(merged, block)
    grid = torch.stack(
        [torch.stack([t.abs().amax() for t in r.split(block[1], 1)]) for r in merged.split(block[0])]
    )
    assert torch.equal(amax, grid)
    s = amax / 448
    new = torch.empty(shape, dtype=torch.float8_e4m3fn)
    kept, update, changed = kernels.requantize(merged, W, old, s, block, 448.0, new, torch.empty(shape[1]))
    want = (merged / torch_blocks(s, shape, block)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(new.view(torch.uint8), want.view(torch.uint8))
    assert changed == int((want.view(torch.uint8) != old).sum())
    after = want.double() * torch_blocks(s, shape, block).double()
    change = merged.double() - W.double()
    assert kept == pytest.approx(float(((after - W.double()) * change).sum()), rel=1e-6)
    assert update == pytest.approx(float((change * change).sum()), rel=1e-6)
    assert kernels.retention_sums(W, merged, want.float() * torch_blocks(s, shape, block)) == (kept, update)


@needs_compiler
def test_what_the_kernels_do_not_take_falls_back_to_torch():
    x = torch.ones(4, 8)
    x[1, 2] = float("nan")
    assert kernels.block_amax(x, (2, 4)) is None  # torch's amax propagates NaN: torch decides
    e5m2 = torch.zeros(4, 8, dtype=torch.float8_e5m2)
    assert not kernels.decode(e5m2, torch.ones(2, 2), 0, (2, 4), torch.empty(4, 8))
    assert not kernels.decode(
        torch.zeros(8, 4, dtype=torch.float8_e4m3fn).t(), torch.ones(2, 2), 0, (2, 4), x
    )
    args = (torch.ones(4, 8), torch.ones(4, 8), torch.zeros(4, 8, dtype=torch.uint8), torch.ones(2, 2))
    assert kernels.requantize(*args, (2, 4), 57344.0, e5m2, torch.empty(8)) is None


def test_without_a_compiler_the_kernels_are_absent_and_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang either
    monkeypatch.setenv("LORASURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delitem(build._LOADED, "fp8", raising=False)
    monkeypatch.setattr(build.sysconfig, "get_config_var", lambda name: None)
    assert kernels._lib() is None
    assert "no C compiler" in build.why_not("fp8")


@needs_compiler
def test_a_damaged_cached_library_is_built_again(tmp_path):
    """In a process of its own, as the next command would meet it (this one has a library loaded)."""
    env = {**os.environ, "LORASURGERY_CACHE": str(tmp_path)}
    load = [sys.executable, "-c", "from lorasurgery.native import fp8, build; print(fp8._lib() is not None)"]
    assert subprocess.run(load, env=env, capture_output=True, text=True, check=True).stdout.split() == [
        "True"
    ]
    (cached,) = (tmp_path / "native").glob("fp8-*.so")
    cached.write_bytes(b"not a library")  # a killed copy, a full disk
    assert subprocess.run(load, env=env, capture_output=True, text=True, check=True).stdout.split() == [
        "True"
    ]
    assert cached.stat().st_size > 1000


@needs_compiler
def test_a_cache_that_cannot_be_written_builds_for_the_process_only(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    env = {**os.environ, "LORASURGERY_CACHE": str(blocked / "below")}
    load = [sys.executable, "-c", "from lorasurgery.native import fp8, build; print(fp8._lib() is not None)"]
    assert subprocess.run(load, env=env, capture_output=True, text=True, check=True).stdout.split() == [
        "True"
    ]
    assert blocked.read_text() == "not a folder"


def test_lorasurgery_native_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("LORASURGERY_NATIVE", "0")
    monkeypatch.delitem(build._LOADED, "fp8", raising=False)
    assert kernels._lib() is None and build.why_not("fp8") == "LORASURGERY_NATIVE=0"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    plain = make_llama(root / "plain", hidden_size=72, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    return store_fp8(plain, root / "fp8", (32, 32), torch.bfloat16, False, fp8_config((32, 32))), adapter


@needs_compiler
@pytest.mark.parametrize("extra", [(), ("--requantize",)], ids=["unquantized", "requantize"])
def test_a_merge_writes_the_same_bytes_with_and_without_the_kernels(monkeypatch, model, tmp_path, extra):
    base, adapter = model
    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", 72 * 5)  # 5-row blocks: staged into 32-row spans
    # the sums' order differs (float64 lanes against torch's float32 cascade): 1e-7 apart at most
    switch = lambda: monkeypatch.setitem(build._LOADED, "fp8", None)  # noqa: E731
    merged_two_ways(base, adapter, tmp_path, extra, switch, tolerance=1e-7)


@needs_compiler
def test_the_band_decoder_uses_the_kernel_and_torch_gives_the_same_bits(without_kernels):
    generator = torch.Generator().manual_seed(4)
    codes, scale = quantize_fp8(torch.randn(70, 200, generator=generator), (32, 32), torch.float32, False)
    info = info_of(codes, scale, (32, 32))
    plain = fp8.rows(info, reader(codes, scale))
    build._LOADED.pop("fp8")  # the kernels back
    native = fp8.rows(info, reader(codes, scale))
    a, b = torch.empty(70, 200), torch.empty(70, 200)
    for start in range(0, 70, 9):
        plain.fill(start, min(start + 9, 70), a[start : start + 9])
        native.fill(start, min(start + 9, 70), b[start : start + 9])
    assert torch.equal(a, b)
