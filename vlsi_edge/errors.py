"""User-facing errors: one line that says what was found, what was expected, and what to run next.

The CLI catches `UserError` and prints `vlsi-edge: error: <message>` with exit code 2 and no traceback; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user handed us (a flag, a file, a model); printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = " ".join(str(message).split())  # always one line
        if hint:
            message = f"{message} — {' '.join(hint.split())}"
        super().__init__(message)


class DataError(UserError):
    """A dataset, sample or image that cannot be used."""


class ModelError(UserError):
    """A model name, preset or checkpoint directory that cannot be used."""


class ConfigError(UserError):
    """An invalid configuration; collects every problem into one line."""

    def __init__(self, problems: list[str] | str, hint: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), hint)
