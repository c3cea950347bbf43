"""Checks the quantized-format tests share: a command's JSON through the CLI, two JSON reports equal
up to the checkpoint paths, two adapter folders equal, a broken copy of a quantized checkpoint and its
refusal by the commands; and gpt-oss's MXFP4 experts stored (`store_mxfp4`) and decoded by transformers
(`dequantized_copy`), which the MXFP4 and the MoE tests share."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from clihelp import assert_refused, run_cli
from factories import quantize_mxfp4
from safetensors.torch import load_file, save_file


def cli_json(*args) -> dict:
    """The JSON a command prints (it must succeed)."""
    result = run_cli(*args)
    assert result.exit_code == 0, (args, result.stderr)
    return json.loads(result.stdout)


def same_json(a, b, swap: tuple[str, str], where="") -> None:
    """JSON values equal to 1e-5 relative, strings equal once the quantized path reads as the copy's
    (`swap`: (quantized path, copy's path)); timings are not compared."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if not key.endswith("seconds"):
                same_json(a[key], b[key], swap, f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_json(x, y, swap, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), where
    elif isinstance(a, str):
        assert a.replace(*swap) == b, where
    else:
        assert a == b, where


def same_adapter_folders(a: Path, b: Path) -> None:
    """Two adapter folders hold the same tensors (1e-5 relative)."""
    ours, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7)


def merged_two_ways(base: Path, adapter: Path, folder: Path, extra, switch, tolerance: float) -> None:
    """`merge BASE ADAPTER *extra --json` into folder/first, then again into folder/second after
    `switch()` changed the route: the same bytes, the same retention table (ρ to `tolerance`)."""
    tables = []
    for route in ("first", "second"):
        if route == "second":
            switch()
        report = cli_json("merge", base, adapter, "-o", folder / route, *extra, "--json")
        tables.append({row["tensor"]: row for row in report.get("retention") or []})
    same_checkpoint_bytes(folder / "first", folder / "second")
    assert len(tables[0]) == len(tables[1]) == (8 if "--requantize" in extra else 0)
    for name, row in tables[0].items():
        assert row["codes_changed"] == tables[1][name]["codes_changed"], name
        assert abs(row["retention"] - tables[1][name]["retention"]) <= tolerance, name


def same_checkpoint_bytes(a: Path, b: Path) -> None:
    """Two checkpoint folders' model.safetensors hold the same tensors, in order, byte for byte."""
    first, second = (load_file(folder / "model.safetensors") for folder in (a, b))
    assert list(first) == list(second)
    for name, tensor in second.items():
        assert first[name].dtype == tensor.dtype, name
        assert torch.equal(first[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )


def broken_copy(source: Path, folder: Path, change_tensors=None, change_config=None) -> Path:
    """A copy of the single-file checkpoint `source` at `folder`, its tensors ({name: tensor}) and
    config.json (the whole dict) changed in place by the given functions."""
    folder = shutil.copytree(source, folder)
    if change_tensors is not None:
        tensors = load_file(folder / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if change_config is not None:
        config = json.loads((folder / "config.json").read_text())
        change_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_probe_as_copy(quantized: Path, copy: Path, text: Path) -> None:
    """`rank-report --probe` of a quantized model reports what it reports of its dequantized copy."""
    for folder in (quantized, copy):  # the tiny model has no tokenizer: its tokens are bytes
        (folder / "byte_tokens.json").write_text('{"byte_tokens": true}')
    args = ["--probe", "--text", text, "--tokens", "64", "--probe-fractions", "0.5", "--json", "-"]
    ours, theirs = cli_json("rank-report", quantized, *args), cli_json("rank-report", copy, *args)
    same_json(ours, theirs, (str(quantized), str(copy)))


def assert_broken_base_refused(
    folder: Path, adapter: Path, out: Path, expected: str, *, at_open: bool, **how
):
    """A broken quantized base: merge refuses it (nothing written, the message starting with the file,
    `how["files"]` a regex of the file names, `how["then"]` of what follows), and so does a second
    command — inspect when the layout is checked at open, else a reader of the tensor
    (`how["read"]`: its arguments, rank-report of the base by default)."""
    result = assert_refused(
        ["merge", folder, adapter, "-o", out], expected, inputs=[folder, adapter], output=out
    )
    files, then = how.get("files", r"model\.safetensors|config\.json"), how.get("then", "")
    assert re.match(rf"Error: {re.escape(str(folder))}/({files}): {then}", result.stderr), result.stderr
    if at_open:
        assert_refused(["inspect", adapter, "--base", folder], expected, inputs=[folder])
    else:
        assert_refused(how.get("read", ["rank-report", folder, "--json", "-"]), expected, inputs=[folder])


def merge_fp32_verified(base: Path, adapter: Path, out: Path) -> dict:
    """`merge --dtype fp32 --verify` of a quantized base (it must succeed and say verified): the
    merged tensors, every one float32."""
    result = run_cli("merge", base, adapter, "-o", out, "--dtype", "fp32", "--verify")
    assert result.exit_code == 0, result.stderr
    assert "verified" in result.stdout
    merged = load_file(out / "model.safetensors")
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32, name
    return merged


def assert_loads_unquantized(out: Path, ours: dict) -> None:
    """The merged folder loads with AutoModelForCausalLM as a plain model (no key missing,
    unexpected or mismatched, no quantization_config), holding exactly the tensors we wrote."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert getattr(model.config, "quantization_config", None) is None
    state = model.state_dict()
    assert all(torch.equal(state[name], ours[name]) for name in ours)


def save_dequantized_copy(plain: dict, source: Path, folder: Path) -> Path:
    """The float tensors `plain` saved at `folder` as the unquantized copy of the checkpoint `source`:
    its config.json without quantization_config, dtype float32."""
    save_file(plain, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QCONFIG = {  # as openai/gpt-oss-20b's config.json declares it
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def store_quantized(plain: Path, folder: Path, encode, qconfig) -> Path:
    """`plain` with each tensor that `encode(name, W)` turns into stored parts ({name: tensor}) stored
    so, the rest as it is; `qconfig` the config's quantization_config (None: left out)."""
    folder.mkdir(parents=True)
    stored = {}
    for name, W in load_file(plain / "model.safetensors").items():
        stored.update(encode(name, W) or {name: W})
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def store_mxfp4(plain: Path, folder: Path, qconfig=QCONFIG) -> Path:
    """`plain` with its experts' fused parameters stored as MXFP4; the rest as it is."""

    def encode(name, W):
        if name.endswith(EXPERTS):
            blocks, scales = quantize_mxfp4(W)
            return {f"{name}_blocks": blocks, f"{name}_scales": scales}
        return None

    return store_quantized(plain, folder, encode, qconfig)


def oracle(blocks, scales):
    """transformers' own dequantization, in float32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def dequantized_copy(mxfp4: Path, folder: Path) -> Path:
    """The MXFP4 checkpoint with its experts dequantized by transformers' function (float32), the
    other tensors as stored."""
    folder.mkdir(parents=True)
    stored = load_file(mxfp4 / "model.safetensors")
    plain = {}
    for name, tensor in stored.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            plain[stem] = oracle(tensor, stored[f"{stem}_scales"])
        else:
            plain[name] = tensor
    return save_dequantized_copy(plain, mxfp4, folder)
