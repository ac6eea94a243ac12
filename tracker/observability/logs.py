"""Logging: one JSON object per line (or readable lines on a terminal), secrets masked.

Context travels as `extra={...}` fields on a record (`trace_id`, `task_id`,
`delivery_id`, `service`, ...) and becomes keys of the JSON line. A filter masks
anything shaped like an API key, a webhook secret or a bearer token, the
configured upstream token itself and every client's token a process decrypts
(`register_secret`), so no secret reaches a log by accident.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

from tracker.config import Settings

# Attributes every LogRecord has; anything else on a record is context from `extra=`.
# (uvicorn adds `color_message`, the message with terminal colours: not context.)
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}
)
_SECRET_PATTERNS = re.compile(
    r"(trk_[A-Za-z0-9_\-]{8,}|whsec_[A-Za-z0-9+/=]{8,}|(?i:bearer)\s+[A-Za-z0-9._\-+/=]{6,})"
)
MASK = "[redacted]"
SHORTEST_MASKED = 6

# Secrets known only at run time (clients' upstream tokens, once decrypted): masked too.
_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(secret: str) -> None:
    """Mask `secret` in every log line of this process from now on."""
    if len(secret) >= SHORTEST_MASKED:
        with _registered_lock:
            _registered.add(secret)


class SecretMask(logging.Filter):
    """Masks secrets in the message and its arguments, whatever the handler."""

    def __init__(self, literals: list[str] | None = None) -> None:
        super().__init__()
        self._literals = [s for s in (literals or []) if len(s) >= SHORTEST_MASKED]

    def mask(self, text: str) -> str:
        with _registered_lock:
            registered = list(_registered)
        for literal in [*self._literals, *registered]:
            text = text.replace(literal, MASK)
        return _SECRET_PATTERNS.sub(MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, self.mask(value))
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...context}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO  tracker.polling  message  key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        )
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        text = f"{stamp} {record.levelname:<7} {record.name:<18} {record.getMessage()}"
        if context:
            text += f"  {context}"
        if record.exc_text:
            text += "\n" + record.exc_text
        return text


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Route every logger (ours, Celery's, uvicorn's) through one masked handler."""
    stream = stream or sys.stderr
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    token = settings.upstream_bearer
    handler.addFilter(SecretMask([token] if token else []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
