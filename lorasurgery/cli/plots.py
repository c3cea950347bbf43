"""PNG plots for rank-report (matplotlib, imported lazily, Agg backend: no display needed).

- spectra_<type>.png: singular values per module type on a log scale, the Gavish–Donoho threshold
  of each matrix marked, ΔW and W in separate panels;
- ranks_by_layer.png: effective, 90 % energy and Gavish–Donoho ranks against the layer index;
- probe.png (with --probe): loss rise or kept effect against the rank fraction, per module type;
- intruders_by_layer.png (with a base): intruder dimensions of W + ΔW per layer and module type;
- phi_<type>.png: the subspace-similarity grid φ(i, j) of the first module of each type, like the
  LoRA paper's Fig. 3 — for adapters two panels, the paper's (A's right singular vectors) and ΔW's.
"""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report, folder: str | os.PathLike) -> list[Path]:
    """Every figure the report has data for, as PNGs in `folder`: spectra per module type, ranks
    and intruders by layer, the probe's curves, and φ grids; the paths written."""
    from lorasurgery.naming import module_type

    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = sorted({e.kind for e in report.modules})
    types = list(dict.fromkeys(module_type(e.name) for e in report.modules))
    written = [_spectra_plot(report, kinds, kind_type, folder, plt) for kind_type in types]
    written.append(_ranks_plot(report, kinds, types, folder, plt))
    intruders = _intruders_plot(report, types, folder, plt)
    if intruders is not None:
        written.append(intruders)
    if getattr(report, "probe", None) is not None:
        written.append(_probe_plot(report.probe, folder, plt))
    return written + _phi_plots(report, folder, plt)


def _spectra_plot(report, kinds: list[str], kind_type: str, folder: Path, plt) -> Path:
    """σᵢ of every matrix of one module type, with each one's Gavish–Donoho threshold dotted."""
    from lorasurgery.linalg.policies import gavish_donoho_threshold
    from lorasurgery.naming import module_type

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        entries = [e for e in report.modules if e.kind == kind and module_type(e.name) == kind_type]
        for entry in entries:
            spectrum = [s for s in entry.spectrum if s > 0]
            if not spectrum:
                continue
            line = ax.semilogy(range(1, len(spectrum) + 1), spectrum, lw=1, alpha=0.8)[0]
            padded = entry.spectrum + [0.0] * (min(entry.shape[:2]) - len(entry.spectrum))
            threshold = gavish_donoho_threshold(padded, tuple(entry.shape[:2]))
            ax.axhline(threshold, color=line.get_color(), ls=":", lw=0.8)
        ax.set_title(f"{kind_type}: {'ΔW' if kind == 'delta' else 'W'} ({len(entries)} matrices)")
        ax.set_xlabel("index i")
        ax.set_ylabel("σᵢ (dotted: Gavish–Donoho threshold)")
    fig.tight_layout()
    return _save(fig, folder / f"spectra_{kind_type}.png", plt)


def _by_layer(report, kind_type: str, metric: str, kind: str | None = None) -> list[tuple]:
    """(layer, value) of `metric` for the matrices of one module type (and kind), by layer."""
    from lorasurgery.naming import layer_index, module_type

    return sorted(
        (layer_index(e.name), e.metrics[metric])
        for e in report.modules
        if (kind is None or e.kind == kind)
        and module_type(e.name) == kind_type
        and layer_index(e.name) is not None
        and metric in e.metrics
    )


def _ranks_plot(report, kinds: list[str], types: list[str], folder: Path, plt) -> Path:
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for metric, style in (("effective_rank", "-"), ("energy_rank_90", "--"), ("optimal_rank", ":")):
            for kind_type in types:
                points = _by_layer(report, kind_type, metric, kind)
                if points:
                    ax.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        style,
                        marker=".",
                        label=f"{kind_type} {metric}",
                    )
        ax.set_title(f"ranks of {'ΔW' if kind == 'delta' else 'W'} by layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("rank")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, folder / "ranks_by_layer.png", plt)


def _intruders_plot(report, types: list[str], folder: Path, plt) -> Path | None:
    points_by_type = {kind_type: _by_layer(report, kind_type, "intruder_dimensions") for kind_type in types}
    if not any(points_by_type.values()):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind_type, points in points_by_type.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=kind_type)
    ax.set_title("intruder dimensions of W + ΔW by layer (Shuttleworth et al. 2024)", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("intruders among the top-k")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, folder / "intruders_by_layer.png", plt)


def _phi_plots(report, folder: Path, plt) -> list[Path]:
    """φ(i, j) grids of --compare, one figure per module type (its first module)."""
    from lorasurgery.naming import module_type

    written, shown = [], set()
    for entry in report.modules:
        grid = entry.metrics.get("subspace_similarity")
        if not grid or module_type(entry.name) in shown:
            continue
        shown.add(module_type(entry.name))
        # An adapter has two φ grids (A's, the paper's; ΔW's, gauge-invariant); a dense ΔW one.
        panels = [(grid, "of A₁, A₂ (the paper's)" if report.mode == "adapter" else "of ΔW₁, ΔW₂")]
        if report.mode == "adapter" and entry.metrics.get("subspace_similarity_delta"):
            panels.append((entry.metrics["subspace_similarity_delta"], "of ΔW₁, ΔW₂ (gauge-invariant)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
        for ax, (values, which) in zip(axes[0], panels):
            image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", origin="upper")
            ax.set_title(f"φ(i, j) {which}\n{entry.name}", fontsize=7)
            ax.set_xlabel("j (compare)")
            ax.set_ylabel("i (target)")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(_save(fig, folder / f"phi_{module_type(entry.name)}.png", plt))
    return written


def _probe_plot(probe, folder: Path, plt) -> Path:
    """probe.png: loss rise (W) or kept effect (ΔW) against the rank fraction, one line per type."""
    key, label = (
        ("loss_rise", "relative loss rise") if probe.mode == "weight" else ("kept_effect", "kept effect")
    )
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for curve in probe.curves:
        points = sorted((p["fraction"], p[key]) for p in curve.points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=curve.module_type)
    threshold = probe.tolerance if probe.mode == "weight" else 1 - probe.tolerance
    ax.axhline(threshold, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("rank fraction f (measured points of the bisection)")
    ax.set_ylabel(label)
    ax.set_title(
        f"functional rank of {'W' if probe.mode == 'weight' else 'ΔW'} ({probe.tokens} tokens)", fontsize=8
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, folder / "probe.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
