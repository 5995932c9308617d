"""lorakit's exception types.

Every error a user can act on is a :class:`LorakitError`. Its message is one line that says what is
wrong, what was found and how to fix it. The CLI prints it as ``error: <message>`` and exits with
code 2; library users catch the subclasses.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error caused by user input (config, data, model, adapter, paths)."""

    exit_code = 2


class ConfigError(LorakitError):
    """The run configuration is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        # One line per problem whatever the source (YAML parser messages span lines).
        self.problems = [" ".join(str(p).split()) for p in problems]
        self.source = source
        where = f" in {source}" if source else ""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}"
        super().__init__(f"{head}: " + "; ".join(self.problems))


class DataError(LorakitError):
    """The data cannot be read or does not fit the task (missing column, unknown label, ...)."""


class ModelError(LorakitError):
    """The base model cannot be loaded or does not fit the LoRA settings (e.g. a wrong target module)."""


class AdapterError(LorakitError):
    """An adapter directory is missing, incomplete or does not match the base model."""


class RunDirError(LorakitError):
    """The output/run directory cannot be used (exists without --overwrite, not writable, ...)."""


class DiskFullError(LorakitError):
    """The disk (or quota) filled up while an artifact was written; what was there before is intact."""
