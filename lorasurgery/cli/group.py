"""The click group every command hangs on, and the one place that maps errors to `Error: …`.

Library errors print `Error: …` on stderr with exit code 1 (130 for an interrupt); click's own usage
errors, and the library's OptionError, exit with 2. `--debug` shows the traceback instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from lorasurgery.errors import LoraSurgeryError, OptionError


@dataclass
class Settings:
    quiet: bool = False
    debug: bool = False


class LoraSurgeryGroup(click.Group):
    """A click group that maps library errors to `Error: …` and exit code 1, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OptionError as error:
            raise click.UsageError(str(error)) from None
        except (LoraSurgeryError, OSError, KeyboardInterrupt) as error:
            settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
            if settings.debug:
                raise
            click.echo(f"Error: {describe_error(error)}", err=True)
            ctx.exit(130 if isinstance(error, KeyboardInterrupt) else 1)


def describe_error(error: BaseException) -> str:
    kept = getattr(error, "kept_work", None)  # --resume keeps an unfinished output (io/output.py)
    if isinstance(error, KeyboardInterrupt):
        if kept is not None:
            return f"interrupted; the unfinished output is kept in {kept}: run again with --resume to continue it"
        return "interrupted; nothing was written"
    if isinstance(error, OSError) and not isinstance(error, LoraSurgeryError):
        where = f": {error.filename}" if error.filename else ""
        message = f"{error.strerror or error}{where}"
    else:
        message = str(error)
    if kept is not None and kept.name not in message:
        message += f" (the unfinished output stays in {kept} for --resume)"
    return message


def settings_of(ctx: click.Context) -> Settings:
    return ctx.find_object(Settings) or Settings()
