"""The LoRA paper's §7 and Shuttleworth et al.'s intruder dimensions on the real SmolLM2-135M.

Trains (once, cached under benchmarks/_work/):
- LoRA adapters on q_proj and v_proj (the paper's §7 setting: W_q, W_v), r = 8 and r = 64, seeds 0
  and 1, lora_alpha = 2r, AdamW lr 1e-3, on the same licence texts as the full fine-tune;
- the full fine-tune of benchmarks/extract_vs_mergekit.py (AdamW on every weight).
Then runs `rank-report` on them with the base: φ grids (both definitions) between the runs,
amplification, and intruder dimensions of LoRA vs full fine-tuning, each checked against float64
dense SVDs of a few modules. Results go to docs/rank-report.md and docs/study.md.

Run: python benchmarks/study_smollm2.py [--steps 60] [--ranks 8,64] [--seeds 0,1] [--check 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, smollm2_checkpoint, smollm2_tokenizer  # noqa: E402
from extract_vs_mergekit import TRAIN_TEXTS, make_finetune, read_texts, token_batches  # noqa: E402


def train_adapter(base: Path, r: int, seed: int, steps: int, snapshots=()) -> Path:
    """A real LoRA adapter on q_proj, v_proj trained by PEFT (cached). Each step count in
    `snapshots` is also saved as it passes, under that count's own cache name: no learning-rate
    schedule and the same batches, so it is the adapter a run of that many steps trains."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = WORK / f"smollm2-lora-qv-r{r}-s{seed}-{steps}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    # The batches differ by seed too, as two independent training runs would.
    batches = token_batches(read_texts(TRAIN_TEXTS), batch=2, length=128, count=steps + 1000 * seed)
    for _ in range(1000 * seed):
        next(batches)
    losses = []
    for step, batch in enumerate(batches):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        print(f"  r={r} seed={seed} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
        if step + 1 in snapshots and step + 1 < steps:
            snapshot = WORK / f"smollm2-lora-qv-r{r}-s{seed}-{step + 1}"
            model.save_pretrained(snapshot)
            (snapshot / "training_losses.json").write_text(json.dumps(losses))
    model.save_pretrained(out)
    (out / "training_losses.json").write_text(json.dumps(losses))
    return out


def check_against_dense(report: dict, base: Path, tuned_of, count: int) -> float:
    """Largest |difference| between the report's intruder cosines and float64 dense SVDs (first `count` modules)."""
    import torch

    from lorasurgery.io import open_checkpoint

    checkpoint = open_checkpoint(base)
    worst = 0.0
    deltas = [m for m in report["modules"] if m["kind"] == "delta"][:count]
    for module in deltas:
        W = checkpoint.read(module["name"] + ".weight").double()
        tuned = tuned_of(module["name"], W)
        U = torch.linalg.svd(W, full_matrices=False)[0]
        top = torch.linalg.svd(tuned, full_matrices=False)[0][:, :10]
        max_cosine = (top.T @ U).abs().max(dim=1).values
        got = torch.tensor(module["metrics"]["intruder_max_cosine"], dtype=torch.float64)
        worst = max(worst, float((got - max_cosine).abs().max()))
        assert module["metrics"]["intruder_dimensions"] == int((max_cosine < 0.5).sum()), module["name"]
    return worst


LICENCES = Path("/usr/share/common-licenses")
HELD_OUT = LICENCES / "Apache-2.0"
LAYERS = (15, 29)  # the middle and last of SmolLM2's 30 blocks (the paper's Fig. 3: 48 and 96 of 96)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    parser.add_argument("--ft-steps", type=int, default=300, help="full fine-tune steps")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--check", type=int, default=4, help="modules checked against dense float64 SVDs")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--no-probe", action="store_true", help="skip the --probe runs (≈ 3–5 min each)")
    parser.add_argument(
        "--figures", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a busy machine)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    base = smollm2_checkpoint()
    if not (base / "tokenizer_config.json").is_file():
        smollm2_tokenizer().save_pretrained(base)  # --probe --text tokenises with the model's own
    finetuned = make_finetune(base, args.ft_steps)
    adapters = {
        (r, s): train_adapter(base, r, s, args.steps)
        for r in map(int, args.ranks.split(","))
        for s in map(int, args.seeds.split(","))
    }
    if args.train_only:
        return
    cache = WORK / f"study-{args.steps}-{args.ft_steps}"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict = {"losses": held_out_losses(base, finetuned, adapters)}

    for (r, s), folder in adapters.items():
        report, seconds = cached_report(cache / f"lora-r{r}-s{s}.json", folder, base=base)
        worst = check_against_dense(report, base, adapter_tuned(folder), args.check)
        results[f"lora r={r} seed={s}"] = summarize(report) | {"seconds": seconds, "max_cos_error": worst}
    # The paper's Table 7 has r = 4: the same numbers from the r = 8 adapters' top-4 directions.
    for s in {s for (r, s) in adapters if r == 8}:
        report, _ = cached_report(cache / f"lora-r8-s{s}-amp4.json", adapters[(8, s)], base=base, amp_rank=4)
        results[f"lora r=8 seed={s} amp-rank 4"] = summarize(report)
    report, seconds = cached_report(cache / "ft-qv.json", finetuned, base=base, include=r"\.(q_proj|v_proj)$")
    ft = _checkpoint(finetuned)
    worst = check_against_dense(report, base, lambda name, W: ft.read(name + ".weight").double(), args.check)
    results["full fine-tune (q_proj, v_proj)"] = summarize(report) | {
        "seconds": seconds,
        "max_cos_error": worst,
    }
    intruder_reports = {
        label: json.loads((cache / f"{name}.json").read_text())
        for label, name in [(f"LoRA r={r} seed {s}", f"lora-r{r}-s{s}") for (r, s) in adapters]
        + [("full fine-tune", "ft-qv")]
    }
    intruder_figure(intruder_reports, args.figures / "study_intruders.png")

    # φ between the runs: r = 8 vs r = 64 (paper Fig. 3) and seed 0 vs seed 1 (Fig. 4).
    pairs = [((8, 0), (64, 0)), ((8, 1), (64, 1)), ((64, 0), (64, 1)), ((8, 0), (8, 1))]
    grids = {}
    for first, second in pairs:
        if first in adapters and second in adapters:
            name = f"phi-r{first[0]}s{first[1]}-r{second[0]}s{second[1]}"
            report, _ = cached_report(cache / f"{name}.json", adapters[first], compare=adapters[second])
            worst = check_phi_against_dense(report, adapters[first], adapters[second], args.check)
            label = f"phi r={first[0]}s{first[1]} vs r={second[0]}s{second[1]}"
            results[label] = phi_summary(report) | {"max_phi_error": worst}
            grids[(first, second)] = report
    if ((8, 0), (64, 0)) in grids:
        phi_figure(
            grids[((8, 0), (64, 0))], "r = 8 vs r = 64 (seed 0)", 64, args.figures / "study_phi_r8_r64.png"
        )
    if ((64, 0), (64, 1)) in grids:
        phi_figure(
            grids[((64, 0), (64, 1))],
            "r = 64, seed 0 vs seed 1",
            64,
            args.figures / "study_phi_seeds_r64.png",
        )

    if not args.no_probe:
        probes = {
            "lora r=64 seed=0": (adapters[(64, 0)], "study_probe_lora_r64.png"),
            "lora r=8 seed=0": (adapters[(8, 0)], None),
            "full fine-tune": (finetuned, "study_probe_finetune.png"),
        }
        for label, (target, figure) in probes.items():
            path = cache / f"probe-{label.replace(' ', '_').replace('=', '')}.json"
            report, seconds = cached_report(path, target, base=base, probe_text=HELD_OUT, probe_all=True)
            results[f"probe {label}"] = report["probe"] | {"wall_seconds": seconds}
            if figure:
                probe_figure(report["probe"], label, args.figures / figure)
    print(json.dumps(results, indent=1))
    (cache / "study_results.json").write_text(json.dumps(results, indent=1))


def _checkpoint(folder: Path):
    from lorasurgery.io import open_checkpoint

    return open_checkpoint(folder)


def adapter_tuned(folder: Path):
    """name, W ↦ W + s·B@A in float64, for the dense checks."""
    from lorasurgery.adapter import load_adapter

    adapter = load_adapter(folder)

    def tuned(name, W):
        A, B = adapter.read_factors(name)
        return W + adapter.modules[name].scale * (B.double() @ A.double())

    return tuned


def cached_report(path: Path, target: Path, **options) -> tuple[dict, float | None]:
    """rank_report(target, **options) as JSON, computed once and kept at `path`."""
    from lorasurgery.commands.rank_report.rank_report import RankReportRequest, rank_report

    if path.is_file():
        data = json.loads(path.read_text())
        return data, data.get("_seconds")
    started = time.perf_counter()
    data = rank_report(RankReportRequest(target, **options)).to_json()
    data["_seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(data))
    return data, data["_seconds"]


def check_phi_against_dense(report: dict, first: Path, second: Path, count: int) -> float:
    """Largest |difference| of both φ grids from float64 numpy SVDs by the definitions (first `count` modules)."""
    import numpy as np

    from lorasurgery.adapter import load_adapter

    one, two = load_adapter(first), load_adapter(second)
    worst = 0.0
    for module in report["modules"][:count]:
        name = module["name"]
        (A1, B1), (A2, B2) = (a.read_factors(name) for a in (one, two))
        A1, B1, A2, B2 = (t.double().numpy() for t in (A1, B1, A2, B2))
        s1, s2 = one.modules[name].scale, two.modules[name].scale
        bases = {
            "subspace_similarity": (np.linalg.svd(A1)[2][: len(A1)], np.linalg.svd(A2)[2][: len(A2)]),
            "subspace_similarity_delta": (
                np.linalg.svd(s1 * B1 @ A1)[2][: len(A1)],
                np.linalg.svd(s2 * B2 @ A2)[2][: len(A2)],
            ),
        }
        for key, (V1, V2) in bases.items():
            G = (V1 @ V2.T) ** 2
            i, j = np.arange(1, len(V1) + 1)[:, None], np.arange(1, len(V2) + 1)[None, :]
            reference = G.cumsum(0).cumsum(1) / np.minimum(i, j)
            worst = max(worst, float(np.abs(np.array(module["metrics"][key]) - reference).max()))
    return worst


def held_out_losses(base: Path, finetuned: Path, adapters: dict) -> dict:
    """Mean next-token loss on the training text and on held-out Apache-2.0 (2048 tokens each): fit and forgetting."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = smollm2_tokenizer()
    texts = {"training text": read_texts(TRAIN_TEXTS), "held-out Apache-2.0": HELD_OUT.read_text()}
    windows = {
        k: tokenizer(v, return_tensors="pt").input_ids[0][:2048].reshape(4, 512) for k, v in texts.items()
    }

    def losses(model) -> dict:
        model.eval()
        with torch.no_grad():
            return {k: round(float(model(w, labels=w).loss), 4) for k, w in windows.items()}

    out = {"base": losses(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))}
    out["full fine-tune"] = losses(AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32))
    for (r, s), folder in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        out[f"lora r={r} seed={s}"] = losses(PeftModel.from_pretrained(model, folder))
    return out


def summarize(report: dict) -> dict:
    """Per module type: intruder counts, how close the top vectors come to being intruders, and the
    amplification numbers of the paper's Table 7 (means over the layers, and layer 15 alone)."""
    from lorasurgery.naming import layer_index, module_type

    out = {}
    for group in report["summary"]["by_type"]:
        if group["kind"] != "delta":
            continue
        kind_type = group["module_type"]
        modules = [
            m for m in report["modules"] if m["kind"] == "delta" and module_type(m["name"]) == kind_type
        ]
        rows = [table7_row(m["metrics"]) for m in modules]
        middle = next(
            (table7_row(m["metrics"]) for m in modules if layer_index(m["name"]) == LAYERS[0]), None
        )
        out[kind_type] = {
            "modules": group["count"],
            "intruders_total": group["metrics"]["intruder_dimensions"]["total"],
            "intruders_max": group["metrics"]["intruder_dimensions"]["max"],
            "modules_with_intruders": sum(m["metrics"]["intruder_dimensions"] > 0 for m in modules),
            # min over a module's top-k of max_j |cos|: below ε it is an intruder
            "closest_to_intruder": min(min(m["metrics"]["intruder_max_cosine"]) for m in modules),
            "mean": {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]},
            f"layer {LAYERS[0]}": middle,
        }
    return out


def table7_row(metrics: dict) -> dict:
    """The paper's Table 7 for one module: ‖ΔW‖_F, ‖UᵀWV‖_F for ΔW's, W's and random directions, the factor."""
    delta_fro = metrics["fro_norm"]
    amplification = metrics["amplification"]
    return {
        "delta_fro": delta_fro,
        "w_fro": delta_fro / metrics["relative_norm"],
        "relative_norm": metrics["relative_norm"],
        "projection_delta": delta_fro / amplification,  # ‖UᵀWV‖_F along ΔW's top-r directions
        "projection_w_top": metrics["amplification_w_top_baseline"],
        "projection_random": metrics["amplification_random_baseline"],
        "amplification": amplification,
    }


def phi_summary(report: dict) -> dict:
    """φ(1, 1) by both definitions for the layers of the figures, and the means per module type."""
    from lorasurgery.naming import layer_index, module_type

    out = {}
    for module in report["modules"]:
        if layer_index(module["name"]) in LAYERS:
            m = module["metrics"]
            out[module["name"]] = {
                "phi_1_1": m["subspace_similarity_1_1"],
                "phi_delta_1_1": m["subspace_similarity_delta_1_1"],
            }
    for kind_type in ("q_proj", "v_proj"):
        for key in ("subspace_similarity_1_1", "subspace_similarity_delta_1_1"):
            values = [m["metrics"][key] for m in report["modules"] if module_type(m["name"]) == kind_type]
            out[f"{kind_type} mean {key}"] = sum(values) / len(values)
            out[f"{kind_type} modules with {key} > 0.5"] = sum(v > 0.5 for v in values)
        gaps = [
            abs(m["metrics"]["subspace_similarity_1_1"] - m["metrics"]["subspace_similarity_delta_1_1"])
            for m in report["modules"]
            if module_type(m["name"]) == kind_type
        ]
        out[f"{kind_type} largest |φ − φ_delta|(1,1)"] = max(gaps)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def phi_figure(report: dict, title: str, columns: int, path: Path) -> None:
    """The paper's Fig. 3/4: φ(i, j) at layers 15 and 29 for ΔW_q and ΔW_v, both definitions, and
    the same grid between two random Gaussian matrices of the same shapes as the baseline."""
    import numpy as np

    from lorasurgery.naming import layer_index, module_type

    plt = _pyplot()
    chosen = [
        m
        for kind_type in ("q_proj", "v_proj")
        for m in report["modules"]
        if module_type(m["name"]) == kind_type and layer_index(m["name"]) in LAYERS
    ]
    rows = len(chosen[0]["metrics"]["subspace_similarity"])
    rng = np.random.default_rng(0)
    n = 576
    V1 = np.linalg.svd(rng.standard_normal((rows, n)), full_matrices=False)[2]
    V2 = np.linalg.svd(rng.standard_normal((columns, n)), full_matrices=False)[2]
    i, j = np.arange(1, rows + 1)[:, None], np.arange(1, columns + 1)[None, :]
    random_grid = ((V1 @ V2.T) ** 2).cumsum(0).cumsum(1) / np.minimum(i, j)
    fig, axes = plt.subplots(2, len(chosen) + 1, figsize=(2.6 * (len(chosen) + 1), 5.2), squeeze=False)
    for row, (key, which) in enumerate(
        (("subspace_similarity", "of A (the paper's)"), ("subspace_similarity_delta", "of ΔW"))
    ):
        for ax, module in zip(axes[row], chosen):
            grid = np.array(module["metrics"][key])[:, :columns]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            kind_type = module_type(module["name"])
            ax.set_title(f"ΔW_{kind_type[0]} layer {layer_index(module['name'])}, φ {which}", fontsize=7)
            ax.set_xlabel("j", fontsize=7)
            ax.set_ylabel("i", fontsize=7)
        ax = axes[row][-1]
        ax.imshow(random_grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title("random Gaussian A, A′", fontsize=7)
        ax.set_xlabel("j", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(f"φ(i, j) on SmolLM2-135M, {title}", fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def intruder_figure(reports: dict, path: Path) -> None:
    """Per layer, the smallest max_j |cos(u'_i, u_j)| over W + ΔW's top 10: below ε = 0.5 an intruder."""
    from lorasurgery.naming import layer_index, module_type

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, kind_type in zip(axes, ("q_proj", "v_proj")):
        for label, report in reports.items():
            points = sorted(
                (layer_index(m["name"]), min(m["metrics"]["intruder_max_cosine"]))
                for m in report["modules"]
                if m["kind"] == "delta" and module_type(m["name"]) == kind_type
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1, label=label)
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{kind_type}: least-aligned of W + ΔW's top 10", fontsize=8)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("min_i max_j |cos(u′ᵢ, uⱼ)|  (< 0.5: intruder)", fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def probe_figure(probe: dict, label: str, path: Path) -> None:
    """Kept effect of ΔW against the rank fraction, one line per module type."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for curve in probe["curves"]:
        points = sorted((p["fraction"], p["kept_effect"]) for p in curve["points"])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1, label=curve["module_type"])
    ax.axhline(1 - probe["tolerance"], color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rank fraction f of ΔW kept (one type at a time)")
    ax.set_ylabel("share of the effect kept (1 − KL ratio)")
    ax.set_title(f"functional rank of ΔW, SmolLM2-135M {label}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
