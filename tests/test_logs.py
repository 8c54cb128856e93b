"""Structured log lines: fields from the %-templates, one line per event, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator

import pytest

from verdant_trio.service import logs
from verdant_trio.service.logs import (
    LogSettings,
    StructuredFormatter,
    journal_is_stderr,
    split_record,
)


def record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("verdant_trio.test", level, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_fields_come_from_the_template_so_values_keep_their_spaces() -> None:
    message, fields = split_record(record(
        "closing slow consumer: outbound queue full library=%s user=%s replica=%s queue=%d",
        "shared list", "bob", None, 1024,
    ))  # fmt: skip
    assert message == "closing slow consumer: outbound queue full"
    assert fields == [("library", "shared list"), ("user", "bob"), ("replica", "None"), ("queue", "1024")]
    message, fields = split_record(record("compacted library=%s duration_ms=%.1f", "l", 1.25))
    assert (message, fields) == ("compacted", [("library", "l"), ("duration_ms", "1.2")])


def test_messages_without_fields_and_odd_templates_keep_their_text() -> None:
    assert split_record(record("Running on %s (CTRL + C to quit)", "http://x")) == (
        "Running on http://x (CTRL + C to quit)", [],
    )
    assert split_record(record("100%% done")) == ("100%% done", [])  # no args: as logging does
    assert split_record(record("100%% of library=%s", "x")) == ("100% of", [("library", "x")])
    assert split_record(record("%(name)s here", {"name": "x"})) == ("x here", [])
    assert split_record(record("count=%d", "not a number"))[0].startswith("count=")  # no crash
    assert split_record(record("plain")) == ("plain", [])


def test_logfmt_and_json_lines() -> None:
    r = record("library opened library=%s path=%s", "my lib", "/var/lib/x.sqlite", request_id="r1")
    line = StructuredFormatter("logfmt", timestamps=False).format(r)
    assert line == (
        'level=info logger=verdant_trio.test msg="library opened" library="my lib" '
        "path=/var/lib/x.sqlite request_id=r1"
    )
    data = json.loads(StructuredFormatter("json").format(r))
    assert data["msg"] == "library opened" and data["library"] == "my lib"
    assert data["ts"].endswith("Z") and data["level"] == "info"


def test_one_line_per_event_even_with_a_traceback() -> None:
    try:
        raise RuntimeError("bad\nthing")
    except RuntimeError:
        r = record("batch failed library=%s", "x", level=logging.ERROR)
        r.exc_info = sys.exc_info()
    for fmt in ("logfmt", "json"):
        line = StructuredFormatter(fmt).format(r)  # type: ignore[arg-type]
        assert "\n" not in line
        assert "RuntimeError: bad" in line


def test_secrets_and_tokens_are_scrubbed() -> None:
    formatter = StructuredFormatter("logfmt", secrets=["s3cret-signing-key", 'quo"ted-secret'])
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
    line = formatter.format(record(
        "oops secret=%s header=%s token=%s", "s3cret-signing-key", 'x quo"ted-secret', jwt,
    ))  # fmt: skip
    assert "s3cret" not in line and "quo" not in line and "eyJ" not in line
    assert line.count(logs.REDACTED) == 3


def test_journald_gets_syslog_priorities(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    formatter = StructuredFormatter("logfmt", timestamps=False, syslog_prefix=True)
    assert formatter.format(record("x", level=logging.ERROR)).startswith("<3>level=error")
    assert formatter.format(record("x", level=logging.WARNING)).startswith("<4>")
    stream = open(os.devnull, "w")  # noqa: SIM115
    try:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_is_stderr(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert not journal_is_stderr(stream)
    finally:
        stream.close()


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logs._handler = None


def test_configure_then_reconfigure_in_place(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure(LogSettings(level="warning", timestamps=False), stream=stream)
    log = logging.getLogger("verdant_trio.somewhere")
    log.info("hidden library=%s", "a")
    log.warning("shown library=%s", "a")
    logs.configure(LogSettings(level="debug", format="json"), secrets=["hunter2-secret"], stream=stream)
    log.debug("now json user=%s", "hunter2-secret")
    lines = stream.getvalue().splitlines()
    assert lines[0] == 'level=warning logger=verdant_trio.somewhere msg=shown library=a'
    assert json.loads(lines[1])["user"] == logs.REDACTED
    assert len(lines) == 2 and len(root_logger.handlers) == 1
