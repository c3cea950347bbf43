"""Options that several commands share, defined once as decorators (as sqlite-utils does)."""

from __future__ import annotations

import click

from lorasurgery.cli.group import Settings
from lorasurgery.errors import LoraSurgeryError
from lorasurgery.io.safetensors_format import OUTPUT_DTYPES


def _set_global(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # given after the command name: the same Settings object the group made
        setattr(ctx.ensure_object(Settings), param.name, True)


def global_options(command):
    """--quiet and --debug after the command name too (`lorasurgery merge … --quiet`)."""
    command = click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_set_global,
        help="Show the full traceback on errors.",
    )(command)
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        callback=_set_global,
        help="No progress bars or log lines on stderr.",
    )(command)


def _flag(*names: str, help: str):
    return click.option(*names, is_flag=True, help=help)


device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True
)
force_option = _flag("--force", help="Replace an existing output folder.")
json_option = _flag("--json", "as_json", help="Print JSON on stdout instead of a table.")


def dtype_option(what: str):
    return click.option(
        "--dtype",
        type=click.Choice(["auto", *OUTPUT_DTYPES]),
        default="auto",
        show_default=True,
        help=what,
    )


def allow_nonfinite_option(what: str):
    return _flag("--allow-nonfinite", help=f"Go on when {what} hold NaN/Inf.")


def text_option(what: str):
    return click.option("--text", "text", type=click.Path(), help=what)


tokens_option = click.option(
    "--tokens", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens of --text used."
)


class TargetType(click.ParamType):
    """A serving target: vllm (its newest release known), vllm==RELEASE (an older release's rules),
    sglang, llama.cpp or peft; read by lorasurgery.targets.parse_target, whose OptionError (naming
    the known releases) becomes click's usage error."""

    name = "target"

    def get_metavar(self, param, ctx=None) -> str:
        return "[vllm[==RELEASE]|sglang|llama.cpp|peft]"

    def convert(self, value, param, ctx):
        from lorasurgery.targets import Target, parse_target

        if isinstance(value, Target):
            return value
        try:
            return parse_target(value)
        except LoraSurgeryError as error:
            self.fail(str(error), param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        from lorasurgery.targets import TARGETS

        return [CompletionItem(t) for t in TARGETS if t.startswith(incomplete)]


# lorasurgery.targets' VLLM_NEWEST and VLLM_KNOWN written out, so that --help imports no more (test_verify_releases.py)
TARGET_RELEASES = (
    "vllm means its newest release known (0.32.x); vllm==RELEASE (e.g. vllm==0.31; known: 0.6.4 – 0.32.x) "
    "that release's rules"
)


def config_option(what: str):
    return click.option("--config", "config_file", type=click.Path(), help=what)


def fan_in_fan_out_option(what: str):
    return click.option("--fan-in-fan-out", "fan_in_fan_out", metavar="REGEX", help=what)


def policy_options(command):
    """Exactly one rank policy (--rank, --energy, --ratio, --auto, --budget) and --max-rank."""
    for option in reversed(
        (
            click.option("--rank", type=int, help="Fixed rank (≥ 1) for every module."),
            click.option("--energy", type=float, help="Keep this share of Σσ² per module, in (0, 1]."),
            click.option("--ratio", type=float, help="Keep σᵢ ≥ ratio·σ₁, ratio in (0, 1]."),
            _flag("--auto", help="Gavish–Donoho optimal hard threshold."),
            click.option("--budget", help="Total parameter budget over all modules (e.g. 20M)."),
            click.option("--max-rank", type=int, help="Cap (≥ 1) on every module's rank."),
        )
    ):
        command = option(command)
    return command


def make_policy(rank, energy, ratio, auto, budget, *, optional: bool = False):
    """The Policy the policy options describe, validated by the library (None when none is given
    and that is allowed: combine --exact; the library refuses --exact beside a policy)."""
    from lorasurgery.linalg.policies import Policy
    from lorasurgery.units import parse_count

    if optional and not auto and all(v is None for v in (rank, energy, ratio, budget)):
        return None
    try:
        count = parse_count(budget) if budget is not None else None
    except LoraSurgeryError as error:
        raise click.BadParameter(str(error), param_hint="--budget") from None
    policy = Policy(rank=rank, energy=energy, ratio=ratio, auto=auto, budget=count)
    policy.validate()
    return policy


# --------------------------------------------------------------------------------------------------
# Commands
