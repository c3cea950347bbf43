"""Checkpoint I/O: round trips through the safetensors library, sharding, validation, atomic output."""

from __future__ import annotations

import json
import os
import struct

import pytest
import safetensors.torch as st
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from lorasurgery.errors import CheckpointError, OutputError
from lorasurgery.io import (
    SafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    dtype_code_of,
    open_checkpoint,
    plan_shards,
    save_tensors,
    torch_dtype_of,
)
from lorasurgery.io.safetensors_format import encode_header, parse_safetensors_header

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        values = torch.randn(3, 5, generator=g) * 4
        tensors[f"t{i}.{str(dtype)[6:]}"] = values.to(dtype) if dtype != torch.bool else values > 0
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 7)
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_written_file_reads_back_identically_with_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    save_tensors(tmp_path, tensors)
    loaded = st.load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor), name
    with open(tmp_path / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt"}
    assert n % 8 == 0


def test_reader_returns_identical_tensors_from_a_safetensors_library_file(tmp_path):
    tensors = sample_tensors()
    st.save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = open_checkpoint(tmp_path, raw=True)  # float8 payloads: the raw layer serves them
    assert set(checkpoint.tensors) == set(tensors)
    streamed = dict(checkpoint.iter_tensors())
    for name, tensor in tensors.items():
        assert same_bits(streamed[name], tensor), name
        assert checkpoint.tensors[name].shape == tuple(tensor.shape)


def test_read_tensor_owns_its_memory(tmp_path):
    st.save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    checkpoint = open_checkpoint(tmp_path)
    first = checkpoint.read("w")
    first.add_(1)  # must not touch the file or later reads
    assert torch.equal(checkpoint.read("w"), torch.ones(4, 4))


def test_sharded_write_follows_hugging_face_layout_and_reads_back(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    specs = [TensorSpec(n, "F32", (64, 64)) for n in tensors]
    shards = plan_shards(specs, max_shard_bytes=40_000)
    assert [len(s) for s in shards] == [2, 2, 1]
    writer = SafetensorsWriter(tmp_path, shards)
    for name in reversed(list(tensors)):  # any order: offsets are planned up front
        writer.write(name, tensors[name])
    summary = writer.close()
    assert [f.name for f in summary.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert index["weight_map"]["layer4.weight"] == "model-00003-of-00003.safetensors"
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.is_sharded and checkpoint.shard_groups() == [
        [s.name for s in shard] for shard in shards
    ]
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.read(name), tensor)
        assert torch.equal(st.load_file(tmp_path / index["weight_map"][name])[name], tensor)


def test_plan_shards_like_a_source_and_a_tensor_larger_than_the_limit():
    specs = [TensorSpec("a", "F32", (10,)), TensorSpec("b", "F32", (1000,)), TensorSpec("c", "F32", (10,))]
    assert [[s.name for s in shard] for shard in plan_shards(specs, max_shard_bytes=100)] == [
        ["a"],
        ["b"],
        ["c"],
    ]
    assert [[s.name for s in shard] for shard in plan_shards(specs, groups=[["c"], ["a"]])] == [
        ["c"],
        ["a", "b"],
    ]


def test_copy_raw_is_byte_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tensors = sample_tensors()
    st.save_file(tensors, src / "model.safetensors")
    checkpoint = open_checkpoint(src, raw=True)  # every dtype, float8 codes included, copied as bytes
    out = tmp_path / "out"
    out.mkdir()
    specs = [TensorSpec.like(info) for info in checkpoint.tensors.values()]
    with SafetensorsWriter(out, [specs]) as writer:
        for info in checkpoint.tensors.values():
            writer.copy_raw(info.name, info)
    copied = open_checkpoint(out, raw=True)
    for name, info in checkpoint.tensors.items():
        with open(info.file, "rb") as a, open(copied.tensors[name].file, "rb") as b:
            a.seek(info.start)
            b.seek(copied.tensors[name].start)
            assert a.read(info.nbytes) == b.read(info.nbytes)


def test_writer_refuses_a_tensor_that_does_not_match_the_plan(tmp_path):
    writer = SafetensorsWriter(tmp_path, [[TensorSpec("w", "BF16", (2, 2))]])
    with pytest.raises(OutputError, match="planned BF16"):
        writer.write("w", torch.zeros(2, 2))
    with pytest.raises(OutputError, match="never written"):
        writer.close()


def test_pickle_checkpoint_is_read_with_weights_only(tmp_path):
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.tensors["a"].dtype == "F32" and checkpoint.tensors["b"].dtype == "I64"
    assert torch.equal(checkpoint.read("a"), tensors["a"])


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    import pathlib  # any non-tensor class: weights_only refuses to construct it

    torch.save({"a": pathlib.PurePosixPath("/etc")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        open_checkpoint(tmp_path)


def write_raw_file(path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> None:
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header) if length is None else length) + header + data)


@pytest.mark.parametrize(
    ("header", "data", "length", "message"),
    [
        (b"", b"", 2**60, "header length"),
        (b"{}", b"", 500, "truncated"),
        (b"{not json", b"", None, "malformed safetensors header"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the file"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None, "needs 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "0 ≤ begin ≤ end"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}',
            b"\0" * 4,
            None,
            "duplicate key",
        ),
        ({"__metadata__": {"format": 1}}, b"", None, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused_naming_the_file(tmp_path, header, data, length, message):
    path = tmp_path / "model.safetensors"
    write_raw_file(path, header, data, length)
    with pytest.raises(CheckpointError, match=message) as raised:
        open_checkpoint(tmp_path)
    assert str(path) in str(raised.value)


def test_short_and_text_files_are_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(tmp_path)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just a long enough text file\n")
    with pytest.raises(CheckpointError, match="header length|truncated"):
        open_checkpoint(text)


@pytest.mark.parametrize(
    "shard_name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", 7]
)
def test_index_shard_names_must_stay_inside_the_folder(tmp_path, shard_name):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard_name}}))
    with pytest.raises(CheckpointError, match="plain file name"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_shard_or_tensor_is_refused(tmp_path):
    st.save_file({"w": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": {"v": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="'v' is not in its shard"):
        open_checkpoint(tmp_path)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    st.save_file({"w": torch.zeros(2)}, outside / "real.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    os.symlink(outside / "real.safetensors", model / "shard.safetensors")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "shard.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the folder"):
        open_checkpoint(model)


def test_folder_without_weights_and_adapter_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="PEFT adapter folder"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=hs.binary(max_size=300), file_extra=hs.integers(0, 1000))
def test_fuzzed_header_bytes_never_crash(raw, file_extra):
    try:
        header = parse_safetensors_header("fuzz.safetensors", raw, 8 + len(raw) + file_extra)
    except CheckpointError as error:
        assert "fuzz.safetensors" in str(error)
    else:
        for info in header.tensors.values():
            assert 8 + len(raw) <= info.start <= info.end <= 8 + len(raw) + file_extra


json_values = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | hs.text(max_size=8),
    lambda children: (
        hs.lists(children, max_size=4) | hs.dictionaries(hs.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)
entries = hs.fixed_dictionaries(
    {
        "dtype": hs.sampled_from(["F32", "BF16", "I8", "F4", "F6_E2M3", "X"]) | hs.text(max_size=4),
        "shape": hs.lists(hs.integers(-2, 2**40), max_size=4) | json_values,
        "data_offsets": hs.lists(hs.integers(-5, 2**40), min_size=0, max_size=3) | json_values,
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=hs.dictionaries(hs.text(max_size=5), entries | json_values, max_size=5),
    data_size=hs.integers(0, 4096),
)
def test_fuzzed_structured_headers_are_accepted_only_when_consistent(tensors, data_size):
    raw = encode_header(tensors, None)[8:]
    try:
        header = parse_safetensors_header("fuzz.safetensors", raw, 8 + len(raw) + data_size)
    except CheckpointError:
        return
    spans = sorted((t.start, t.end) for t in header.tensors.values() if t.end > t.start)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end
    for info in header.tensors.values():
        assert info.end <= 8 + len(raw) + data_size
        assert info.end - info.start == info.nbytes


def test_atomic_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as temp:
        (temp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("fail mid-way")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as temp:
        (temp / "done").write_text("ok")
        assert not out.exists()
    assert (out / "done").read_text() == "ok"
    with pytest.raises(OutputError, match="already exists; pass --force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as temp:
        (temp / "new").write_text("ok")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_inside_or_containing_an_input_is_refused_even_with_force(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"")
    for out, word in ((base, "inside"), (base / "merged", "inside"), (tmp_path, "contains")):
        with pytest.raises(OutputError, match=word):
            with atomic_output_dir(out, inputs=[base], force=True):
                pass
    # beside a single-file input is fine
    with atomic_output_dir(tmp_path / "beside", inputs=[base / "model.safetensors"]):
        pass


def test_stale_temp_folder_of_a_dead_process_is_removed(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.lorasurgery-tmp-{2**22 + 12345}-abcd1234"  # above pid_max: not alive
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    with atomic_output_dir(out):
        pass
    assert not stale.exists() and out.is_dir()


def test_dtype_codes_round_trip():
    for dtype in DTYPES:
        assert torch_dtype_of(dtype_code_of(dtype)) == dtype
