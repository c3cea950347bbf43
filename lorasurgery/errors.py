"""Errors the library raises for bad input or failed checks.

Every user-facing failure is a LoraSurgeryError whose str() is a complete sentence naming the file
and, where there is one, the module. The CLI prints it as `Error: <message>` with exit code 1.
Anything else escaping the core is a bug and keeps its traceback under --debug.
"""


class LoraSurgeryError(Exception):
    """Base class: bad input, unsupported feature, or a failed check."""


class OptionError(LoraSurgeryError):
    """Options that contradict each other or the inputs' count; the CLI exits with 2, like click."""


class CheckpointError(LoraSurgeryError):
    """A checkpoint file or folder is missing, malformed, or unsafe to read."""


class AdapterError(LoraSurgeryError):
    """An adapter folder is missing, malformed, or inconsistent with its config."""


class UnsupportedError(LoraSurgeryError):
    """A valid input uses a feature lorasurgery refuses rather than handle wrongly."""


class MismatchError(LoraSurgeryError):
    """Adapter and base (or base and fine-tune) do not fit: missing modules or shapes."""


class NonFiniteError(LoraSurgeryError):
    """NaN or Inf in an input or a result (allowed with --allow-nonfinite)."""


class OutputError(LoraSurgeryError):
    """The output path is unusable: it exists, lies inside an input, or writing failed."""


class VerificationError(LoraSurgeryError):
    """A post-merge check (--verify) failed."""
