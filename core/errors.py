"""Errors a user can fix. The CLI prints them as one paragraph and exits 2; no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A bad parameter, YAML key or combination of parameters."""


class ModelNotFoundError(UserError):
    """A model id that resolves nowhere (local dir, HF cache, packaged copies)."""


class DataError(UserError):
    """A malformed dataset file or record.

    Always names the file, and when known the 1-based record number, the field and what was
    expected, so the user can open the file and fix the line.
    """

    def __init__(self, file: str, message: str, *, record: int | None = None,
                 field: str | None = None, expected: str | None = None, fix: str | None = None):
        self.file, self.record, self.field, self.expected, self.fix = file, record, field, expected, fix
        where = str(file)
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        text = f"{where}: {message}"
        if expected:
            text += f" (expected {expected})"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)
