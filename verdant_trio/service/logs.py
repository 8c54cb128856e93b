"""Structured logs on stderr: one line per event, logfmt or JSON, journald-friendly.

Our log calls are written `log.info("library opened library=%s path=%s", ...)`. The formatter reads
the `%`-template instead of the rendered text, so every `key=%s` becomes a real field (values
with spaces stay whole) and the words before the first field become `msg`. Calls without fields
(third-party loggers) keep their text as `msg`.

One event is one line: newlines inside values and tracebacks are escaped. When stderr is the
journal (`$JOURNAL_STREAM` names our stderr), each line starts with a `<N>` syslog priority, which
journald strips and stores, so `journalctl -p warning` works.

Secrets: tokens are never passed to loggers (`TokenInfo.__repr__` hides its token), and as a
safety net every line is scrubbed of registered secrets (the token secret, the admin token) and of
anything shaped like a JWT.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TextIO

LogFormat = Literal["logfmt", "json"]
LOG_FORMATS: Final = ("logfmt", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
REDACTED: Final = "[redacted]"

_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
# a %-conversion, optionally preceded by `key=`; `%%` is a literal percent sign
_SPEC: Final = re.compile(
    r"(?:(?<![^\s(,;])([A-Za-z_][A-Za-z0-9_.]*)=)?"  # `key=`, at the start or after a space
    r"%(?:\(\w+\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]"
)
_LOGFMT_BARE: Final = re.compile(r"^[^\s=\"\\]+$")
_SYSLOG_PRIORITY: Final = {
    logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2,
}  # fmt: skip
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    format: LogFormat = "logfmt"
    timestamps: bool = True
    """journald timestamps lines itself; turn this off there if you prefer shorter lines."""
    access_log: bool = False
    """One line per HTTP request handled by Quart (path without the query string)."""


@dataclass(frozen=True, slots=True)
class _Template:
    text_parts: tuple[str, ...]
    """Literal text around the unkeyed conversions, for `msg`."""
    specs: tuple[tuple[str | None, str], ...]
    """(field name or None, conversion) for each argument, in order."""


@functools.lru_cache(maxsize=1024)
def _parse_template(template: str) -> _Template | None:
    parts: list[str] = []
    specs: list[tuple[str | None, str]] = []
    position = 0
    current = ""
    for match in _SPEC.finditer(template):
        spec = match.group(0)
        key = match.group(1)
        conversion = spec[len(key) + 1 :] if key else spec
        if conversion == "%%":
            current += template[position : match.start()] + ("%" if not key else f"{key}=%")
            position = match.end()
            continue
        if "(" in conversion or "*" in conversion:
            return None  # mapping or star arguments: render the usual way
        current += template[position : match.start()]
        position = match.end()
        if key:
            specs.append((key, conversion))
        else:
            parts.append(current)
            current = ""
            specs.append((None, conversion))
    current += template[position:]
    parts.append(current)
    return _Template(tuple(parts), tuple(specs))


def split_record(record: logging.LogRecord) -> tuple[str, list[tuple[str, str]]]:
    """The event's message text and its `key=value` fields."""
    fields: list[tuple[str, str]] = []
    template = record.msg if isinstance(record.msg, str) else None
    args = record.args
    parsed = _parse_template(template) if template is not None else None
    if parsed is not None and isinstance(args, tuple) and args and len(args) == len(parsed.specs):
        try:
            texts: list[str] = []
            for (key, conversion), arg in zip(parsed.specs, args, strict=True):
                value = conversion % (arg,)
                if key is None:
                    texts.append(value)
                else:
                    fields.append((key, value))
            message = parsed.text_parts[0]
            for text, part in zip(texts, parsed.text_parts[1:], strict=True):
                message += text + part
            return " ".join(message.split()), fields
        except (TypeError, ValueError):
            fields = []
    try:
        return record.getMessage(), fields
    except (TypeError, ValueError):  # a broken log call must not lose the event
        return f"{record.msg} (bad log arguments: {record.args!r})", fields


def _logfmt_value(value: str) -> str:
    if value and _LOGFMT_BARE.match(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def journal_is_stderr(stream: TextIO | None = None) -> bool:
    """True when stderr is connected to journald (systemd sets `$JOURNAL_STREAM=dev:inode`)."""
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        fd = (stream or sys.stderr).fileno()
        st = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class StructuredFormatter(logging.Formatter):
    """Formats a record as one logfmt or JSON line; see the module docstring."""

    def __init__(
        self,
        fmt: LogFormat = "logfmt",
        *,
        timestamps: bool = True,
        syslog_prefix: bool = False,
        secrets: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.fmt: LogFormat = fmt
        self.timestamps = timestamps
        self.syslog_prefix = syslog_prefix
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        message, fields = split_record(record)
        items: list[tuple[str, Any]] = []
        if self.timestamps:
            items.append(("ts", self._timestamp(record.created)))
        items.append(("level", record.levelname.lower()))
        items.append(("logger", record.name))
        items.append(("msg", message))
        items.extend(fields)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                items.append((key, value if isinstance(value, (int, float, bool)) else str(value)))
        if record.exc_info:
            items.append(("exc", self.formatException(record.exc_info)))
        elif record.exc_text:
            items.append(("exc", record.exc_text))
        if record.stack_info:
            items.append(("stack", record.stack_info))
        if self.fmt == "json":
            line = json.dumps(dict(items), ensure_ascii=False, default=str)
        else:
            line = " ".join(f"{key}={_logfmt_value(str(value))}" for key, value in items)
        line = self.redact(line)
        if self.syslog_prefix:
            line = f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
            # a secret with quotes or backslashes appears escaped in a quoted value
            escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
            if escaped != secret:
                text = text.replace(escaped, REDACTED)
        return _JWT.sub(REDACTED, text)

    @staticmethod
    def _timestamp(created: float) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        return f"{seconds}.{int(created % 1 * 1000):03d}Z"


_handler: logging.Handler | None = None


def configure(
    settings: LogSettings, *, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Install (or reconfigure, on SIGHUP) the one stderr handler on the root logger."""
    global _handler
    root = logging.getLogger()
    stream = stream or sys.stderr
    formatter = StructuredFormatter(
        settings.format,
        timestamps=settings.timestamps,
        syslog_prefix=journal_is_stderr(stream),
        secrets=secrets,
    )
    if _handler is None or getattr(_handler, "stream", None) is not stream:
        if _handler is not None:
            root.removeHandler(_handler)
        for existing in list(root.handlers):
            root.removeHandler(existing)  # basicConfig or a previous configuration
        _handler = logging.StreamHandler(stream)
        root.addHandler(_handler)
    _handler.setFormatter(formatter)
    root.setLevel(level_number(settings.level))
    # httpx says INFO for every request it makes (profile lookups, each file a move copies):
    # what they did is logged by our own lines; its own lines only at DEBUG
    logging.getLogger("httpx").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    )


def level_number(name: str) -> int:
    value = logging.getLevelName(name.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {name!r}")
    return value
