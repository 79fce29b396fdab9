"""Logs in the format the settings ask for (issue #13): human lines with a timestamp, audit
records as sentences, or one JSON object per line that keeps the audit record's fields."""

from __future__ import annotations

import json
import logging

from admin.audit import AuditEvent
from turnout.startup import HumanFormatter, JsonFormatter


def _audit_record() -> logging.LogRecord:
    event = AuditEvent(actor="ops", action="release.stage", target="web", client="127.0.0.1")
    event.result, event.status, event.before_version, event.after_version = "ok", 200, 4, 5
    return _with_audit(event.record())


def _with_audit(audit: dict[str, object]) -> logging.LogRecord:
    record = logging.LogRecord(
        "turnout.audit", logging.INFO, __file__, 1, "%s", (json.dumps(audit),), None
    )
    record.audit = audit
    return record


def test_json_format_is_one_object_per_line() -> None:
    """`log_format: json`: a plain line is an object with time, level, logger and message."""
    record = logging.LogRecord("turnout.watch", logging.INFO, __file__, 1, "version %d", (7,), None)
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert (data["level"], data["logger"], data["message"]) == (
        "info",
        "turnout.watch",
        "version 7",
    )
    assert data["time"].endswith("Z")
    assert "\n" not in line


def test_json_format_keeps_audit_fields() -> None:
    """An audit line in JSON mode carries the record's fields, not a JSON string in a string."""
    data = json.loads(JsonFormatter().format(_audit_record()))
    assert data["audit"]["action"] == "release.stage"
    assert data["audit"]["after_version"] == 5


def test_human_format_reads_an_audit_record_as_a_sentence() -> None:
    """In the human format an audit record says who did what, the result and the versions,
    after a timestamp and the level."""
    line = HumanFormatter().format(_audit_record())
    assert " INFO turnout.audit: ok release.stage web by ops from 127.0.0.1 " in line
    assert "[HTTP 200, version 4 -> 5]" in line
    assert line[:4].isdigit()  # starts with the time
