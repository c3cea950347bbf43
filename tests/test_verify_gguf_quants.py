"""`lorasurgery verify` of block-quantized merged GGUF models (docs/verify.md "Quantized GGUF").

No llama.cpp needed: the GGUF files are written here (factories.write_gguf_model) from a tiny real
Llama with 256-wide rows (the K-quants' super-block) merged with a real PEFT adapter by PEFT, every
2-D tensor in one block type: Q8_0 / Q4_0 / Q5_1 by the `gguf` package's quantizer, Q2_K … Q6_K
by factories.quantize_gguf's nearest rounding in gguf.quants' layouts. verify decodes them with
gguf.quants.dequantize and reads each tensor's rounding from its block scales.

A landed merge passes at every type, its retention ρ within its uncertainty of ρ*, what W + ΔW
rounded on the file's own grid shows; the base converted alone is `missing`, a double merge
`applied twice`, at every type — never a pass because the rounding hides the update. A tiny update
lands at Q8_0 but at Q2_K its rounding noise is too large: `cannot tell at this quantization`
(exit 1). A base already on a Q4_1 grid (SmolLM2's case) is judged against that grid's ρ*, not 1.
benchmarks/llamacpp_export_lora_check.py runs the same checks on llama.cpp's own export-lora and
llama-quantize.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from clihelp import DID_NOT_LAND, LANDED, assert_refused, run_cli, verify
from factories import make_adapter, make_llama, peft_merged_state_dict, quantize_gguf, write_gguf_model
from safetensors.torch import load_file, save_file

from lorasurgery.commands.verify.gguf_quants import half_step_norm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q4_0", "Q5_1"]


@pytest.mark.parametrize("kind", [*TYPES, "Q4_1", "Q5_0"])
def test_half_step_bounds_the_rounding(kind):
    """‖½ step‖ read from the block scales bounds ‖dequantize(quantize(x)) − x‖ and is tight: nearest
    rounding errs by step/√12 per element on average, 0.58 of the bound."""
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32) * 0.05
    blocks = quantize_gguf(x, kind)
    error = np.linalg.norm(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]) - x)
    bound = half_step_norm(blocks, kind)
    assert 0.45 * bound < error <= bound, (error, bound)
    assert half_step_norm(quantize_gguf(4 * x, kind), kind) == pytest.approx(4 * bound, rel=0.02)


def in_type(kind: str):
    """Every 2-D tensor whose rows fit the type's blocks in `kind`, the rest (norms) F32."""
    return lambda name, value: kind if value.dim() == 2 and value.shape[-1] % 256 == 0 else "F32"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-gguf-quants")
    base = make_llama(root / "base", hidden_size=256, layers=1)
    adapter = make_adapter(base, root / "adapter", seed=2, target_modules=TARGETS)
    W = load_file(base / "model.safetensors")
    merged = peft_merged_state_dict(base, [adapter])
    twice = {k: 2 * merged[k] - W[k] for k in W}  # the adapter merged into the merged model
    return root, base, adapter, W, merged, twice


@pytest.mark.parametrize("kind", TYPES)
def test_quantized_merge_lands_and_broken_ones_fail(llama, kind):
    root, base, adapter, W, merged, twice = llama
    code, report = verify(
        base, adapter, write_gguf_model(merged, base, root / f"merged-{kind}.gguf", in_type(kind))
    )
    assert code == LANDED and report["landed"] and not report["changed"], report
    assert {c["tensor"].split(".")[-2] for c in report["checks"]} == set(TARGETS)
    for check in report["checks"]:  # the retention is said, with its uncertainty
        rho, on_grid, u = check["retention"], check["retention_on_grid"], check["retention_uncertainty"]
        assert abs(rho - on_grid) <= u < 0.5 and abs(rho - 1) < 0.1, check
    code, report = verify(base, adapter, write_gguf_model(W, base, root / f"base-{kind}.gguf", in_type(kind)))
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {"missing"}, report
    assert not report["changed"]  # the untouched tensors are within their rounding
    code, report = verify(
        base, adapter, write_gguf_model(twice, base, root / f"twice-{kind}.gguf", in_type(kind))
    )
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {"applied twice"}, report


def test_tiny_update_cannot_be_told_at_two_bits(llama, tmp_path):
    """An update 10⁻³ of the weights: Q8_0 resolves it (landed), Q2_K's rounding is ~600 times it:
    `cannot tell at this quantization`, exit 1, never `landed`; the table says so."""
    root, base, _, W, _, _ = llama
    tiny = make_adapter(base, tmp_path / "tiny", seed=3, target_modules=TARGETS, lora_alpha=0.02)
    merged = peft_merged_state_dict(base, [tiny])
    code, report = verify(base, tiny, write_gguf_model(merged, base, tmp_path / "q8.gguf", in_type("Q8_0")))
    assert code == LANDED, report
    artifact = write_gguf_model(merged, base, tmp_path / "q2.gguf", in_type("Q2_K"))
    code, report = verify(base, tiny, artifact)
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {
        "cannot tell at this quantization"
    }
    for check in report["checks"]:
        assert check["retention_uncertainty"] > 0.5, check
    result = run_cli("verify", base, tiny, artifact)
    assert result.exit_code == DID_NOT_LAND and "cannot tell at this quantization" in result.stdout
    assert "± " in result.stdout  # ρ's uncertainty said beside ρ
    # the base alone at Q2_K cannot be told from it either: not `landed`, not `missing`
    code, report = verify(base, tiny, write_gguf_model(W, base, tmp_path / "q2-base.gguf", in_type("Q2_K")))
    assert code == DID_NOT_LAND and {c["verdict"] for c in report["checks"]} == {
        "cannot tell at this quantization"
    }


def test_unbounded_type_is_refused(llama, tmp_path):
    """A type with a non-uniform grid (IQ4_NL): refused by name, file and tensor, exit 1."""
    root, base, adapter, W, merged, _ = llama
    artifact = tmp_path / "iq4.gguf"
    writer = gguf.GGUFWriter(artifact, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    raw = np.zeros((256, 256 // 32 * type_size), dtype=np.uint8)
    writer.add_tensor(
        "blk.0.attn_q.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL
    )
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = assert_refused(["verify", base, adapter, artifact], "IQ4_NL", inputs=[base, adapter, artifact])
    assert "blk.0.attn_q.weight" in result.stderr and str(artifact) in result.stderr


def test_transposed_square_update(llama, tmp_path):
    """A square ΔW landed transposed at Q4_K: `transposed`, told apart from missing by ρ against ΔWᵀ."""
    root, base, adapter, W, merged, _ = llama
    name = "model.layers.0.self_attn.o_proj.weight"
    broken = dict(merged)
    broken[name] = W[name] + (merged[name] - W[name]).T
    code, report = verify(base, adapter, write_gguf_model(broken, base, tmp_path / "t.gguf", in_type("Q4_K")))
    verdicts = {c["tensor"]: c["verdict"] for c in report["checks"]}
    assert code == DID_NOT_LAND and verdicts.pop(name) == "transposed", report
    assert set(verdicts.values()) == {"landed"}


def test_base_already_on_a_grid(tmp_path):
    """A base whose weights already lie on a Q4_1 grid (as SmolLM2 dequantized from its Q4_1 GGUF)
    is requantized without dither: the rounding follows ΔW, so ρ is what W + ΔW rounded on the file's
    own grid shows (ρ*), not 1. Q5_1 halves that grid's step and stretches a small update (ρ* > 1.2:
    landed, ρ said); Q4_K keeps the 4-bit grid and rounds most of it away: never `landed`."""
    base = make_llama(tmp_path / "base", hidden_size=256, layers=1)
    W = load_file(base / "model.safetensors")
    for name, value in W.items():
        if value.dim() == 2:
            codes = quantize_gguf(value.numpy(), "Q4_1")
            decoded = gguf.quants.dequantize(codes, gguf.GGMLQuantizationType.Q4_1)
            W[name] = torch.from_numpy(decoded.reshape(value.shape).copy())
    save_file(W, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", seed=2, target_modules=TARGETS, lora_alpha=0.4)
    merged = peft_merged_state_dict(base, [adapter])
    code, report = verify(
        base, adapter, write_gguf_model(merged, base, tmp_path / "q5_1.gguf", in_type("Q5_1"))
    )
    assert code == LANDED, report
    for check in report["checks"]:
        assert abs(check["retention"] - check["retention_on_grid"]) <= check["retention_uncertainty"], check
        assert check["retention_on_grid"] > 1.2, check
    code, report = verify(
        base, adapter, write_gguf_model(merged, base, tmp_path / "q4_k.gguf", in_type("Q4_K"))
    )
    assert code == DID_NOT_LAND, report
    for check in report["checks"]:
        assert (
            check["verdict"] in ("cannot tell at this quantization", "partly") and check["retention"] < 0.2
        ), check
