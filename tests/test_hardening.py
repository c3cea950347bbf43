"""Hostile inputs, interrupted runs, full disks and large files, for every command (docs/design.md §7).

Checkpoints here are written directly with the library's writer (no transformers), so that cases
are fast and bytes can be corrupted precisely. Every bad input must give exit code 1, `Error: …`
naming the file, no traceback, no output left behind and inputs byte-identical.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clihelp import assert_refused, tree_digest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as hs

from lorasurgery.adapter.config import parse_adapter_config
from lorasurgery.errors import LoraSurgeryError
from lorasurgery.io import SafetensorsWriter, TensorSpec, open_checkpoint, save_tensors

HIDDEN = 16
LAYERS = 2
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN}


def write_model(
    folder: Path, layers: int = LAYERS, hidden: int = HIDDEN, seed: int = 0, scale: float = 1.0
) -> Path:
    """A checkpoint with Llama-style names: q/v projections per layer and a norm."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = (
                torch.randn(hidden, hidden, generator=g) * scale
            )
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    save_tensors(folder, tensors)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def write_adapter(folder: Path, layers: int = LAYERS, hidden: int = HIDDEN, r: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        stem = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{stem}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        tensors[f"{stem}.lora_B.weight"] = torch.randn(hidden, r, generator=g) * 0.1
    save_tensors(folder, tensors, stem="adapter_model")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def good(tmp_path):
    base = write_model(tmp_path / "base")
    finetuned = write_model(tmp_path / "ft", seed=0)
    tensors = dict(open_checkpoint(finetuned).iter_tensors())
    tensors["model.layers.0.self_attn.q_proj.weight"] += 0.01 * torch.ones(HIDDEN, HIDDEN)
    save_tensors(finetuned, tensors)
    adapter = write_adapter(tmp_path / "adapter")
    return base, finetuned, adapter


def corrupt(folder: Path, how: str) -> str:
    """Damage folder/model.safetensors in one precise way; return the message expected."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    name = "model.layers.0.self_attn.q_proj.weight"

    def rewrite(new_header: dict | bytes, new_body: bytes = body, length: int | None = None) -> None:
        raw = new_header if isinstance(new_header, bytes) else json.dumps(new_header).encode()
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + new_body)

    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
        return "outside the file"
    if how == "length_overflow":
        rewrite(b"{}", b"", length=2**60)
        return "header length 1152921504606846976 exceeds"
    if how == "not_json":
        rewrite(b"\x00garbage{")
        return "malformed safetensors header"
    if how == "unknown_dtype":
        header[name]["dtype"] = "F13"
        rewrite(header)
        return "unknown dtype 'F13'"
    if how == "out_of_bounds":
        header[name]["data_offsets"] = [len(body), len(body) + HIDDEN * HIDDEN * 4]
        rewrite(header)
        return "lie outside the file"
    if how == "overlapping":
        other = "model.layers.0.self_attn.v_proj.weight"
        header[other]["data_offsets"] = list(header[name]["data_offsets"])
        rewrite(header)
        return "overlap in the file"
    if how == "span_mismatch":
        header[name]["shape"] = [HIDDEN, HIDDEN + 1]
        rewrite(header)
        return "needs"
    if how == "text_file":
        path.write_text("I am a README, not a model.\n" * 20)
        return "header length"
    raise AssertionError(how)


CORRUPTIONS = [
    "truncated",
    "length_overflow",
    "not_json",
    "unknown_dtype",
    "out_of_bounds",
    "overlapping",
    "span_mismatch",
    "text_file",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("command", ["inspect", "merge", "extract", "rank-report"])
def test_corrupt_base_checkpoints_are_refused_by_every_command(good, tmp_path, command, how):
    base, finetuned, adapter = good
    expected = corrupt(base, how)
    out = tmp_path / "out"
    args = {
        "inspect": ["inspect", adapter, "--base", base],
        "merge": ["merge", base, adapter, "-o", out],
        "extract": ["extract", base, finetuned, "-o", out, "--rank", "1"],
        "rank-report": ["rank-report", finetuned, "--base", base],
    }[command]
    result = assert_refused(args, expected, inputs=[base, finetuned, adapter], output=out)
    assert str(base / "model.safetensors") in result.stderr


@pytest.mark.parametrize(
    ("weight_map", "expected"),
    [
        ({"w": "../outside.safetensors"}, "is not a plain file name inside the folder"),
        ({"w": "/etc/passwd"}, "is not a plain file name inside the folder"),
        ({"w": "model-00009-of-00009.safetensors"}, "does not exist"),
        ("not a map", "malformed index"),
    ],
)
def test_hostile_indexes_are_refused(good, tmp_path, weight_map, expected):
    base, _, adapter = good
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    assert_refused(["merge", base, adapter, "-o", out], expected, inputs=[base, adapter], output=out)


def test_adapter_for_another_architecture_and_nonfinite_base(good, tmp_path):
    base, _, _ = good
    wide = write_adapter(tmp_path / "wide", hidden=HIDDEN * 2)
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, wide, "-o", out],
        "expects a weight of shape [32, 32]",
        inputs=[base, wide],
        output=out,
    )
    nan_base = write_model(tmp_path / "nanbase")
    tensors = dict(open_checkpoint(nan_base).iter_tensors())
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_tensors(nan_base, tensors)
    adapter = write_adapter(tmp_path / "adapter2")
    assert_refused(
        ["merge", nan_base, adapter, "-o", out],
        "model.layers.1.self_attn.q_proj",
        inputs=[nan_base, adapter],
        output=out,
    )


# -------------------------------------------------------------------------------------------------
# Interrupted runs


def big_pair(tmp_path: Path, megabytes: int = 240) -> tuple[Path, Path]:
    """A base of ~`megabytes` MB in 4 MB tensors, written tensor by tensor, and an adapter on it."""
    hidden = 1024  # 1024 × 1024 float32 = 4 MB per weight
    layers = megabytes // 8
    folder = tmp_path / "bigbase"
    folder.mkdir()
    specs = [
        TensorSpec(f"model.layers.{i}.self_attn.{p}.weight", "F32", (hidden, hidden))
        for i in range(layers)
        for p in ("q_proj", "v_proj")
    ]
    writer = SafetensorsWriter(folder, [specs])
    g = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, torch.randn(hidden, hidden, generator=g))
    writer.close()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder, write_adapter(tmp_path / "bigadapter", layers=layers, hidden=hidden, r=4)


def finetune_of(base: Path, folder: Path, change) -> Path:
    """A 'fine-tune' of `base`: every tensor passed through `change`, streamed tensor by tensor."""
    folder.mkdir()
    checkpoint = open_checkpoint(base)
    specs = [TensorSpec.like(info) for info in checkpoint.tensors.values()]
    with SafetensorsWriter(folder, [specs]) as writer:
        for name, tensor in checkpoint.iter_tensors():
            writer.write(name, change(tensor))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


# Sets the child's SIGINT and SIGTERM, then execs lorasurgery (same pid). Without it the child would
# inherit however this suite was started: an ignored signal stays ignored across fork and exec, and
# `cmd &`, nohup and many CI runners start the suite with SIGINT ignored.
LAUNCHER = """
import os, signal, sys
ignored = {int(number) for number in sys.argv[1].split(",") if number}
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
os.execv(sys.executable, [sys.executable, "-m", "lorasurgery", *sys.argv[2:]])
"""


def start(*args: str | Path, ignore: tuple[signal.Signals, ...] = ()) -> subprocess.Popen:
    """`lorasurgery ARGS` started as a terminal starts it, with SIGINT and SIGTERM at their defaults
    (a Ctrl-C reaches it), except the signals in `ignore`, ignored as a background job finds SIGINT."""
    ignored = ",".join(str(int(sig)) for sig in ignore)
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ignored, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def temp_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.lorasurgery-tmp-*"))


def wait_for_temp(process: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not temp_dirs(out):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGSTOP)  # freeze it mid-write, so the signal lands mid-way for sure
    assert not out.exists(), "the run finished before it could be interrupted"


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def wait_until_read(process: subprocess.Popen, nbytes: int, timeout: float = 60) -> None:
    """Wait until the process has read `nbytes` (its /proc I/O counter): mid-way through its inputs."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never read its inputs"
        io = dict(line.split(": ") for line in Path(f"/proc/{process.pid}/io").read_text().splitlines())
        if int(io["rchar"]) >= nbytes:
            return
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, ignore",
    [(signal.SIGINT, ()), (signal.SIGTERM, ()), (signal.SIGTERM, (signal.SIGINT,))],
    ids=["SIGINT", "SIGTERM", "SIGTERM-with-SIGINT-ignored"],
)
def test_interrupted_merge_leaves_nothing(tmp_path, sig, ignore):
    base, adapter = big_pair(tmp_path)
    before = tree_digest(base, adapter)
    out = tmp_path / "merged"
    process = start("merge", base, adapter, "-o", out, ignore=ignore)
    wait_for_temp(process, out)
    os.kill(process.pid, sig)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert stderr.decode().startswith("Error: interrupted")
    assert not out.exists() and not temp_dirs(out)
    assert tree_digest(base, adapter) == before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ignored_at_start_stays_ignored_and_the_merge_completes(tmp_path, sig):
    """The Unix convention (docs/design.md §7): `cmd &` and nohup start a job with SIGINT ignored,
    since a Ctrl-C at the terminal is not meant for it, and it keeps ignoring it. So a merge sent a
    signal it started with ignored runs on: exit 0 and the same output as an undisturbed merge."""
    base, adapter = big_pair(tmp_path, megabytes=64)
    out, reference = tmp_path / "merged", tmp_path / "reference"
    process = start("merge", base, adapter, "-o", out, ignore=(sig,))
    wait_for_temp(process, out)
    os.kill(process.pid, sig)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert out.is_dir() and not temp_dirs(out)
    undisturbed = start("--quiet", "merge", base, adapter, "-o", reference)
    _, stderr = undisturbed.communicate(timeout=120)
    assert undisturbed.returncode == 0, stderr.decode()
    assert digests_by_name(out) == digests_by_name(reference) != {}


def digests_by_name(folder: Path) -> dict[str, str]:
    return {Path(path).name: digest for path, digest in tree_digest(folder).items()}


@pytest.mark.slow
def test_killed_merge_leaves_a_hidden_temp_that_the_next_run_removes(tmp_path):
    base, adapter = big_pair(tmp_path)
    out = tmp_path / "merged"
    process = start("merge", base, adapter, "-o", out)
    wait_for_temp(process, out)
    process.kill()
    process.communicate(timeout=60)
    leftovers = temp_dirs(out)
    assert not out.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".")
    finished = subprocess.run(
        [sys.executable, "-m", "lorasurgery", "--quiet", "merge", base, adapter, "-o", out],
        capture_output=True,
        text=True,
    )
    assert finished.returncode == 0, finished.stderr
    assert out.is_dir() and not temp_dirs(out)


@pytest.mark.slow
def test_killed_extract_leaves_nothing(tmp_path):
    base, _ = big_pair(tmp_path, megabytes=48)
    finetuned = finetune_of(base, tmp_path / "ft", lambda t: t + 0.01 * torch.randn_like(t))
    out = tmp_path / "extracted"
    process = start("extract", base, finetuned, "-o", out, "--energy", "0.9", "--svd", "exact")
    wait_until_read(process, checkpoint_bytes(base))  # the pairs are being read and factored
    process.kill()
    process.communicate(timeout=60)
    assert not out.exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "lorasurgery", "-q", "extract", base, finetuned, "-o", out, "--rank", "1"],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert not temp_dirs(out)


def limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_gives_a_clean_error_and_no_output(tmp_path):
    base = write_model(tmp_path / "base", layers=8, hidden=256)  # ~4 MB
    adapter = write_adapter(tmp_path / "adapter", layers=8, hidden=256)
    out = tmp_path / "merged"
    before = tree_digest(base, adapter)
    result = subprocess.run(
        [sys.executable, "-m", "lorasurgery", "merge", str(base), str(adapter), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size(1_000_000),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: File too large") and "Traceback" not in result.stderr
    assert not out.exists() and not temp_dirs(out)
    assert tree_digest(base, adapter) == before


# -------------------------------------------------------------------------------------------------
# Large files: peak memory follows the largest tensor, not the checkpoint


def peak_rss_of(args: list) -> int:
    code = (
        "import resource, subprocess, sys;"
        "r = subprocess.run(sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024);"
        "sys.exit(r.returncode)"
    )
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_merging_a_checkpoint_far_larger_than_the_allowed_peak(tmp_path):
    base, adapter = big_pair(tmp_path, megabytes=600)
    size = (base / "model.safetensors").stat().st_size
    largest = 4 * 1024 * 1024
    idle = peak_rss_of([sys.executable, "-c", "import torch, lorasurgery.cli, lorasurgery.commands.merge"])
    peak = peak_rss_of(
        [sys.executable, "-m", "lorasurgery", "-q", "merge", base, adapter, "-o", tmp_path / "m"]
    )
    allowed = idle + 4 * largest + 100 * 2**20
    assert peak <= allowed, (peak / 2**20, allowed / 2**20)
    assert size > 3 * (peak - idle + largest), "the checkpoint must dwarf what the merge may hold"


# -------------------------------------------------------------------------------------------------
# Fuzzing the parsers of the other input files

json_leaf = (
    hs.none() | hs.booleans() | hs.integers(-5, 2**40) | hs.floats(allow_nan=True) | hs.text(max_size=10)
)
json_value = hs.recursive(
    json_leaf,
    lambda c: hs.lists(c, max_size=3) | hs.dictionaries(hs.text(max_size=8), c, max_size=3),
    max_leaves=12,
)
config_fields = hs.fixed_dictionaries(
    {},
    optional={
        "peft_type": hs.sampled_from(["LORA", "IA3", "lora"]) | json_value,
        "r": hs.integers(-2, 64) | json_value,
        "lora_alpha": hs.integers(-2, 64) | hs.floats() | json_value,
        "rank_pattern": hs.dictionaries(
            hs.text(alphabet="abq_.*()[]\\", max_size=6), hs.integers(-1, 8) | json_value, max_size=3
        )
        | json_value,
        "alpha_pattern": hs.dictionaries(
            hs.text(alphabet="abq_.*()[]\\", max_size=6), hs.floats() | json_value, max_size=3
        )
        | json_value,
        "use_rslora": json_value,
        "bias": hs.sampled_from(["none", "all", "lora_only", "x"]) | json_value,
        "init_lora_weights": hs.sampled_from([True, False, "pissa", "olora_x", "gaussian"]) | json_value,
        "layer_replication": json_value,
        "modules_to_save": json_value,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=config_fields)
def test_fuzzed_adapter_configs_give_a_config_or_a_clear_error(raw):
    try:
        config = parse_adapter_config(raw, Path("fuzz/adapter_config.json"))
    except LoraSurgeryError as error:
        assert "fuzz/adapter_config.json" in str(error)
        return
    assert config.r >= 1 and config.peft_type == "LORA"
    for key in config.rank_pattern:  # every accepted pattern compiles and can be matched
        config.rank_of(f"model.layers.0.{key}")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(index={"weight_map": {"w": []}})  # seed corpus: crashes the fuzzer found, kept as regressions
@example(index={"weight_map": {"w": "\x00"}})
@example(index={"weight_map": {"w": "../../etc/passwd"}})
@given(
    index=json_value
    | hs.fixed_dictionaries(
        {"weight_map": hs.dictionaries(hs.text(max_size=6), hs.text(max_size=12) | json_value, max_size=3)}
    )
)
def test_fuzzed_indexes_give_a_checkpoint_or_a_clear_error(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("index")
    save_tensors(folder, {"w": torch.zeros(2)}, stem="shard")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        checkpoint = open_checkpoint(folder)
    except LoraSurgeryError as error:
        assert "model.safetensors.index.json" in str(error)
        return
    for info in checkpoint.tensors.values():
        assert info.file.parent == folder


@pytest.mark.slow
def test_extracting_from_checkpoints_far_larger_than_the_allowed_peak(tmp_path):
    base, _ = big_pair(tmp_path, megabytes=240)
    g = torch.Generator().manual_seed(1)

    def low_rank_change(t):
        return t + torch.randn(1024, 1, generator=g) @ torch.randn(1, 1024, generator=g) * 0.01

    finetuned = finetune_of(base, tmp_path / "ft", low_rank_change)
    largest = 4 * 1024 * 1024
    idle = peak_rss_of(
        [
            sys.executable,
            "-c",
            "import torch, lorasurgery.cli, lorasurgery.commands.extract.extract, lorasurgery.linalg.svd",
        ]
    )
    peak = peak_rss_of(
        [
            sys.executable,
            "-m",
            "lorasurgery",
            "-q",
            "extract",
            base,
            finetuned,
            "-o",
            tmp_path / "x",
            "--rank",
            "1",
        ]
    )
    inputs = 2 * (base / "model.safetensors").stat().st_size
    assert peak - idle <= 12 * largest + 100 * 2**20, (peak - idle) / 2**20
    assert inputs > 3 * (peak - idle), "the inputs must dwarf what the extraction may hold"
