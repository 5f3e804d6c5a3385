"""Tokens never leave in clear: one redact() used by logs, status, CLI errors and the web UI.

The secrets known to a process are the hub / W&B tokens in its environment (HF_TOKEN,
WANDB_API_KEY, ...) plus every value passed to register() (a --token flag, a YAML `hub.token`,
the web form's token box). redact() replaces each of them with *** wherever a text is about to be
written or shown. config.yaml never holds them in the first place (config_io drops secret fields);
this is the net under everything else: error messages, tracebacks, library log lines.
"""
from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any, Iterable

MASK = "***"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN", "WANDB_API_KEY")
MIN_LEN = 6  # shorter values would mask ordinary words; real tokens are 20+ characters

_registered: set[str] = set()
_lock = threading.Lock()


def _value(secret: Any) -> str:
    if hasattr(secret, "get_secret_value"):
        secret = secret.get_secret_value()
    return secret if isinstance(secret, str) else ""


def register(*secrets: Any) -> None:
    """Remember values (str or pydantic SecretStr; None is ignored) to redact from now on."""
    with _lock:
        for s in secrets:
            v = _value(s).strip()
            if len(v) >= MIN_LEN:
                _registered.add(v)


def known() -> list[str]:
    """Every secret to hide, longest first (so a token containing another is masked whole)."""
    env = {os.environ.get(k, "").strip() for k in SECRET_ENV}
    with _lock:
        values = {v for v in _registered | env if len(v) >= MIN_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: Any, extra: Iterable[Any] = ()) -> Any:
    """text with every known secret (and those in extra) replaced by ***; non-strings pass through."""
    if not isinstance(text, str) or not text:
        return text
    secrets = known()
    secrets += sorted((v for v in map(_value, extra) if len(v) >= MIN_LEN), key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat mapping with its string values redacted (status.json, jsonl records)."""
    return {k: redact(v) for k, v in fields.items()}


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactingStream(io.TextIOBase):
    """A text stream wrapper that redacts what is written (the run's stdout/stderr -> console.log)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(redact(s))
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
