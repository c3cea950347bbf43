"""A quantized base decoded, merged and requantized block by block (docs/design.md §13, "Decoding in
bands") gives the bytes the whole-tensor route gives.

The merge kernel reads an FP8 tensor as io.quantization.Rows (fp8.rows: each block of rows decoded
straight into the buffer it is merged in) and `--requantize` encodes each span of whole scale blocks
as it comes (fp8.band_quantizer, linalg.requantize.requantize_blocks). Both are only faster: the
oracle for the decoding is transformers' own `_dequantize_fp8_weight`, for every e4m3 and e5m2 code;
for the merge and the requantization it is the whole-tensor route (dequantize, merge_weight,
requantize), which tests/test_quantized_fp8.py and test_quantized_requantize.py check against PEFT
and transformers. The kernel's blocks are made small (delta.BLOCK_ELEMENTS) so that tiny tensors
have many, and a block row count that is not a multiple of the scale blocks, which the requantizer
must stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_llama
from quantized_checks import merged_two_ways
from test_quantized_fp8 import TARGETS, fp8_config, oracle, store_fp8

from lorasurgery.io import fp8
from lorasurgery.io.quantization import DequantizedInfo
from lorasurgery.io.safetensors_format import TensorInfo, dtype_code_of
from lorasurgery.linalg import delta
from lorasurgery.linalg.delta import Update, merge_weight, merged_blocks
from lorasurgery.linalg.requantize import requantize, requantize_blocks

SHAPE = (70, 200)  # partial edge blocks both ways under 32 × 32 blocks
BLOCK = (32, 32)


def info_of(codes: torch.Tensor, scale: torch.Tensor, block) -> DequantizedInfo:
    """The DequantizedInfo io.fp8.logical_index makes for `codes` and `scale` (no file behind them)."""
    stored = TensorInfo("w", dtype_code_of(codes.dtype), tuple(codes.shape), Path("w"), 0, 0)
    part = TensorInfo("w_scale_inv", dtype_code_of(scale.dtype), tuple(scale.shape), Path("w"), 0, 0)
    return DequantizedInfo(
        "w", "F32", tuple(codes.shape), Path("w"), -1, -1, format="fp8", codes=stored,
        parts=(("scale_inv", part),), block=block,
    )  # fmt: skip


def reader(codes, scale):
    return lambda part: {"w": codes, "w_scale_inv": scale}[part.name]


def every_code(dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """SHAPE codes of `dtype`: every byte in the first rows (NaN codes included), the later rows
    random finite codes, so that some blocks hold a NaN code and others do not."""
    finite = torch.arange(256, dtype=torch.uint8).view(dtype).float().isfinite()
    pool = torch.arange(256, dtype=torch.uint8)[finite]
    codes = pool[torch.randint(len(pool), SHAPE, generator=generator)]
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return codes.view(dtype)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("block", [BLOCK, None])
def test_band_decoding_equals_transformers_for_every_code(dtype, block):
    generator = torch.Generator().manual_seed(0)
    codes = every_code(dtype, generator)
    grid = (1, 1) if block is None else tuple(-(-n // b) for n, b in zip(SHAPE, block))
    scale = torch.rand(grid, generator=generator) * 3 + 2.0**-20
    info = info_of(codes, scale if block else scale.reshape(()), block)
    expected = oracle(codes, scale, block)
    rows = fp8.rows(info, reader(codes, scale if block else scale.reshape(())))
    for step in (7, 32, 70):  # blocks that start inside a scale block, whole ones, all of it
        out = torch.full(SHAPE, 12345.0)
        for start in range(0, SHAPE[0], step):
            stop = min(start + step, SHAPE[0])
            rows.fill(start, stop, out[start:stop])
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    whole = fp8.dequantize(info, reader(codes, scale if block else scale.reshape(())))
    torch.testing.assert_close(whole, expected, rtol=0, atol=0, equal_nan=True)


def fp8_tensor(generator, scale_dtype=torch.float32, ue8m0=False, block=BLOCK):
    """(info, read, float32 W) of a random SHAPE weight quantized as factories.quantize_fp8 does."""
    from factories import quantize_fp8

    W = torch.randn(SHAPE, generator=generator)
    codes, scale = quantize_fp8(W, block, scale_dtype, ue8m0)
    info = info_of(codes, scale, block)
    return info, reader(codes, scale), fp8.dequantize(info, reader(codes, scale))


def updates_of(generator, dora: bool = False) -> list[Update]:
    rows, cols = SHAPE
    first = Update(
        "m",
        "linear",
        torch.randn(4, cols, generator=generator),
        torch.randn(rows, 4, generator=generator),
        0.3,
    )
    second = Update("m", "linear", torch.randn(3, cols, generator=generator), torch.randn(rows, 3, generator=generator), 0.7, weight=-0.5)  # fmt: skip
    if not dora:
        return [first, second]
    norm = torch.rand(rows, generator=generator) + 0.5
    column = torch.rand(cols, generator=generator) + 0.5
    per_row = Update("m", "linear", second.A, second.B, 0.7, magnitude=norm)
    per_column = Update("m", "embedding", torch.randn(4, rows, generator=generator), torch.randn(cols, 4, generator=generator), 0.2, transposed=True, magnitude=column)  # fmt: skip
    return [first, per_row, per_column]


@pytest.mark.parametrize("elements", [200 * 5, 200 * 64, 1 << 19])  # 5-row blocks, 64-row blocks, one
@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_merge_in_bands_equals_the_merge_of_the_decoded_tensor(monkeypatch, elements, precise, dora):
    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", elements)
    generator = torch.Generator().manual_seed(1)
    info, read, W = fp8_tensor(generator)
    updates = updates_of(generator, dora)
    for out_dtype in (torch.bfloat16, torch.float32):
        expected = merge_weight(W.clone(), updates, out_dtype=out_dtype, precise=precise)
        got = merge_weight(fp8.rows(info, read), updates, out_dtype=out_dtype, precise=precise)
        assert got.dtype == out_dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("elements", [200 * 5, 200 * 64, 1 << 19])
@pytest.mark.parametrize(
    "scales", [(torch.float32, False), (torch.bfloat16, False), (torch.float8_e8m0fnu, True)], ids=str
)
def test_requantize_in_blocks_equals_the_whole_tensor_route(monkeypatch, elements, scales):
    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", elements)
    generator = torch.Generator().manual_seed(2)
    info, read, W = fp8_tensor(generator, *scales)
    if scales[1]:
        info = DequantizedInfo(**{**info.__dict__, "scale_fmt": "ue8m0"})
    updates = updates_of(generator)
    merged = merge_weight(W.clone(), updates, out_dtype=torch.float32)
    expected = requantize(info, W, merged, read)
    blocks = merged_blocks(fp8.rows(info, read), updates, keep_base=True)
    got = requantize_blocks(info, blocks, fp8.band_quantizer(info, read), read(info.codes))
    assert set(got.tensors) == set(expected.tensors) == {"w", "w_scale_inv"}
    for name, tensor in expected.tensors.items():
        mine = got.tensors[name]
        assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(mine.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    assert (got.codes_changed, got.codes) == (expected.codes_changed, expected.codes)
    assert got.kept == pytest.approx(expected.kept, rel=1e-12)
    assert got.update == pytest.approx(expected.update, rel=1e-12)
    # and ρ against float64 arithmetic (the sums' float32 differences: docs/design.md §13)
    after = fp8.dequantize(info, reader(got.tensors["w"], got.tensors["w_scale_inv"])).double()
    change = merged.double() - W.double()
    rho = float(((after - W.double()) * change).sum() / (change * change).sum())
    assert abs(got.retention - rho) < 1e-7


def test_requantize_in_blocks_with_buffers_kept_from_tensor_to_tensor(monkeypatch):
    """A merging thread keeps requantize_blocks' buffers from one tensor to the next (merge/write.py:
    _thread_buffers): tensors of other shapes in between, the buffers filled with NaN, give the
    bytes and sums of fresh buffers."""
    from factories import quantize_fp8

    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", 200 * 5)  # 5-row kernel blocks: staged into 32-row spans
    generator = torch.Generator().manual_seed(3)

    def case(rows: int, cols: int):
        codes, scale = quantize_fp8(torch.randn(rows, cols, generator=generator), BLOCK, torch.float32, False)
        info, read = info_of(codes, scale, BLOCK), reader(codes, scale)
        update = Update("m", "linear", torch.randn(4, cols, generator=generator), torch.randn(rows, 4, generator=generator), 0.3)  # fmt: skip
        return info, read, [update]

    def run(info, read, updates, buffers):
        blocks = merged_blocks(fp8.rows(info, read), updates, keep_base=True)
        return requantize_blocks(info, blocks, fp8.band_quantizer(info, read), read(info.codes), buffers)

    cases = [case(*SHAPE), case(SHAPE[1], SHAPE[0]), case(45, 333)]
    fresh = [run(*c, None) for c in cases]
    buffers: dict = {}
    for i in (0, 1, 2, 0, 2, 1):
        got = run(*cases[i], buffers)
        for name, tensor in fresh[i].tensors.items():
            assert torch.equal(got.tensors[name].view(torch.uint8), tensor.view(torch.uint8)), (i, name)
        assert (got.kept, got.update, got.codes_changed) == (
            fresh[i].kept,
            fresh[i].update,
            fresh[i].codes_changed,
        )
        for buffer in buffers.values():  # what a buffer holds must never be read before it is written
            buffer.view(torch.uint8).fill_(0xFF)  # NaN in float32, True in bool
    assert buffers  # the buffers were kept


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bands")
    plain = make_llama(root / "plain", hidden_size=72, dtype=torch.bfloat16)
    adapter = make_adapter(plain, root / "lora", target_modules=TARGETS)
    return store_fp8(plain, root / "fp8", BLOCK, torch.float32, False, fp8_config(BLOCK)), adapter


@pytest.mark.parametrize("extra", [(), ("--requantize",)], ids=["unquantized", "requantize"])
def test_a_merge_in_bands_writes_the_bytes_of_the_whole_tensor_route(monkeypatch, model, tmp_path, extra):
    base, adapter = model
    monkeypatch.setattr(delta, "BLOCK_ELEMENTS", 72 * 5)  # 5-row blocks: staged into 32-row spans

    def whole():  # the formats' band functions gone: every tensor decoded whole
        monkeypatch.delattr(fp8, "rows")
        monkeypatch.delattr(fp8, "band_quantizer")

    merged_two_ways(base, adapter, tmp_path, extra, whole, tolerance=1e-12)
