"""`merge --resume`: a killed merge, started again with the same arguments, keeps the shards it had
finished and writes the same bytes as a merge never interrupted (docs/design.md §7, docs/merge.md).

The runs are real processes killed for real. Most are killed at an exact point: a launcher wraps the
journal's `record` so that the process sends itself SIGKILL (or SIGTERM, SIGINT) just after its
k-th finished shard is journaled, while the shards after it are being written; one is killed from
outside, at whatever point the journal first shows a finished shard. The reference for every
resumed output is the same merge run once, undisturbed: index, config and every shard byte-identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clihelp import run_cli, tree_digest
from factories import make_adapter, make_llama

from lorasurgery.io import open_checkpoint, save_tensors
from lorasurgery.io.journal import JOURNAL_NAME

SHARD = "24KB"  # a few tensors per shard: a dozen shards or more for the models below

# Runs lorasurgery in this process after wrapping Journal.record: once the `after`-th shard of this
# run is journaled, the process sends itself `signal` (SIGKILL: dies on the spot, as kill -9 or the
# OOM killer). SIGINT and SIGTERM start as a terminal leaves them (not ignored).
LAUNCHER = """
import os, signal, sys
from lorasurgery.io import journal
after, how = int(sys.argv[1]), int(sys.argv[2])
record, done = journal.Journal.record, []
def record_then_signal(self, *args):
    record(self, *args)
    done.append(args[0])
    if len(done) == after:
        os.kill(os.getpid(), how)
journal.Journal.record = record_then_signal
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.argv = ["lorasurgery", *sys.argv[3:]]
from lorasurgery.cli import main
main()
"""


def merge_killed(*args, after: int = 2, how: signal.Signals = signal.SIGKILL):
    """`lorasurgery merge ARGS`, signalled just after its `after`-th finished shard is journaled."""
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(after), str(int(how)), "merge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def work_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.lorasurgery-tmp-*"))


def the_work_folder(out: Path) -> Path:
    found = work_folders(out)
    assert len(found) == 1, found
    return found[0]


def journaled(folder: Path) -> dict[str, dict]:
    return json.loads((folder / JOURNAL_NAME).read_text())["shards"]


def digests_by_name(folder: Path) -> dict[str, str]:
    return {Path(path).name: digest for path, digest in tree_digest(folder).items()}


def file_stats(folder: Path, names) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each file: unchanged when a resumed run kept the file and never rewrote it."""
    return {name: ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns) for name in names}


def merged(*args) -> dict:
    result = run_cli("merge", *map(str, args), "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


COUNTS = (
    "tensors",
    "tensors_merged",
    "tensors_replaced",
    "tensors_copied",
    "tensors_converted",
    "tensors_requantized",
)


# -------------------------------------------------------------------------------------------------
# Inputs: a plain float32 Llama, and the same model stored as block-FP8 (transformers' fine-grained
# FP8, as tests/test_quantized_fp8.py builds it)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("plain")
    base = make_llama(folder / "base", hidden_size=64, vocab_size=256, layers=4)
    targets = ["q_proj", "v_proj", "down_proj"]
    return base, make_adapter(base, folder / "adapter", r=4, lora_alpha=8, target_modules=targets)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> tuple[Path, Path]:
    from test_quantized_fp8 import fp8_config, store_fp8

    folder = tmp_path_factory.mktemp("fp8")
    plain_base = make_llama(folder / "bf16", hidden_size=64, vocab_size=256, layers=4, dtype=torch.bfloat16)
    base = store_fp8(plain_base, folder / "base", (32, 32), qconfig=fp8_config((32, 32)))
    adapter = make_adapter(
        plain_base, folder / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"]
    )
    return base, adapter


@pytest.fixture(params=["plain", "fp8", "fp8-requantize"])
def inputs(request, tmp_path) -> tuple[Path, Path, Path, dict, tuple]:
    """(base, adapter, reference output, its summary, the options): the merge run once, undisturbed.
    With --requantize a merged weight is written as codes and scales, which may fall in two shards."""
    base, adapter = request.getfixturevalue(request.param.removesuffix("-requantize"))
    options = ("--max-shard-size", SHARD, *(("--requantize",) if "requantize" in request.param else ()))
    reference = tmp_path / "reference"
    summary = merged(base, adapter, "-o", reference, *options)
    assert len(summary["files"]) >= 8, summary["files"]
    return base, adapter, reference, summary, options


# -------------------------------------------------------------------------------------------------
# Killed, then resumed


def test_a_killed_merge_resumed_writes_the_same_bytes_without_recomputing_finished_shards(inputs, tmp_path):
    base, adapter, reference, expected, options = inputs
    before = tree_digest(base, adapter)
    out = tmp_path / "merged"
    killed = merge_killed(base, adapter, "-o", out, *options, after=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    work = the_work_folder(out)
    finished = journaled(work)
    assert len(finished) == 3 and len(finished) < len(expected["files"])
    kept = file_stats(work, finished)

    summary = merged(base, adapter, "-o", out, *options, "--resume")
    assert summary["shards_reused"] == 3
    assert any("3 of" in note and "reused" in note for note in summary["notes"])
    assert digests_by_name(out) == digests_by_name(reference)
    assert file_stats(out, finished) == kept  # the same files, never opened for writing again
    assert {key: summary[key] for key in COUNTS} == {key: expected[key] for key in COUNTS}
    assert summary["files"] == expected["files"]
    assert not work_folders(out) and not (out / JOURNAL_NAME).exists()
    assert tree_digest(base, adapter) == before


def test_a_merge_killed_from_outside_resumes(plain, tmp_path):
    """As a user kills it: SIGKILL from another process at whatever moment the journal first shows a
    finished shard (the shards after it are being written)."""
    base, adapter = plain
    reference = tmp_path / "reference"
    merged(base, adapter, "-o", reference, "--max-shard-size", "8KB")
    out = tmp_path / "merged"
    process = subprocess.Popen(
        [sys.executable, "-m", "lorasurgery", "merge", base, adapter, "-o", out, "--max-shard-size", "8KB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard was ever journaled"
        folders = work_folders(out)
        try:
            if folders and journaled(folders[0]):
                break
        except (OSError, ValueError):  # not there yet
            pass
        time.sleep(0.001)
    process.kill()
    process.communicate(timeout=60)
    work = the_work_folder(out)
    finished = journaled(work)
    assert finished and not out.exists()
    kept = file_stats(work, finished)

    summary = merged(base, adapter, "-o", out, "--max-shard-size", "8KB", "--resume")
    assert summary["shards_reused"] == len(finished)
    assert digests_by_name(out) == digests_by_name(reference)
    assert file_stats(out, finished) == kept


def test_a_damaged_shard_is_written_again(plain, tmp_path):
    base, adapter = plain
    reference = tmp_path / "reference"
    merged(base, adapter, "-o", reference, "--max-shard-size", SHARD)
    out = tmp_path / "merged"
    merge_killed(base, adapter, "-o", out, "--max-shard-size", SHARD, after=3)
    work = the_work_folder(out)
    damaged, *intact = sorted(journaled(work))
    with open(work / damaged, "r+b") as f:  # one byte of tensor data flipped, the size unchanged
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))

    summary = merged(base, adapter, "-o", out, "--max-shard-size", SHARD, "--resume")
    assert summary["shards_reused"] == 2
    assert any(damaged in note and "written again" in note for note in summary["notes"])
    assert digests_by_name(out) == digests_by_name(reference)


def test_an_unreadable_journal_means_starting_over(plain, tmp_path):
    base, adapter = plain
    reference = tmp_path / "reference"
    merged(base, adapter, "-o", reference, "--max-shard-size", SHARD)
    out = tmp_path / "merged"
    merge_killed(base, adapter, "-o", out, "--max-shard-size", SHARD, after=2)
    (the_work_folder(out) / JOURNAL_NAME).write_text('{"format": 1, "identity": ')  # cut short

    summary = merged(base, adapter, "-o", out, "--max-shard-size", SHARD, "--resume")
    assert summary["shards_reused"] == 0
    assert any("no unfinished merge" in note for note in summary["notes"])
    assert digests_by_name(out) == digests_by_name(reference) and not work_folders(out)


def test_an_interrupted_resumable_merge_keeps_its_work(plain, tmp_path):
    """Ctrl-C or SIGTERM: without --resume the unfinished output is removed (tests/test_hardening.py);
    with it, it stays for the next --resume, and the message says where and how to continue."""
    base, adapter = plain
    reference = tmp_path / "reference"
    merged(base, adapter, "-o", reference, "--max-shard-size", SHARD)
    out = tmp_path / "merged"
    for how in (signal.SIGINT, signal.SIGTERM):
        args = (base, adapter, "-o", out, "--max-shard-size", SHARD, "--resume")
        interrupted = merge_killed(*args, after=2, how=how)
        assert interrupted.returncode == 130, interrupted.stderr
        assert interrupted.stderr.startswith("Error: interrupted; the unfinished output is kept in ")
        assert "--resume" in interrupted.stderr and "Traceback" not in interrupted.stderr
        assert not out.exists()
        assert len(journaled(the_work_folder(out))) >= 2

    summary = merged(base, adapter, "-o", out, "--max-shard-size", SHARD, "--resume")
    assert summary["shards_reused"] >= 3  # the first run's two, and the second's on top of them
    assert digests_by_name(out) == digests_by_name(reference)


def test_an_interrupted_merge_without_resume_still_removes_its_work(plain, tmp_path):
    base, adapter = plain
    out = tmp_path / "merged"
    interrupted = merge_killed(
        base, adapter, "-o", out, "--max-shard-size", SHARD, after=2, how=signal.SIGTERM
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.startswith("Error: interrupted; nothing was written")
    assert not out.exists() and not work_folders(out)


# -------------------------------------------------------------------------------------------------
# Another run's work is never mixed in


def changed_adapter(adapter: Path, folder: Path) -> Path:
    """A copy of `adapter` with every lora_B scaled: another fine-tune of the same shape."""
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    checkpoint = open_checkpoint(adapter / "adapter_model.safetensors")
    tensors = {n: checkpoint.read(n) * (2 if "lora_B" in n else 1) for n in checkpoint.tensors}
    save_tensors(folder, tensors, stem="adapter_model")
    return folder


def test_a_resume_with_other_options_or_inputs_is_refused_and_mixes_nothing(plain, tmp_path):
    base, adapter = plain
    out = tmp_path / "merged"
    moved = tmp_path / "adapter"  # a copy we may change in place
    moved.mkdir()
    for file in adapter.iterdir():
        (moved / file.name).write_bytes(file.read_bytes())
    merge_killed(base, moved, "-o", out, "--max-shard-size", SHARD, after=2)
    work_before = digests_by_name(the_work_folder(out))
    base_before = tree_digest(base)

    refusals = [
        (("--weight", "0.5"), "--weight was not given, is now [0.5]"),
        (("--dtype", "bf16"), "--dtype was 'auto', is now 'bf16'"),
        (("--max-shard-size", "20KB"), "--max-shard-size was"),
    ]
    for extra, expected in refusals:
        shard = () if "--max-shard-size" in extra else ("--max-shard-size", SHARD)
        result = run_cli("merge", base, moved, "-o", out, *shard, *extra, "--resume")
        assert result.exit_code == 1, (result.stderr, result.exception)
        assert result.stderr.startswith("Error: --resume: the unfinished output for "), result.stderr
        assert expected in result.stderr and "run without --resume to start over" in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
        assert digests_by_name(the_work_folder(out)) == work_before  # kept as it was, for a resume

    # another adapter under the same path: named by its file, as changed
    changed = changed_adapter(adapter, tmp_path / "changed")
    (moved / "adapter_model.safetensors").write_bytes((changed / "adapter_model.safetensors").read_bytes())
    result = run_cli("merge", base, moved, "-o", out, "--max-shard-size", SHARD, "--resume")
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert f"input {(moved / 'adapter_model.safetensors').resolve()} has changed" in result.stderr
    assert not out.exists() and digests_by_name(the_work_folder(out)) == work_before
    assert tree_digest(base) == base_before

    # without --resume: the leftover is cleared and the merge starts over, with the new adapter
    reference = tmp_path / "reference"
    merged(base, changed, "-o", reference, "--max-shard-size", SHARD)
    summary = merged(base, moved, "-o", out, "--max-shard-size", SHARD)
    assert summary["shards_reused"] == 0 and not work_folders(out)
    assert digests_by_name(out) == digests_by_name(reference)


def test_resume_with_nothing_to_resume_just_merges(plain, tmp_path):
    base, adapter = plain
    reference = tmp_path / "reference"
    merged(base, adapter, "-o", reference, "--max-shard-size", SHARD)
    out = tmp_path / "merged"
    summary = merged(base, adapter, "-o", out, "--max-shard-size", SHARD, "--resume")
    assert summary["shards_reused"] == 0
    assert any("no unfinished merge" in note for note in summary["notes"])
    assert digests_by_name(out) == digests_by_name(reference)
    assert not work_folders(out) and not (out / JOURNAL_NAME).exists()


def test_a_requantized_weight_split_across_a_kept_shard_and_another(fp8, tmp_path):
    """Shards of one tensor each put a requantized weight's codes and its scales in two files. The
    run is killed late, and its journal then forgets the scales' file (as if that shard had not
    finished): the weight is computed again, and only its scales are written."""
    base, adapter = fp8
    options = ("--max-shard-size", "1KB", "--requantize")
    reference = tmp_path / "reference"
    expected = merged(base, adapter, "-o", reference, *options)
    weight_map = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    out = tmp_path / "merged"
    merge_killed(base, adapter, "-o", out, *options, after=len(expected["files"]) - 2)
    work = the_work_folder(out)
    journal = json.loads((work / JOURNAL_NAME).read_text())
    halves = [  # merged weights (codes and scales computed together), both halves finished
        (weight_map[name.removesuffix("_scale_inv")], weight_map[name])
        for name in weight_map
        if name.endswith("_scale_inv") and ("q_proj" in name or "gate_proj" in name)
    ]
    codes_file, scales_file = next((c, s) for c, s in halves if {c, s} <= set(journal["shards"]) and c != s)
    del journal["shards"][scales_file]
    (work / JOURNAL_NAME).write_text(json.dumps(journal))
    finished = set(journal["shards"])
    kept = file_stats(work, finished)

    summary = merged(base, adapter, "-o", out, *options, "--resume")
    assert summary["shards_reused"] == len(finished) and codes_file in finished
    assert digests_by_name(out) == digests_by_name(reference)
    assert file_stats(out, finished) == kept
