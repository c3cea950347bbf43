"""The `lorasurgery` command line: parse options, call the library core, render the result.

This is the only place that turns library errors into `Error: …` on stderr with exit code 1
(click's own usage errors keep exit code 2). torch and the operations are imported inside the
commands so that `lorasurgery --help` stays fast.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

import click

from lorasurgery import __version__
from lorasurgery.errors import LoraSurgeryError

DEVICE = click.Choice(["cpu", "cuda", "auto"])
DTYPE = click.Choice(["auto", "fp32", "bf16", "fp16"])


@dataclass
class Settings:
    quiet: bool = False
    debug: bool = False


class LoraSurgeryGroup(click.Group):
    """A click group that maps library errors to `Error: …` and exit code 1, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (LoraSurgeryError, OSError, KeyboardInterrupt) as error:
            settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
            if settings.debug:
                raise
            click.echo(f"Error: {describe_error(error)}", err=True)
            ctx.exit(130 if isinstance(error, KeyboardInterrupt) else 1)


def describe_error(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; nothing was written"
    if isinstance(error, OSError) and not isinstance(error, LoraSurgeryError):
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return str(error)


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_object(Settings) or Settings()


@click.group(cls=LoraSurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorasurgery")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines on stderr.")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="One table row per module, not per module type.")
@click.pass_context
def inspect(ctx: click.Context, adapter: str, base: str | None, as_json: bool, show_all: bool) -> None:
    """Show what ADAPTER targets, its ranks, scales and update sizes, without loading a model."""
    from lorasurgery import render
    from lorasurgery.operations.inspect import inspect_adapter

    quiet = settings_of(ctx).quiet
    with render.progress_bar("inspect", quiet) as progress:
        report = inspect_adapter(adapter, base=base, progress=progress)
    render.inspect_report(report, as_json=as_json, show_all=show_all, quiet=quiet)


@cli.command()
@click.argument("base", type=click.Path(exists=False))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output model folder.")
@click.option("--weight", "weights", multiple=True, type=float, help="Weight of each adapter (default 1).")
@click.option("--subtract", is_flag=True, help="Remove the adapters' updates instead of adding them.")
@click.option("--dtype", type=DTYPE, default="auto", show_default=True, help="Output dtype.")
@click.option("--max-shard-size", help="Shard the output (e.g. 5GB); default: shard like the base.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--precise", is_flag=True, help="Compute ΔW and W + ΔW in float64.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--verify", is_flag=True, help="Compare logits of base+adapter and merged model.")
@click.option("--allow-nonfinite", is_flag=True, help="Go on when inputs or results hold NaN/Inf.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def merge(ctx: click.Context, base: str, adapters: tuple[str, ...], output: str, **options) -> None:
    """Fold one or more ADAPTERS into BASE and write a plain checkpoint to OUTPUT.

    W' = W + Σ wᵢ·ΔWᵢ exactly as PEFT's merge_and_unload computes ΔW (scales, rsLoRA, patterns,
    fan_in_fan_out, embeddings, DoRA, lora_bias, saved modules), in float32 with one rounding,
    one tensor at a time. Untouched tensors are copied byte for byte.
    """
    from lorasurgery import render
    from lorasurgery.operations.merge import merge_checkpoint
    from lorasurgery.units import parse_bytes

    weights = options["weights"]
    if weights and len(weights) != len(adapters):
        raise click.BadParameter(
            f"{len(weights)} values for {len(adapters)} adapters; give one --weight per adapter, in order",
            param_hint="--weight",
        )
    max_shard = options["max_shard_size"]
    settings = settings_of(ctx)
    with render.merge_progress(quiet=settings.quiet) as progress:
        summary = merge_checkpoint(
            base,
            list(adapters),
            output,
            weights=list(weights) or None,
            subtract=options["subtract"],
            dtype=options["dtype"],
            max_shard_bytes=parse_bytes(max_shard) if max_shard else None,
            device=options["device"],
            precise=options["precise"],
            force=options["force"],
            allow_nonfinite=options["allow_nonfinite"],
            verify=options["verify"],
            progress=progress,
        )
    render.merge_summary(summary, as_json=options["as_json"], quiet=settings.quiet)


@cli.command()
@click.argument("base", type=click.Path(exists=False))
@click.argument("finetuned", type=click.Path(exists=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output adapter folder.")
@click.option("--rank", type=click.IntRange(min=1), help="Fixed rank for every module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep this share of Σσ².")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), help="Keep σᵢ ≥ ratio·σ₁.")
@click.option("--auto", is_flag=True, help="Gavish–Donoho optimal hard threshold.")
@click.option("--budget", help="Total parameter budget over all modules (e.g. 20M).")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap on every module's rank.")
@click.option("--include", help="Regex: only modules whose name matches.")
@click.option("--exclude", help="Regex: skip modules whose name matches.")
@click.option("--embeddings", type=click.Choice(["skip", "lora", "full"]), default="skip", show_default=True)
@click.option("--save-1d", is_flag=True, help="Save changed norms and biases too.")
@click.option("--dtype", type=DTYPE, default="auto", show_default=True, help="Adapter dtype.")
@click.option(
    "--svd",
    type=click.Choice(["exact", "randomized", "auto"]),
    default="auto",
    show_default=True,
    help="auto: block Krylov on large matrices, else exact; randomized: torch.svd_lowrank.",
)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--allow-nonfinite", is_flag=True, help="Go on when inputs hold NaN/Inf.")
@click.option("--report", type=click.Path(), help="Write the error report as JSON to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--calibrate", is_flag=True, help="Minimise the error on the layers' inputs over --text (data-aware)."
)
@click.option("--text", "text", type=click.Path(), help="Text file for --calibrate (the model's tokenizer).")
@click.option(
    "--tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens of --text used."
)
@click.pass_context
def extract(ctx: click.Context, base: str, finetuned: str, output: str, **options) -> None:
    """Extract a PEFT LoRA adapter from the full fine-tune FINETUNED of BASE by truncated SVD.

    ΔW = W_ft − W_base per module, factored as B = U√S, A = √S Vᵀ with scale 1. Choose exactly one
    rank policy. The report gives each module's true error after the cast to the output dtype.
    """
    from lorasurgery import render
    from lorasurgery.operations.extract import Policy, extract_adapter, write_report
    from lorasurgery.units import parse_count

    if options["calibrate"] != bool(options["text"]):
        raise click.UsageError("--calibrate and --text FILE go together")
    policies = [n for n in ("rank", "energy", "ratio", "budget") if options[n] is not None]
    policies += ["auto"] if options["auto"] else []
    if len(policies) != 1:
        raise click.UsageError(
            "choose exactly one rank policy: --rank, --energy, --ratio, --auto or --budget"
            + (f" (got {', '.join('--' + p for p in policies)})" if policies else "")
        )
    budget = None
    if options["budget"] is not None:
        try:
            budget = parse_count(options["budget"])
        except (ValueError, LoraSurgeryError) as error:
            raise click.BadParameter(str(error), param_hint="--budget") from None
        if budget < 1:
            raise click.BadParameter("the budget must be at least 1 parameter", param_hint="--budget")
    policy = Policy(
        rank=options["rank"],
        energy=options["energy"],
        ratio=options["ratio"],
        auto=options["auto"],
        budget=budget,
    )
    quiet = settings_of(ctx).quiet
    with render.progress_bar("extract", quiet) as progress:
        report = extract_adapter(
            base,
            finetuned,
            output,
            policy=policy,
            max_rank=options["max_rank"],
            include=options["include"],
            exclude=options["exclude"],
            embeddings=options["embeddings"],
            save_1d=options["save_1d"],
            dtype=options["dtype"],
            svd=options["svd"],
            device=options["device"],
            force=options["force"],
            allow_nonfinite=options["allow_nonfinite"],
            calibrate=options["text"] if options["calibrate"] else None,
            calibrate_tokens=options["tokens"],
            progress=progress,
        )
    if options["report"]:
        write_report(report, options["report"])
    render.extract_report(report, as_json=options["as_json"], quiet=quiet)


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
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
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
@click.option(
    "--text", "text", type=click.Path(), help="Text file for --probe (tokenised by the model's tokenizer)."
)
@click.option(
    "--tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens of --text used."
)
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
@click.pass_context
def rank_report(ctx: click.Context, target: str, **options) -> None:
    """Measure the intrinsic rank of ΔW (adapter, or TARGET − BASE) and of W.

    TARGET is a PEFT adapter (ΔW = s·B@A, spectra from r×r cores) or a model: with --base, ΔW is
    TARGET − BASE; alone, W's own spectra. Adds the LoRA paper's amplification factor and the
    intruder dimensions of W + ΔW (with a base), and subspace similarity φ(i, j) against --compare.
    """
    from lorasurgery import render
    from lorasurgery.operations.rank_report import rank_report

    if options["probe"] and not options["text"]:
        raise click.UsageError("--probe needs --text FILE (the text the model is run on)")
    if options["text"] and not options["probe"]:
        raise click.UsageError("--text is for --probe")
    try:
        fractions = [float(f) for f in options["probe_fractions"].split(",") if f.strip()]
    except ValueError:
        raise click.BadParameter(
            "comma-separated numbers, e.g. 0.1,0.5", param_hint="--probe-fractions"
        ) from None
    quiet = settings_of(ctx).quiet
    with render.progress_bar("rank-report", quiet) as progress:
        report = rank_report(
            target,
            base=options["base"],
            compare=options["compare"],
            amp_rank=options["amp_rank"],
            include=options["include"],
            mle=options["mle"],
            device=options["device"],
            intruders_k=options["intruders_k"],
            intruders_eps=options["intruders_eps"],
            probe_text=options["text"] if options["probe"] else None,
            probe_tokens=options["tokens"],
            probe_fractions=fractions,
            probe_tolerance=options["probe_tolerance"],
            probe_all=options["probe_all"],
            progress=progress,
        )
    render.rank_report(
        report,
        show_all=options["show_all"],
        json_path=options["json_path"],
        csv_path=options["csv_path"],
        plot_dir=options["plot_dir"],
        quiet=quiet,
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM unwinds like Ctrl-C so that temporary outputs are removed. With SIGXFSZ ignored, a
    # file-size limit makes write() fail with EFBIG (a clean error) instead of killing the process.
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
