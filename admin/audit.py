"""The audit trail: one structured line per write attempt, allowed or not (HARDENING.md §5).

Lines go to the `turnout.audit` logger as JSON (a sink independent of the config store). Every
string that came from a client is escaped first: control characters (C0, DEL, C1) and Unicode
line/paragraph separators become `\\xNN` / `\\uNNNN`, so no input can forge a second line
(the CVE-2020-7694 lesson). The record also rides on the log record as `extra["audit"]` for
handlers that want the fields rather than the text.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import orjson

audit_log = logging.getLogger("turnout.audit")

MAX_FIELD_CHARS = 500

RESULT_OK = "ok"
RESULT_DENIED = "denied"  # authentication failed
RESULT_REFUSED = "refused"  # the request was wrong (4xx)
RESULT_FAILED = "failed"  # the store failed (5xx): nothing was confirmed
RESULT_ERROR = "error"  # a bug: an unexpected exception


def escape(text: str) -> str:
    """`text` with every non-printable character spelled out, capped in length."""
    out: list[str] = []
    for char in text[:MAX_FIELD_CHARS]:
        code = ord(char)
        if char.isprintable():  # False for C0/C1 controls, DEL, U+2028/2029, format chars
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    if len(text) > MAX_FIELD_CHARS:
        out.append("...")
    return "".join(out)


@dataclass(slots=True)
class AuditEvent:
    """One write attempt; filled in as the request goes through the write pipeline."""

    actor: str
    action: str
    target: str
    client: str = ""
    request_id: str = ""
    authenticated: bool = False
    before_version: int | None = None
    after_version: int | None = None
    result: str = RESULT_ERROR
    status: int = 500
    reason: str = ""
    detail: str = ""

    def record(self) -> dict[str, object]:
        return {
            key: escape(value) if isinstance(value, str) else value
            for key, value in asdict(self).items()
        }

    def emit(self) -> None:
        record = self.record()
        level = logging.INFO if self.result == RESULT_OK else logging.WARNING
        audit_log.log(level, "%s", orjson.dumps(record).decode(), extra={"audit": record})
