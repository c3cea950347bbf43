"""How much of a *trained* LoRA survives `merge --requantize` (docs/quantized.md, issue #18 item 7).

SmolLM2-135M (benchmarks/common.py: real weights, stored in bf16) with the LoRA adapters of
docs/study.md — r 8 and r 64 on q_proj/v_proj, α = 2r, AdamW lr 1e-3, batches of 2×128 tokens of
the GPL-3/LGPL-3/GFDL-1.3 texts, trained by benchmarks/study_smollm2.py's own `train_adapter` — but
on the bf16 base the quantized models are made from (study.md trains on the float32 conversion),
cached under benchmarks/_work/requantize-study/. Four quantized bases, made by
benchmarks/quantized_smollm2.py's quantizers: FP8 128×128 blocks (lorasurgery's), FP8 per channel
and INT4 in groups of 64 (compressed-tensors' own tools), NF4 with double quantisation
(transformers + bitsandbytes). Per format and adapter: retention ρ per module type and the share of
codes changed (`merge --requantize --json`), and the held-out loss of

- the dequantized base alone, and with the adapter unmerged (PEFT on it);
- `lorasurgery merge` (unquantized, bf16);
- `merge --requantize` and `merge --requantize --min-retention 0.9` (when that output's tensors
  all equal the unquantized merge's, its loss is that one, not evaluated again).

The held-out loss is per sequence: every 128-token window of four texts not trained on (Apache-2.0,
MPL-2.0, Artistic, CC0-1.0), each model's weights as its loader holds them (each weight as
lorasurgery reads it — bit for bit the format's decoder, benchmarks/quantized_smollm2.py — rounded
to bf16), computed in float32. Kept per sequence so that a difference between two models comes
with a paired bootstrap interval over the sequences and its value on each text.

Two checks of docs/quantized.md's open question: FP8 requantized below merged (the bootstrap), and
NF4 with each block's absmax held at the base's (codes re-rounded, scales not recomputed): its ρ
and loss against the real `--requantize`.

MXFP4: a tiny random-initialised gpt-oss (tests/factories.make_gpt_oss, 4 experts) with its
experts stored as MXFP4 (tests/test_quantized_mxfp4.store_mxfp4), a PEFT LoRA on q/v_proj and,
through target_parameters, on both fused expert parameters, trained a few dozen steps on the
training texts as bytes (its vocabulary is 128: ASCII); the same losses and retention.

And, with no quantization, the held-out loss of the bf16 base + c·ΔW (`merge --weight c`, `--scales`):
whether a partly kept update generalises better (it does, for these adapters: docs/quantized.md).

    python benchmarks/requantize_study_smollm2.py [--steps 300] [--ranks 8,64] [--seeds 0,1] [--formats …]
        [--measure-only] [--report-only] [--windows 8] [--scales 0.25,0.5,0.75,1]

Every step is cached under benchmarks/_work/requantize-study/ (per-sequence losses in
losses-w<windows>-<format>.json, merge results in entries-w<windows>-<format>.json), so a stopped
run resumes; `--measure-only --formats F` measures one format (several can run side by side) and
`--report-only` prints the tables and draws the figures from the caches. Writes
results-<steps>.json, the markdown tables on stdout, and docs/img/quantized_retention.png,
docs/img/quantized_losses.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]

import quantized_smollm2 as qs  # noqa: E402
from common import WORK, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402
from extract_vs_mergekit import LICENCES, TRAIN_TEXTS, read_texts  # noqa: E402

FORMATS = ["fp8-block-ls", "ct-fp8-channel", "ct-w4a16-g64", "bnb-nf4"]
HELD_OUT_SETS = ("Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0")
LENGTH = 128
STUDY = WORK / "requantize-study"
FIGURES = HERE.parent / "docs" / "img"
LADDER = ("base", "unmerged", "merged", "requantized", "min_retention")


# ------------------------------------------------------------------------------------ adapters


def train(base: Path, r: int, seed: int, steps: int) -> Path:
    """docs/study.md's q/v LoRA, trained by benchmarks/study_smollm2.py's own function (cached)."""
    import study_smollm2

    study_smollm2.WORK = STUDY  # its cache name says nothing of the base: keep ours (bf16) apart
    return study_smollm2.train_adapter(base, r, seed, steps)


def relative_update(plain: Path, adapter: Path) -> dict:
    """{module type: (median, max) of ‖ΔW‖_F / ‖W‖_F} over the layers."""
    from lorasurgery.io import open_checkpoint

    checkpoint = open_checkpoint(plain)
    by_type: dict[str, list[float]] = {}
    for module, delta in deltas_of(adapter).items():
        W = checkpoint.read(f"{module}.weight")
        by_type.setdefault(module.rsplit(".", 1)[-1], []).append(float(delta.norm() / W.norm()))
    return {kind: (statistics.median(v), max(v)) for kind, v in sorted(by_type.items())}


def deltas_of(adapter: Path) -> dict:
    """{module: s·B@A in float32}: the ΔW lorasurgery's merge adds (merge = PEFT, docs/quantized.md §1)."""
    from lorasurgery.adapter import load_adapter

    loaded = load_adapter(adapter)
    out = {}
    for name, module in loaded.modules.items():
        A, B = loaded.read_factors(name)
        out[name] = module.scale * (B.float() @ A.float())
    return out


# ---------------------------------------------------------------------------------- evaluation


def held_out_windows(tokenize, most: int | None = None) -> dict:
    """{text: (windows, LENGTH) token ids}: the first `most` (default every) whole windows of each
    held-out text, in order."""
    out = {}
    for name in HELD_OUT_SETS:
        ids = tokenize((LICENCES / name).read_text(encoding="utf-8", errors="replace"))
        out[name] = ids[: (len(ids) // LENGTH) * LENGTH].reshape(-1, LENGTH)[:most]
    return out


def sequence_losses(model, windows: dict, batch: int = 8) -> list[float]:
    """Mean next-token loss of every window (the held-out sets in order), float32 model."""
    import torch

    losses = []
    with torch.no_grad():
        for ids in windows.values():
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                logits = model(chunk).logits[:, :-1].float()
                token = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none"
                )
                losses += token.reshape(len(chunk), -1).mean(1).tolist()
    return losses


class Losses:
    """Per-sequence held-out losses by label, cached in a JSON file (a rerun evaluates nothing twice)."""

    def __init__(self, path: Path, windows: dict):
        self.path, self.windows = path, windows
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, label: str, make_model) -> list[float]:
        if label not in self.values:
            start = time.perf_counter()
            self.values[label] = sequence_losses(make_model(), self.windows)
            print(
                f"  loss {label}: {statistics.mean(self.values[label]):.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            self.path.write_text(json.dumps(self.values))
        return self.values[label]

    def alias(self, label: str, same_as: str) -> list[float]:
        self.values[label] = self.values[same_as]
        self.path.write_text(json.dumps(self.values))
        return self.values[label]


def model_from(folder: Path, replace: dict | None = None):
    """The model of checkpoint `folder` with each weight as lorasurgery reads it (dequantized where
    quantized) rounded to bf16, in float32; `replace` overrides weights by name."""
    import torch
    import transformers

    from lorasurgery.io import open_checkpoint

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint = open_checkpoint(folder)
    state = {name: checkpoint.read(name).to(torch.bfloat16).float() for name in checkpoint.tensors}
    for name, W in (replace or {}).items():
        state[name] = W.to(torch.bfloat16).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def with_adapter(model, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two checkpoints store the same tensors, bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and a[n].equal(b[n]) for n in a)


def bootstrap(first: list[float], second: list[float], sets: dict, resamples: int = 10000) -> dict:
    """mean(second − first) per sequence with a paired 95 % bootstrap interval over the sequences,
    and the mean difference on each held-out set."""
    import torch

    d = torch.tensor(second, dtype=torch.float64) - torch.tensor(first, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    means = d[torch.randint(0, len(d), (resamples, len(d)), generator=generator)].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    per_set, start = {}, 0
    for name, ids in sets.items():
        per_set[name] = float(d[start : start + len(ids)].mean())
        start += len(ids)
    return {"mean": float(d.mean()), "ci95": (low, high), "per_set": per_set, "sequences": len(d)}


# ------------------------------------------------------------------------------- requantizing


def requantize_cli(Q: Path, adapter: Path, out: Path, *extra) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    result, seconds = qs.run("merge", Q, adapter, "-o", out, "--requantize", "--json", *extra)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout), seconds


def nf4_fixed_absmax(Q: Path, deltas: dict) -> tuple[dict, dict]:
    """NF4 requantized with each block's absmax held at the base's (double-quantised value decoded):
    only the codes re-rounded. ({weight: deq(W′)}, {module: ρ})."""
    import torch

    from lorasurgery.io import bnb, open_checkpoint

    checkpoint = open_checkpoint(Q)
    raw = checkpoint.raw
    weights, rho = {}, {}
    for module, delta in deltas.items():
        name = f"{module}.weight"
        info = checkpoint.tensors[name]
        W = checkpoint.read(name)
        absmax = bnb._absmax(info, lambda part: raw.read(part.name))
        size = info.scheme.blocksize
        assert W.numel() == absmax.numel() * size, name  # SmolLM2's sizes: whole blocks of 64
        scaled = ((W + delta).reshape(-1, size) / absmax[:, None]).clamp(-1, 1)
        table = bnb.table_of(info.scheme.quant_type) + 0.0
        after = table[bnb._nearest(scaled.reshape(-1), table)].reshape(-1, size) * absmax[:, None]
        after = after.reshape(W.shape)
        kept = torch.dot((after - W).double().reshape(-1), delta.double().reshape(-1))
        rho[module] = float(kept / delta.double().square().sum())
        weights[name] = after
    return weights, rho


# -------------------------------------------------------------------------------------- SmolLM2


def study_format(fmt: str, plain: Path, adapters: dict, losses: Losses, cache: Path) -> dict:
    """One format: the merges first (retention from --json), then the held-out losses, the most
    telling first (merge against --requantize), each step cached, so an interrupted run resumes."""
    Q = STUDY / fmt
    if not (Q / "config.json").is_file():
        shutil.rmtree(Q, ignore_errors=True)
        start = time.perf_counter()
        qs.quantize(fmt, plain, Q)
        print(f"  {fmt}: quantized ({time.perf_counter() - start:.0f} s)", flush=True)
    done = json.loads(cache.read_text()) if cache.is_file() else {}

    def save():
        cache.write_text(json.dumps(done))

    def folders(key):
        return STUDY / f"{fmt}-{key}-merged", STUDY / f"{fmt}-{key}-requantized"

    for key, adapter in adapters.items():
        entry = done.setdefault(f"{fmt} {key}", {})
        out, low = folders(key)
        if f"{fmt} {key} min_retention" in losses.values:  # measured to the end by an earlier run
            continue
        if "merge_s" not in entry or not (out / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            result, entry["merge_s"] = qs.run("merge", Q, adapter, "-o", out)
            assert result.returncode == 0, result.stderr[-2000:]
        if "retention" not in entry or not (low / "config.json").is_file():
            report, entry["requantize_s"] = requantize_cli(Q, adapter, low)
            entry["retention"] = qs.retention_summary(report["retention"])
            entry["rho"] = {e["module"]: e["retention"] for e in report["retention"]}
            print(f"  {fmt} {key}: {json.dumps(entry['retention'])}", flush=True)
        save()
    for key in adapters:
        out, low = folders(key)
        if f"{fmt} {key} min_retention" in losses.values:
            continue
        losses(f"{fmt} {key} merged", lambda out=out: model_from(out))
        losses(f"{fmt} {key} requantized", lambda low=low: model_from(low))
    losses(f"{fmt} base", lambda: model_from(Q))
    for key, adapter in adapters.items():
        tag, entry = f"{fmt} {key}", done[f"{fmt} {key}"]
        if fmt == "bnb-nf4" and "fixed_absmax_rho" not in entry:
            weights, rho = nf4_fixed_absmax(Q, deltas_of(adapter))
            entry["fixed_absmax_rho"] = {
                kind: (statistics.median(v), min(v))
                for kind in ("q_proj", "v_proj")
                for v in [[r for m, r in rho.items() if m.endswith(kind)]]
            }
            save()
            losses(f"{tag} fixed_absmax", lambda weights=weights: model_from(Q, weights))
            del weights
    for key, adapter in adapters.items():
        losses(f"{fmt} {key} unmerged", lambda adapter=adapter: with_adapter(model_from(Q), adapter))
    for key, adapter in adapters.items():
        tag, entry = f"{fmt} {key}", done[f"{fmt} {key}"]
        out, low = folders(key)
        if f"{tag} min_retention" in losses.values:
            continue
        if "modules" not in entry:
            report, _ = requantize_cli(Q, adapter, low, "--min-retention", "0.9")
            rhos = [e["retention"] for e in report["retention"]]
            entry["unquantized_modules"] = sum(1 for rho in rhos if rho is not None and rho < 0.9)
            entry["modules"] = len(rhos)
            # every module below 0.9: the output must be the unquantized merge, bit for bit
            entry["min_retention_equals_merge"] = same_tensors(low, out)
            save()
        if entry["min_retention_equals_merge"]:
            losses.alias(f"{tag} min_retention", f"{tag} merged")
        else:
            losses(f"{tag} min_retention", lambda low=low: model_from(low))
        for folder in (out, low):
            shutil.rmtree(folder, ignore_errors=True)
    return {"format": fmt, "adapters": {key: done[f"{fmt} {key}"] for key in adapters}}


# --------------------------------------------------------------------------------------- MXFP4


def byte_windows(names, length: int):
    """The texts as bytes (ASCII: the tiny gpt-oss's 128-token vocabulary), in windows of `length`."""
    import torch

    data = read_texts(names).encode("ascii", errors="replace")
    ids = torch.tensor(list(data), dtype=torch.int64) & 0x7F
    return ids[: (len(ids) // length) * length].reshape(-1, length)


def study_mxfp4(steps: int) -> dict:
    """The tiny gpt-oss with MXFP4 experts: a trained LoRA on q/v and the experts, requantized."""
    import torch
    from factories import make_gpt_oss
    from peft import LoraConfig, get_peft_model
    from test_quantized_mxfp4 import EXPERTS, store_mxfp4
    from transformers import AutoModelForCausalLM

    root = STUDY / "gpt-oss"
    plain, Q, adapter = root / "plain", root / "mxfp4", root / f"lora-r8-{steps}"
    done = root / f"row-{steps}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if not (plain / "config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_gpt_oss(plain, hidden_size=128, experts=4, dtype=torch.bfloat16)
        store_mxfp4(plain, Q)
    length = 64  # its max_position_embeddings
    row: dict = {"format": "mxfp4 (tiny gpt-oss)", "adapters": {}}
    if not (adapter / "adapter_model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=list(EXPERTS)
        )
        model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        windows = byte_windows(TRAIN_TEXTS, length)
        generator = torch.Generator().manual_seed(0)
        trace = []
        model.train()
        for _ in range(steps):
            batch = windows[torch.randint(0, len(windows), (16,), generator=generator)]
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            trace.append(round(loss.item(), 4))
        model.save_pretrained(adapter)
        (adapter / "training_losses.json").write_text(json.dumps(trace))
    row["training_losses"] = json.loads((adapter / "training_losses.json").read_text())
    sets = {name: byte_windows([name], length) for name in HELD_OUT_SETS}
    losses = Losses(root / f"losses-{steps}.json", sets)
    losses("bf16 base", lambda: model_from(plain))
    losses("bf16 base + adapter", lambda: with_adapter(model_from(plain), adapter))
    out, low, entry = root / "merged", root / "requantized", {}
    losses("mxfp4 base", lambda: model_from(Q))
    losses("mxfp4 r8 unmerged", lambda: with_adapter(model_from(Q), adapter))
    shutil.rmtree(out, ignore_errors=True)
    result, _ = qs.run("merge", Q, adapter, "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    losses("mxfp4 r8 merged", lambda: model_from(out))
    report, entry["requantize_s"] = requantize_cli(Q, adapter, low)
    entry["retention"] = qs.retention_summary(report["retention"])
    losses("mxfp4 r8 requantized", lambda: model_from(low))
    report, _ = requantize_cli(Q, adapter, low, "--min-retention", "0.9")
    entry["unquantized_modules"] = sum(1 for e in report["retention"] if (e["retention"] or 1) < 0.9)
    entry["modules"] = len(report["retention"])
    entry["min_retention_equals_merge"] = same_tensors(low, out)
    if entry["min_retention_equals_merge"]:
        losses.alias("mxfp4 r8 min_retention", "mxfp4 r8 merged")
    else:
        losses("mxfp4 r8 min_retention", lambda: model_from(low))
    row["adapters"]["r8"] = entry
    row["losses"] = {label: statistics.mean(v) for label, v in losses.values.items()}
    row["sequences"] = sum(len(ids) for ids in sets.values())
    done.write_text(json.dumps(row))
    return row


# -------------------------------------------------------------------------------------- figures


def figures(rows: list[dict], losses: dict, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    # retention per module type and format, one panel per adapter (mxfp4's experts beside)
    panels = keys + ["mxfp4"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    for ax, key in zip(axes, panels, strict=True):
        bars = []
        for row in rows:
            mxfp4 = row["format"].startswith("mxfp4")
            if mxfp4 != (key == "mxfp4") or (not mxfp4 and key not in row["adapters"]):
                continue
            for kind, (med, low, _) in row["adapters"]["r8" if mxfp4 else key]["retention"].items():
                bars.append((f"{row['format'].split(' ')[0]}\n{kind}", med, low))
        for x, (label, med, low) in enumerate(bars):
            colour = "C0" if "fp8" in label else "C1" if "w4" in label else "C3" if "mxfp4" in label else "C2"
            ax.bar(x, med, color=colour)
            ax.plot([x], [low], "k_", markersize=12)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=60, fontsize=7)
        ax.set_title("MXFP4 tiny gpt-oss, r 8" if key == "mxfp4" else f"SmolLM2, LoRA {key}", fontsize=9)
        ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    axes[0].set_ylabel("retention ρ (bar: median, tick: min)")
    fig.tight_layout()
    fig.savefig(FIGURES / "quantized_retention.png", dpi=110)
    plt.close(fig)

    # the loss ladder: per format and adapter, base → unmerged → merged → requantized → min-retention
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 3.8), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, row in enumerate(r for r in rows if key in r["adapters"]):
            fmt = row["format"]
            values = [
                statistics.mean(losses.get(label, [math.nan]))
                for label in [f"{fmt} base"] + [f"{fmt} {key} {step}" for step in LADDER[1:]]
            ]
            ax.plot(range(len(LADDER)), values, "o-", color=f"C{i}", label=fmt)
        ax.axhline(
            statistics.mean(losses.get("bf16 base", [math.nan])),
            color="grey",
            lw=0.6,
            ls=":",
            label="bf16 base",
        )
        ax.axhline(
            statistics.mean(losses.get(f"bf16 base + {key}", [math.nan])),
            color="grey",
            lw=0.6,
            ls="--",
            label="bf16 + adapter",
        )
        ax.set_xticks(
            range(len(LADDER)), ["base", "+ adapter\nunmerged", "merge", "--requantize", "min-ret.\n0.9"]
        )
        ax.set_title(f"SmolLM2 held-out loss, LoRA {key}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    fig.tight_layout()
    fig.savefig(FIGURES / "quantized_losses.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps (docs/study.md: 300)")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--seeds", default="0,1", help="docs/study.md's two seeds")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--mxfp4-steps", type=int, default=60, help="steps of the tiny gpt-oss's LoRA")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--measure-only", action="store_true", help="only the formats' measurements (cached), no report"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="tables and figures from what is cached, measuring nothing"
    )
    parser.add_argument(
        "--windows", type=int, default=8, help="held-out windows of 128 tokens per text (0: all)"
    )
    parser.add_argument(
        "--scales",
        type=lambda text: [float(c) for c in text.split(",") if c],
        default=[0.25, 0.5, 0.75, 1.0],
        help="c of the bf16 base + c·ΔW losses (merge --weight c): does part of the update generalise better?",
    )
    args = parser.parse_args()
    import torch
    from factories import silence_libraries

    torch.set_num_threads(args.threads)
    silence_libraries()
    STUDY.mkdir(parents=True, exist_ok=True)
    plain = smollm2_checkpoint("bfloat16")
    adapters = {}
    for r in map(int, args.ranks.split(",")):
        for s in map(int, args.seeds.split(",")):
            start = time.perf_counter()
            key = f"r{r}-s{s}-{args.steps}"  # the losses' cache is shared by every --steps
            adapters[key] = train(plain, r, s, args.steps)
            print(f"adapter {key}: {adapters[key]} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.report_only and args.windows:  # only their count matters (each text has 10 or more)
        windows = {name: [None] * args.windows for name in HELD_OUT_SETS}
    else:
        tokenizer = smollm2_tokenizer()
        windows = held_out_windows(
            lambda text: tokenizer(text, return_tensors="pt").input_ids[0], args.windows or None
        )
    # one cache per format, so that --measure-only runs of different formats can run side by side
    cache = {part: STUDY / f"losses-w{args.windows}-{part}.json" for part in ("bf16", *FORMATS)}
    rows = []
    formats = [fmt for fmt in args.formats.split(",") if fmt]  # "": the references and MXFP4 only
    for fmt in formats:
        losses, entries = Losses(cache[fmt], windows), STUDY / f"entries-w{args.windows}-{fmt}.json"
        if args.report_only:
            done = json.loads(entries.read_text()) if entries.is_file() else {}
            found = {key: done[f"{fmt} {key}"] for key in adapters if f"{fmt} {key}" in done}
            rows.append({"format": fmt, "adapters": found})
        else:
            rows.append(study_format(fmt, plain, adapters, losses, entries))
    if args.measure_only:
        return
    losses = Losses(cache["bf16"], windows)
    if not args.report_only:
        losses("bf16 base", lambda: model_from(plain))
    results: dict = {"steps": args.steps, "adapters": {}, "held_out": {k: len(v) for k, v in windows.items()}}
    for key, adapter in adapters.items():
        trace = json.loads((adapter / "training_losses.json").read_text())
        results["adapters"][key] = {"first": trace[0], "last20": statistics.mean(trace[-20:])}
        results["adapters"][key]["relative_update"] = relative_update(plain, adapter)
        if not args.report_only:
            losses(f"bf16 base + {key}", lambda adapter=adapter: with_adapter(model_from(plain), adapter))
            scaled_losses(losses, plain, key, adapter, args.scales)
    values = dict(losses.values)
    for fmt in formats:
        values |= Losses(cache[fmt], windows).values
    # The open question: --requantize against merge (and NF4's variants), paired per sequence.
    differences = {
        "requantized_minus_merged": ("merged", "requantized"),
        "requantized_minus_unmerged": ("unmerged", "requantized"),
        "fixed_absmax_minus_merged": ("merged", "fixed_absmax"),
        "fixed_absmax_minus_base": (None, "fixed_absmax"),
        "requantized_minus_base": (None, "requantized"),
    }
    for row in rows:
        fmt = row["format"]
        for key, entry in row["adapters"].items():
            for what, (first, second) in differences.items():
                a = values.get(f"{fmt} {key} {first}" if first else f"{fmt} base")
                b = values.get(f"{fmt} {key} {second}")
                if a is not None and b is not None:
                    entry[what] = bootstrap(a, b, windows)
            if f"bf16 base + {key}" in values and f"{fmt} {key} merged" in values:
                entry["merged_minus_bf16_merged"] = bootstrap(
                    values[f"bf16 base + {key}"], values[f"{fmt} {key} merged"], windows
                )
    mx_row = STUDY / "gpt-oss" / f"row-{args.mxfp4_steps}.json"
    if args.report_only:
        mx = json.loads(mx_row.read_text()) if mx_row.is_file() else None
    else:
        mx = study_mxfp4(args.mxfp4_steps) if args.mxfp4_steps else None
    results |= {
        "rows": rows,
        "mean_losses": {label: statistics.mean(v) for label, v in values.items()},
        "mxfp4": mx,
    }
    (STUDY / f"results-{args.steps}.json").write_text(json.dumps(results, indent=1, default=str))
    if rows:
        figures(rows + ([mx] if mx else []), values, list(adapters))
    report(results, values)
    report_scaled(results, values, windows)
    (STUDY / f"results-{args.steps}.json").write_text(json.dumps(results, indent=1, default=str))


def scaled_losses(losses: Losses, plain: Path, key: str, adapter: Path, scales) -> None:
    """The held-out loss of the bf16 base + c·ΔW (`merge --weight c`, bf16) for each c: what a
    partly kept update does, without any quantization (the open question of docs/quantized.md)."""
    for c in scales:
        label = f"bf16 base + {key} x{c:g}"
        if label in losses.values:
            continue
        out = STUDY / "scaled" / f"{key}-x{c:g}"
        shutil.rmtree(out, ignore_errors=True)
        result, _ = qs.run("merge", plain, adapter, "-o", out, "--weight", f"{c:g}")
        assert result.returncode == 0, result.stderr[-2000:]
        losses(label, lambda out=out: model_from(out))
        shutil.rmtree(out, ignore_errors=True)


def report_scaled(results: dict, values: dict, windows: dict) -> None:
    """bf16 base + c·ΔW: the mean held-out loss per c, and c against c = 1 (paired bootstrap)."""
    scaled = {}
    for key in results["adapters"]:
        found = sorted(
            (float(label.rsplit(" x", 1)[1]), label)
            for label in values
            if label.startswith(f"bf16 base + {key} x")
        )
        if found:
            scaled[key] = found
    if not scaled:
        return
    print("\n| adapter | c | bf16 base + c·ΔW (merge --weight c) | against c = 1 | 95 % CI |")
    print("| --- | --- | --- | --- | --- |")
    for key, found in scaled.items():
        whole = dict(found).get(1.0)
        for c, label in found:
            mean = statistics.mean(values[label])
            if whole is None or c == 1.0:
                print(f"| {key} | {c:g} | {mean:.4f} | | |")
                continue
            b = bootstrap(values[whole], values[label], windows)
            low, high = b["ci95"]
            print(f"| {key} | {c:g} | {mean:.4f} | {b['mean']:+.4f} | [{low:+.4f}, {high:+.4f}] |")
    results["scaled"] = {
        key: {c: statistics.mean(values[label]) for c, label in found} for key, found in scaled.items()
    }


def report(results: dict, values: dict) -> None:
    mean = _Means({label: statistics.mean(v) for label, v in values.items()})
    print(f"\nheld-out: {results['held_out']} windows of {LENGTH} tokens; bf16 base {mean['bf16 base']}")
    for key, info in results["adapters"].items():
        print(
            f"{key}: training loss {info['first']} → {info['last20']:.3f} (mean of the last 20); "
            f"bf16 base + adapter {mean[f'bf16 base + {key}']}; ‖ΔW‖/‖W‖ {info['relative_update']}"
        )
    print("\n| format | adapter | base | + adapter unmerged | merge | --requantize | --min-retention 0.9 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in results["rows"]:
        fmt = row["format"]
        for key, e in row["adapters"].items():
            cells = [mean[f"{fmt} {key} {step}"] for step in LADDER[1:]]
            if "modules" in e:
                cells[-1] += f" ({e['unquantized_modules']} of {e['modules']} unquantized)"
            print(f"| {fmt} | {key} | {mean[f'{fmt} base']} | " + " | ".join(cells) + " |")
    print("\n| format | adapter | module | ρ median | ρ min | codes changed (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results["rows"] + ([results["mxfp4"]] if results["mxfp4"] else []):
        for key, e in row["adapters"].items():
            for kind, (med, low, changed) in e["retention"].items():
                print(f"| {row['format']} | {key} | {kind} | {med:.4f} | {low:.4f} | {100 * changed:.2f} % |")
    print("\n| format | adapter | difference | mean | 95 % CI | per held-out set |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in results["rows"]:
        for key, e in row["adapters"].items():
            for what in [k for k in e if k.endswith(("_minus_merged", "_minus_base", "_bf16_merged"))]:
                b = e[what]
                sets = ", ".join(f"{n} {v:+.4f}" for n, v in b["per_set"].items())
                print(
                    f"| {row['format']} | {key} | {what} | {b['mean']:+.4f} | "
                    f"[{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | {sets} |"
                )
        if "bnb-nf4" == row["format"]:
            for key, e in row["adapters"].items():
                print(f"NF4 {key} absmax held fixed: ρ {e.get('fixed_absmax_rho')}")
    if results["mxfp4"]:
        mx = results["mxfp4"]
        t = mx["training_losses"]
        print(
            f"\nMXFP4 tiny gpt-oss: training loss {t[0]} → {statistics.mean(t[-10:]):.3f}; "
            f"{mx['sequences']} held-out windows of 64 bytes"
        )
        for label, value in mx["losses"].items():
            print(f"| {label} | {value:.4f} |")
        e = mx["adapters"]["r8"]
        print(
            f"min-retention 0.9: {e['unquantized_modules']} of {e['modules']} unquantized, "
            f"= merge: {e['min_retention_equals_merge']}"
        )


class _Means(dict):
    """Mean losses formatted for the tables; "—" for what was not measured."""

    def __getitem__(self, label):
        return f"{dict.__getitem__(self, label):.4f}" if label in self else "—"


if __name__ == "__main__":
    main()
