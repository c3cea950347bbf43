"""rank-report --probe on the shipped sample model: full rank changes nothing, loss rises as rank
falls, the fine-tune reference is PEFT's own forward (on GPT-2's Conv1D too, whatever the adapter's
flag says); text handling and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clihelp import assert_refused, run_cli
from factories import make_adapter, make_gpt2, peft_merged_state_dict, relative_error

from lorasurgery.adapter import load_adapter
from lorasurgery.binding import bind
from lorasurgery.causal_lm import load_causal_lm
from lorasurgery.commands.rank_report.probe import (
    Forward,
    ProbeRequest,
    bisect_fractions,
    functional_rank,
    tune,
)
from lorasurgery.io import open_checkpoint
from lorasurgery.textdata import token_ids, token_windows

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"
TEXT = SAMPLES / "corpus" / "Apache-2.0"
TOKENS = 384  # 6 windows of the sample's 64 positions: a probe pass takes milliseconds


def test_full_rank_changes_nothing_in_every_mode():
    for target, base in (
        (SAMPLES / "base", None),
        (SAMPLES / "finetuned", SAMPLES / "base"),
        (SAMPLES / "lora_qv_r8", SAMPLES / "base"),
    ):
        result = functional_rank(ProbeRequest(target, base=base, text=TEXT, tokens=TOKENS, fractions=[1.0]))
        for curve in result.curves:
            (point,) = curve.points
            if result.mode == "weight":
                assert point["loss"] == pytest.approx(result.reference["loss"], rel=1e-5), curve.module_type
            else:
                assert point["kept_effect"] == pytest.approx(1.0, abs=1e-4), curve.module_type
            assert curve.functional_rank == 1.0


def test_loss_rises_as_rank_falls_and_kept_effect_with_it():
    fractions = [0.05, 0.25, 0.75]
    weight = functional_rank(
        ProbeRequest(SAMPLES / "base", text=TEXT, tokens=TOKENS, fractions=fractions, exhaustive=True)
    )
    assert {c.module_type for c in weight.curves} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    for curve in weight.curves:
        losses = [p["loss"] for p in sorted(curve.points, key=lambda p: p["fraction"])]
        assert losses[0] > losses[-1], curve.module_type  # rank 5 % of W is worse than 75 %
        assert losses[0] > weight.reference["loss"] * 1.01, curve.module_type
    summary = weight.summary()
    assert set(summary) == {f"functional_rank_{c.module_type}" for c in weight.curves}
    delta = functional_rank(
        ProbeRequest(
            SAMPLES / "finetuned",
            base=SAMPLES / "base",
            text=TEXT,
            tokens=TOKENS,
            fractions=fractions,
            exhaustive=True,
        )
    )
    for curve in delta.curves:
        kept = [p["kept_effect"] for p in sorted(curve.points, key=lambda p: p["fraction"])]
        assert kept[0] < kept[-1] <= 1 + 1e-9, curve.module_type
        # The functional rank is the smallest measured fraction that keeps ≥ 99 %.
        passing = [p["fraction"] for p in curve.points if p["kept_effect"] >= 0.99]
        assert curve.functional_rank == (min(passing) if passing else 1.0)


def test_bisection_finds_what_the_exhaustive_search_finds_with_fewer_passes():
    fractions = [0.05, 0.1, 0.25, 0.5, 0.75]
    for threshold in (0.0, 0.07, 0.1, 0.3, 0.6, 0.8):
        calls = []

        def passes(f, calls=calls, threshold=threshold):
            calls.append(f)
            return f >= threshold

        found, _ = bisect_fractions(fractions, passes)
        exhaustive, _ = bisect_fractions(
            fractions, lambda f, threshold=threshold: f >= threshold, exhaustive=True
        )
        assert found == exhaustive and len(calls) <= 3
    result = functional_rank(ProbeRequest(SAMPLES / "base", text=TEXT, tokens=TOKENS))
    assert result.passes <= 1 + 3 * 7  # the intact pass, then ≤ ⌈log₂ 6⌉ per module type


def test_adapter_finetune_reference_is_peft_forward():
    """The probe applies W + s·B@A itself; its fine-tune loss must be PEFT's (the loaded adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = functional_rank(
        ProbeRequest(SAMPLES / "lora_qv_r8", base=SAMPLES / "base", text=TEXT, tokens=TOKENS, fractions=[0.5])
    )
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(SAMPLES / "base"), SAMPLES / "lora_qv_r8"
    )
    windows = token_windows(token_ids(SAMPLES / "base", TEXT, TOKENS), 64)
    assert result.reference["loss_finetuned"] == pytest.approx(
        Forward(peft_model.eval(), windows).loss(), rel=1e-5
    )
    base_loss = Forward(load_causal_lm(SAMPLES / "base"), windows).loss()
    assert result.reference["loss_base"] == pytest.approx(base_loss, rel=1e-6)
    assert result.reference["kl_finetuned_base"] > 0.05


def test_probe_runs_its_windows_on_one_torch_thread_each_and_restores_torch_s_count(monkeypatch):
    """On the CPU the probe's parallelism is one window per core, each on one torch thread; torch's
    own count is set back afterwards. Checked where the passes start (Forward._logits, the caller's
    thread) and in the windows' threads: a probe that forgot torch_threads(1), or left it set, fails."""
    import os
    import threading

    starts, windows = [], []
    logits, run = Forward._logits, Forward._run

    def spy_logits(self):
        starts.append((torch.get_num_threads(), self.workers))
        return logits(self)

    def spy_run(self, window):
        windows.append(threading.current_thread().name)
        return run(self, window)

    monkeypatch.setattr(Forward, "_logits", spy_logits)
    monkeypatch.setattr(Forward, "_run", spy_run)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        functional_rank(ProbeRequest(SAMPLES / "base", text=TEXT, tokens=TOKENS, fractions=[0.5]))
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    cores = max(1, os.cpu_count() or 1)
    assert starts and all(pair == (1, cores) for pair in starts), starts
    if cores > 1:  # the windows ran on the probe's pool, not in the caller's thread
        assert all(name.startswith("probe") for name in windows), set(windows)


def test_the_probed_conv1d_fine_tune_is_peft_s_whatever_the_saved_flag(tmp_path):
    """GPT-2's square attn.c_proj (a Conv1D, stored (in, out)) with fan_in_fan_out: false saved, and
    ln_f in modules_to_save: PEFT loads it right (it sets the flag per layer), and the model the
    probe tunes must be PEFT's merged one, to float32 rounding; so must the loss it measures."""
    base = make_gpt2(tmp_path / "gpt2", vocab_size=256)
    (base / "byte_tokens.json").write_text('{"byte_tokens": true}')
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        model_kind="gpt2",
        target_modules=["attn.c_proj"],
        modules_to_save=["ln_f"],
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    model = load_causal_lm(base)
    (bound,) = bind([load_adapter(adapter)], open_checkpoint(base))
    groups, changed = tune(model, bound)
    assert {m.name for ms in groups.values() for m in ms} == {
        f"transformer.h.{i}.attn.c_proj.weight" for i in (0, 1)
    }
    ours = model.state_dict()
    reference = peft_merged_state_dict(base, adapter, model_kind="gpt2")
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        error = relative_error(ours[name], tensor)
        assert error <= 1e-6, (name, error)
    base_state = load_causal_lm(base).state_dict()
    assert not torch.equal(ours["transformer.ln_f.weight"], base_state["transformer.ln_f.weight"])
    assert len(changed) == 4  # two c_proj weights, ln_f's weight and bias

    from peft import PeftModel

    result = functional_rank(ProbeRequest(adapter, base=base, text=TEXT, tokens=256, fractions=[1.0]))
    peft_model = PeftModel.from_pretrained(load_causal_lm(base), adapter)
    windows = token_windows(token_ids(base, TEXT, 256), 64)
    assert result.reference["loss_finetuned"] == pytest.approx(
        Forward(peft_model.eval(), windows).loss(), rel=1e-5
    )
    assert result.reference["loss_base"] == pytest.approx(
        Forward(load_causal_lm(base), windows).loss(), rel=1e-6
    )


def test_byte_tokens_only_when_the_folder_says_so(tmp_path):
    assert token_ids(SAMPLES / "base", TEXT, 10) == list(TEXT.read_bytes()[:10])
    bare = tmp_path / "bare"
    shutil.copytree(SAMPLES / "base", bare, ignore=shutil.ignore_patterns("byte_tokens.json"))
    assert_refused(
        ["rank-report", bare, "--probe", "--text", TEXT],
        "no tokenizer files",
        inputs=[bare],
    )


def test_cli_probe_json_table_and_plot(tmp_path):
    result = run_cli(
        "-q",
        "rank-report",
        SAMPLES / "lora_qv_r8",
        "--base",
        SAMPLES / "base",
        "--probe",
        "--text",
        TEXT,
        "--tokens",
        TOKENS,
        "--probe-fractions",
        "0.25,0.5",
        "--json",
        tmp_path / "r.json",
        "--plot",
        tmp_path / "plots",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["probe"]["mode"] == "delta" and data["probe"]["fractions"] == [0.25, 0.5]
    assert {"functional_rank_q_proj", "functional_rank_v_proj"} <= set(data["summary"])
    assert "functional rank of ΔW" in result.stdout and "kept effect" in result.stdout
    png = (tmp_path / "plots" / "probe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    usage = run_cli("rank-report", SAMPLES / "base", "--probe")
    assert usage.exit_code == 2 and "--probe needs --text" in usage.stderr
    assert_refused(["rank-report", SAMPLES / "lora_qv_r8", "--probe", "--text", TEXT], "needs --base")
    assert_refused(
        ["rank-report", SAMPLES / "base", "--probe", "--text", tmp_path / "none.txt"], "no such file"
    )
