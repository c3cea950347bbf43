"""The `lorasurgery` commands: parse options, call the library core, render the result.

torch and the commands are imported inside each command so that `lorasurgery --help` stays fast
(docs/architecture.md, "Lazy imports"); errors become `Error: …` in one place (cli/group.py);
shared options come from cli/options.py.
"""

from __future__ import annotations

import signal
import sys

import click

from lorasurgery import __version__
from lorasurgery.cli.group import LoraSurgeryGroup, Settings, settings_of
from lorasurgery.cli.options import (
    TARGET_RELEASES,
    TargetType,
    allow_nonfinite_option,
    config_option,
    device_option,
    dtype_option,
    fan_in_fan_out_option,
    force_option,
    global_options,
    json_option,
    make_policy,
    policy_options,
    text_option,
    tokens_option,
)


@click.group(cls=LoraSurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorasurgery")
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars or log lines on stderr (also after the command)."
)
@click.option("--debug", is_flag=True, help="Show the full traceback on errors (also after the command).")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """Model surgery and analysis of LoRA adapters.

    Inspect an adapter, merge adapters into a base checkpoint, extract an adapter from a full
    fine-tune, and measure the intrinsic rank of ΔW and W.
    """
    ctx.obj = Settings(quiet=quiet, debug=debug)


@cli.command()
@click.argument("adapter", type=click.Path(exists=False))
@click.option("--base", type=click.Path(exists=False), help="Base checkpoint to check the adapter against.")
@json_option
@click.option("--all", "show_all", is_flag=True, help="One table row per module, not per module type.")
@config_option("With --base: the base's config.json, when it has none.")
@fan_in_fan_out_option("With --base: modules stored (in, out) (as merge).")
@click.option(
    "--for",
    "target",
    type=TargetType(),
    help="Check each rule of this serving target instead (exit 0 loadable as is, 3 export fixes it, 4 impossible); "
    f"{TARGET_RELEASES}.",
)
@global_options
@click.pass_context
def inspect(
    ctx: click.Context,
    adapter: str,
    base: str | None,
    as_json: bool,
    show_all: bool,
    config_file: str | None,
    fan_in_fan_out: str | None,
    target: object | None,
) -> None:
    """Show what ADAPTER targets, its ranks, scales and update sizes, without loading a model."""
    import lorasurgery.cli.render as render
    from lorasurgery.commands.inspect import inspect_adapter

    quiet = settings_of(ctx).quiet
    if target is not None:
        from lorasurgery.commands.export.export import serving_check

        check = serving_check(adapter, target, base=base)
        render.serving_check(check, as_json=as_json)
        ctx.exit(check.exit_code)
    with render.progress_bar("inspect", quiet) as progress:
        report = inspect_adapter(
            adapter, base=base, progress=progress, config_file=config_file, fan_in_fan_out=fan_in_fan_out
        )
    render.inspect_report(report, as_json=as_json, show_all=show_all, quiet=quiet)


@cli.command()
@click.argument("base", type=click.Path(exists=False))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output model folder.")
@click.option("--weight", "weights", multiple=True, type=float, help="Weight of each adapter (default 1).")
@click.option("--subtract", is_flag=True, help="Remove the adapters' updates instead of adding them.")
@dtype_option("Output dtype.")
@click.option("--max-shard-size", help="Shard the output (e.g. 5GB); default: shard like the base.")
@device_option
@click.option("--precise", is_flag=True, help="Compute ΔW and W + ΔW in float64.")
@force_option
@click.option("--verify", is_flag=True, help="Compare logits of base+adapter and merged model.")
@click.option(
    "--resume",
    is_flag=True,
    help="Reuse the checked, finished shards of a killed run with the same arguments; keep this run's if interrupted.",
)
@allow_nonfinite_option("inputs or results")
@json_option
@config_option(
    "The base's config.json (file or folder), when BASE has none: gives each layer's kind and the ties."
)
@click.option(
    "--requantize",
    is_flag=True,
    help="Quantized BASE: keep its format (merged tensors requantized, retention reported) instead of writing it unquantized.",
)
@click.option(
    "--min-retention",
    type=float,
    metavar="R",
    help="With --requantize: write modules whose retention is below R unquantized (and list them in the config).",
)
@fan_in_fan_out_option(
    "Modules stored (in, out) like GPT-2's Conv1D, when no config.json can tell (others: (out, in))."
)
@global_options
@click.pass_context
def merge(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    output: str,
    weights: tuple[float, ...],
    subtract: bool,
    dtype: str,
    max_shard_size: str | None,
    device: str,
    precise: bool,
    force: bool,
    verify: bool,
    resume: bool,
    allow_nonfinite: bool,
    as_json: bool,
    config_file: str | None,
    requantize: bool,
    min_retention: float | None,
    fan_in_fan_out: str | None,
) -> None:
    """Fold one or more ADAPTERS into BASE and write a plain checkpoint to OUTPUT.

    W' = W + Σ wᵢ·ΔWᵢ exactly as PEFT's merge_and_unload computes ΔW (scales, rsLoRA, patterns,
    fan_in_fan_out, embeddings, DoRA, lora_bias, saved modules), in float32 with one rounding,
    one tensor at a time. Untouched tensors are copied byte for byte.
    """
    import lorasurgery.cli.render as render
    from lorasurgery.commands.merge import MergeRequest, merge_checkpoint
    from lorasurgery.units import parse_bytes

    request = MergeRequest(
        base,
        list(adapters),
        output,
        weights=list(weights) or None,
        subtract=subtract,
        dtype=dtype,
        max_shard_bytes=parse_bytes(max_shard_size) if max_shard_size else None,
        device=device,
        precise=precise,
        force=force,
        allow_nonfinite=allow_nonfinite,
        verify=verify,
        config_file=config_file,
        fan_in_fan_out=fan_in_fan_out,
        resume=resume,
        requantize=requantize,
        min_retention=min_retention,
    )
    quiet = settings_of(ctx).quiet
    with render.merge_progress(quiet=quiet) as progress:
        summary = merge_checkpoint(request, progress)
    render.merge_summary(summary, as_json=as_json, quiet=quiet)


@cli.command()
@click.argument("base", type=click.Path(exists=False))
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(exists=False), metavar="ADAPTER... ARTIFACT"
)
@click.option(
    "--weight", "weights", multiple=True, type=float, help="Weight of each adapter (default 1), as merge's."
)
@click.option(
    "--target",
    type=TargetType(),
    default=None,
    help="An adapter ARTIFACT: check it by this runtime's rules (default: llama.cpp for a GGUF file, "
    f"else peft); {TARGET_RELEASES}.",
)
@text_option("Also compare the artifact's logits on this text with base + adapters through PEFT.")
@tokens_option
@device_option
@json_option
@config_option("The base's config.json (file or folder), when BASE has none.")
@global_options
@click.pass_context
def verify(
    ctx: click.Context,
    base: str,
    paths: tuple[str, ...],
    weights: tuple[float, ...],
    target: object | None,
    text: str | None,
    tokens: int,
    device: str,
    as_json: bool,
    config_file: str | None,
) -> None:
    """Check that ADAPTERs landed in ARTIFACT: a merged checkpoint made by any tool, or an adapter
    exported for a runtime (a PEFT folder, a llama.cpp GGUF LoRA).

    Per tensor, the landed update ΔŴ (W_artifact − W_base, or what the runtime computes from the
    adapter by its own rules) against PEFT's ΔW: relative error, retention ρ and a verdict (landed,
    partly, missing, transposed, scaled by c, applied twice, wrong side of a tie, refused, and for
    block-quantized artifacts "cannot tell at this quantization" where the rounding hides ΔW); every
    other tensor must be unchanged, config.json consistent. Exit 0 when everything landed, 1 when
    the check found a failure (--json's "landed": false) or could not check.
    """
    import lorasurgery.cli.render as render
    from lorasurgery.commands.verify import DID_NOT_LAND, VerifyRequest, verify_artifact

    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and then the ARTIFACT")
    quiet = settings_of(ctx).quiet
    request = VerifyRequest(
        base,
        list(paths[:-1]),
        paths[-1],
        weights=list(weights) or None,
        device=device,
        config_file=config_file,
        target=target,
        text=text,
        tokens=tokens,
    )
    report = verify_artifact(request)
    render.verify_report(report, as_json=as_json, quiet=quiet)
    ctx.exit(0 if report.landed else DID_NOT_LAND)


@cli.command()
@click.argument("base", type=click.Path(exists=False))
@click.argument("finetuned", type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output adapter folder.")
@policy_options
@click.option("--include", help="Regex: only modules whose name matches.")
@click.option("--exclude", help="Regex: skip modules whose name matches.")
@click.option("--embeddings", type=click.Choice(["skip", "lora", "full"]), default="skip", show_default=True)
@click.option("--save-1d", is_flag=True, help="Save changed norms and biases too.")
@dtype_option("Adapter dtype.")
@click.option(
    "--svd",
    type=click.Choice(["exact", "randomized", "auto"]),
    default="auto",
    show_default=True,
    help="auto: block Krylov on large matrices, else exact; randomized: torch.svd_lowrank.",
)
@device_option
@force_option
@allow_nonfinite_option("inputs")
@click.option("--report", type=click.Path(), help="Write the error report as JSON to this file.")
@config_option("The models' config.json, when they have none.")
@click.option(
    "--calibrate", is_flag=True, help="Minimise the error on the layers' inputs over --text (data-aware)."
)
@text_option("Text file for --calibrate (the model's tokenizer).")
@tokens_option
@json_option
@global_options
@click.pass_context
def extract(
    ctx: click.Context,
    base: str,
    finetuned: str,
    output: str,
    rank: int | None,
    energy: float | None,
    ratio: float | None,
    auto: bool,
    budget: str | None,
    max_rank: int | None,
    include: str | None,
    exclude: str | None,
    embeddings: str,
    save_1d: bool,
    dtype: str,
    svd: str,
    device: str,
    force: bool,
    allow_nonfinite: bool,
    report: str | None,
    config_file: str | None,
    calibrate: bool,
    text: str | None,
    tokens: int,
    as_json: bool,
) -> None:
    """Extract a PEFT LoRA adapter from the full fine-tune FINETUNED of BASE by truncated SVD.

    ΔW = W_ft − W_base per module, factored as B = U√S, A = √S Vᵀ with scale 1. Choose exactly one
    rank policy. The report gives each module's true error after the cast to the output dtype.
    """
    import lorasurgery.cli.render as render
    from lorasurgery.commands.extract.extract import ExtractRequest, extract_adapter, write_extract_report

    if calibrate != bool(text):
        raise click.UsageError("--calibrate and --text FILE go together")
    policy = make_policy(rank, energy, ratio, auto, budget)
    quiet = settings_of(ctx).quiet
    with render.progress_bar("extract", quiet) as progress:
        result = extract_adapter(
            ExtractRequest(
                base,
                finetuned,
                output,
                policy=policy,
                max_rank=max_rank,
                include=include,
                exclude=exclude,
                embeddings=embeddings,
                save_1d=save_1d,
                dtype=dtype,
                svd=svd,
                device=device,
                force=force,
                allow_nonfinite=allow_nonfinite,
                calibrate=text if calibrate else None,
                calibrate_tokens=tokens,
                config_file=config_file,
            ),
            progress=progress,
        )
    if report:
        write_extract_report(result, report)
    render.extract_report(result, as_json=as_json, quiet=quiet)


@cli.command("rank-report")
@click.argument("target", type=click.Path(exists=False))
@click.option("--base", type=click.Path(exists=False), help="Base checkpoint (ΔW = TARGET − BASE).")
@click.option("--compare", type=click.Path(exists=False), help="Second adapter or model for φ(i, j).")
@click.option("--amp-rank", type=click.IntRange(min=1), help="r for the amplification factor.")
@click.option("--include", help="Regex: only modules whose name matches.")
@click.option("--all", "show_all", is_flag=True, help="One table row per module, not per module type.")
@click.option("--json", "json_path", help="Write JSON to this file ('-' for stdout).")
@click.option("--csv", "csv_path", type=click.Path(), help="Write one CSV row per module and kind.")
@click.option("--plot", "plot_dir", type=click.Path(), help="Write PNG plots into this folder.")
@click.option("--mle", is_flag=True, help="Add Minka's MLE dimensionality (scikit-learn).")
@device_option
@config_option("The model's config.json, when it has none.")
@fan_in_fan_out_option("With --base: modules stored (in, out) (as merge).")
@click.option(
    "--intruders-k",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Intruder dimensions (with a base): how many top singular vectors of W + ΔW to test.",
)
@click.option(
    "--intruders-eps",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="A top vector of W + ΔW is an intruder when its max |cos| with W's is below this.",
)
@click.option("--probe", is_flag=True, help="Functional rank per module type: forward passes on --text.")
@text_option("Text file for --probe (tokenised by the model's tokenizer).")
@tokens_option
@click.option(
    "--probe-fractions",
    default="0.05,0.1,0.25,0.5,0.75",
    show_default=True,
    help="Rank fractions f to probe, comma-separated, each in (0, 1].",
)
@click.option(
    "--probe-tolerance",
    type=click.FloatRange(min=0, max=1),
    default=0.01,
    show_default=True,
    help="Largest relative loss rise (W) or lost share of the fine-tune's effect (ΔW) that still passes.",
)
@click.option("--probe-all", is_flag=True, help="Measure every fraction (default: bisection, fewer passes).")
@global_options
@click.pass_context
def rank_report(
    ctx: click.Context,
    target: str,
    base: str | None,
    compare: str | None,
    amp_rank: int | None,
    include: str | None,
    show_all: bool,
    json_path: str | None,
    csv_path: str | None,
    plot_dir: str | None,
    mle: bool,
    device: str,
    config_file: str | None,
    fan_in_fan_out: str | None,
    intruders_k: int,
    intruders_eps: float,
    probe: bool,
    text: str | None,
    tokens: int,
    probe_fractions: str,
    probe_tolerance: float,
    probe_all: bool,
) -> None:
    """Measure the intrinsic rank of ΔW (adapter, or TARGET − BASE) and of W.

    TARGET is a PEFT adapter (ΔW = s·B@A, spectra from r×r cores) or a model: with --base, ΔW is
    TARGET − BASE; alone, W's own spectra. Adds the LoRA paper's amplification factor and the
    intruder dimensions of W + ΔW (with a base), and subspace similarity φ(i, j) against --compare.
    """
    import lorasurgery.cli.render as render
    from lorasurgery.commands.rank_report.rank_report import RankReportRequest
    from lorasurgery.commands.rank_report.rank_report import rank_report as run_rank_report

    if probe and not text:
        raise click.UsageError("--probe needs --text FILE (the text the model is run on)")
    if text and not probe:
        raise click.UsageError("--text is for --probe")
    try:
        fractions = [float(f) for f in probe_fractions.split(",") if f.strip()]
    except ValueError:
        raise click.BadParameter(
            "comma-separated numbers, e.g. 0.1,0.5", param_hint="--probe-fractions"
        ) from None
    request = RankReportRequest(
        target,
        base=base,
        compare=compare,
        amp_rank=amp_rank,
        include=include,
        mle=mle,
        device=device,
        intruders_k=intruders_k,
        intruders_eps=intruders_eps,
        probe_text=text if probe else None,
        probe_tokens=tokens,
        probe_fractions=fractions,
        probe_tolerance=probe_tolerance,
        probe_all=probe_all,
        config_file=config_file,
        fan_in_fan_out=fan_in_fan_out,
    )
    quiet = settings_of(ctx).quiet
    with render.progress_bar("rank-report", quiet) as progress:
        report = run_rank_report(request, progress)
    render.rank_report(
        report, show_all=show_all, json_path=json_path, csv_path=csv_path, plot_dir=plot_dir, quiet=quiet
    )


# ------------------------------------------------------------------------------ resize / combine


def surgery_options(command):
    """--base/--dtype/--device/--force/--report/--json of resize and combine."""
    for option in reversed(
        (
            click.option(
                "--base", type=click.Path(exists=False), help="Base checkpoint (needed for DoRA inputs)."
            ),
            dtype_option("Adapter dtype."),
            device_option,
            force_option,
            click.option("--report", type=click.Path(), help="Write the error report as JSON to this file."),
            json_option,
        )
    ):
        command = option(command)
    return command


@cli.command()
@click.argument("adapter", type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output adapter folder.")
@policy_options
@surgery_options
@global_options
@click.pass_context
def resize(
    ctx: click.Context,
    adapter: str,
    output: str,
    rank: int | None,
    energy: float | None,
    ratio: float | None,
    auto: bool,
    budget: str | None,
    max_rank: int | None,
    base: str | None,
    dtype: str,
    device: str,
    force: bool,
    report: str | None,
    as_json: bool,
) -> None:
    """Re-rank ADAPTER: each module's optimal rank-k update (Eckart–Young), never forming d×k.

    The exact SVD of s·B@A comes from QR factors; B' = U√S, A' = √S Vᵀ with scale 1. --budget
    chooses all ranks jointly. The report gives each module's true error after the cast. A DoRA
    adapter needs --base and becomes a plain LoRA of its effective update.
    """
    from lorasurgery.commands.surgery.resize import ResizeRequest, resize_adapter

    policy = make_policy(rank, energy, ratio, auto, budget)
    request = ResizeRequest(adapter, output, policy, max_rank, base, dtype, device, force)
    _run_surgery(ctx, "resize", lambda progress: resize_adapter(request, progress), report, as_json)


@cli.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option(
    "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (default 1)."
)
@click.option("--exact", is_flag=True, help="Write the exact sum (concatenated factors, rank Σr).")
@policy_options
@surgery_options
@global_options
@click.pass_context
def combine(
    ctx: click.Context,
    adapters: tuple[str, ...],
    output: str,
    weights: tuple[float, ...],
    exact: bool,
    rank: int | None,
    energy: float | None,
    ratio: float | None,
    auto: bool,
    budget: str | None,
    max_rank: int | None,
    base: str | None,
    dtype: str,
    device: str,
    force: bool,
    report: str | None,
    as_json: bool,
) -> None:
    """Combine ADAPTERS into one: ΔW = Σ wᵢ sᵢ BᵢAᵢ per module, exact or optimally truncated.

    --exact writes the concatenation [w₁s₁B₁ …]·[A₁; …] (merges to exactly the weighted sum); a rank
    policy keeps the best rank-k approximation of the sum (QR of the concatenations, never d×k).
    Adapters may differ in targets, ranks, scales, rsLoRA and patterns.
    """
    from lorasurgery.commands.surgery.combine import CombineRequest, combine_adapters

    policy = make_policy(rank, energy, ratio, auto, budget, optional=exact)
    request = CombineRequest(
        list(adapters), output, list(weights) or None, exact, policy, max_rank, base, dtype, device, force
    )
    _run_surgery(ctx, "combine", lambda progress: combine_adapters(request, progress), report, as_json)


def _run_surgery(ctx: click.Context, stage: str, run, report: str | None, as_json: bool) -> None:
    """resize's and combine's run: `run(progress)` under a progress bar, its report written (--report)
    and rendered."""
    import lorasurgery.cli.render as render
    from lorasurgery.commands.surgery.surgery import write_surgery_report

    quiet = settings_of(ctx).quiet
    with render.progress_bar(stage, quiet) as progress:
        result = run(progress)
    if report:
        write_surgery_report(result, report)
    render.surgery_report(result, as_json=as_json, quiet=quiet)


# ------------------------------------------------------------------------------ export


@cli.command()
@click.argument("adapter", type=click.Path(exists=False))
@click.option(
    "--for",
    "target",
    required=True,
    type=TargetType(),
    help=f"Serving target; {TARGET_RELEASES} (the report's rules; what is written is read alike by every release).",
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(),
    help="Output folder (llama.cpp: .gguf file).",
)
@click.option(
    "--base",
    type=click.Path(exists=False),
    help="Base model folder: config.json (llama.cpp), weights (DoRA).",
)
@click.option(
    "--max-rank",
    type=int,
    help="Truncate modules (MoE experts: each expert) above this rank, error reported; the rank DoRA is converted at.",
)
@click.option(
    "--drop-saved", is_flag=True, help="Leave out saved tensors the target cannot load (norm reported)."
)
@force_option
@json_option
@global_options
@click.pass_context
def export(
    ctx: click.Context,
    adapter: str,
    target: object,
    output: str,
    base: str | None,
    max_rank: int | None,
    drop_saved: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Rewrite ADAPTER so that a serving stack computes exactly PEFT's ΔW, or refuse saying why.

    Each module's true scale (α, r, rsLoRA, patterns) is folded into lora_B so the target's single
    formula is exact; regex targets become lists; DoRA becomes a plain LoRA of its effective update
    (needs --base, error reported). llama.cpp gets a GGUF LoRA file (needs --base for config.json).
    """
    import lorasurgery.cli.render as render
    from lorasurgery.commands.export.export import export_adapter

    quiet = settings_of(ctx).quiet
    with render.progress_bar("export", quiet) as progress:
        report = export_adapter(
            adapter,
            target,
            output,
            base=base,
            max_rank=max_rank,
            drop_saved=drop_saved,
            force=force,
            progress=progress,
        )
    render.export_report(report, as_json=as_json, quiet=quiet)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM unwinds like Ctrl-C so that temporary outputs are removed, unless it was ignored when
    # the run started: a signal ignored at start stays ignored, the Unix convention that Python keeps
    # for SIGINT (a `cmd &` or nohup job starts with SIGINT ignored and runs to completion;
    # docs/design.md §7). With SIGXFSZ ignored, a file-size limit makes write() fail with EFBIG (a
    # clean error) instead of killing the process.
    if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cli(prog_name="lorasurgery")
    except SystemExit as done:
        if "torch" not in sys.modules or not isinstance(done.code, (int, type(None))):
            raise
        _exit_now(done.code or 0)


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which takes 0.3–0.6 s once torch is imported (it
    unloads thousands of modules). Every output is closed and renamed into place by now; only the
    standard streams may still hold buffered text."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing left to say
            code = code or 1
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
