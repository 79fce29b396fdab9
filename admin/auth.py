"""Who may write: one bearer token, compared in constant time (HARDENING.md §5).

Rules of this file:
* The token is kept only as its SHA-256 digest; a presented token is hashed and the two
  equal-length digests are compared with `hmac.compare_digest`, so neither the token's length
  nor a common prefix leaks through timing.
* Tokens travel only in `Authorization: Bearer` (RFC 6750 §2.1), never in a URL: access logs
  print paths and queries.
* Without a configured token the instance generates one in `<state_dir>/admin-token` (0600),
  which the CLI on the same machine reads. A non-loopback listener needs a configured token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from flags.errors import ConfigError
from stores.secretfile import read_or_create_secret
from stores.settings import Settings

TOKEN_FILE_NAME = "admin-token"  # noqa: S105 - a file name, not a secret
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 256 bits, above the 128-bit floor of §5
DEFAULT_ACTOR = "token"
ACTOR_HEADER = "x-turnout-actor"
MAX_ACTOR_CHARS = 64
_ACTOR_UNSAFE = re.compile(r"[^A-Za-z0-9._@+\-]")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def token_file(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / TOKEN_FILE_NAME


def resolve_admin_token(settings: Settings) -> str:
    """The configured admin token, else the one in `<state_dir>/admin-token` (created with a
    fresh random token, mode 0600, when missing)."""
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value().strip()
        if not token:
            raise ConfigError("admin_token", "must not be empty")
        return token
    path = token_file(settings.state_dir)
    try:
        return read_or_create_secret(path, TOKEN_BYTES)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("admin_token", f"cannot read or create {path}: {exc}") from None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class BearerAuth:
    """Checks `Authorization: Bearer <token>` against one token's digest."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("admin_token", "must not be empty")
        self._digest = _digest(token)

    def check(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = credentials.strip()
        with contextlib.suppress(UnicodeEncodeError):
            return hmac.compare_digest(_digest(presented), self._digest)
        return False


def actor_from(headers: Mapping[str, str]) -> str:
    """The audit name of the writer: `X-Turnout-Actor` reduced to a safe alphabet, else
    "token". Only a label (the token is what authorises); it cannot inject log lines."""
    claimed = _ACTOR_UNSAFE.sub("", headers.get(ACTOR_HEADER, ""))[:MAX_ACTOR_CHARS]
    return claimed or DEFAULT_ACTOR


OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
_READ_METHODS = frozenset({"GET", "HEAD"})
_READ_DENIED = orjson.dumps({"error": "a valid 'Authorization: Bearer <token>' is required"})


class ReadGuard:
    """ASGI middleware: reads need the bearer token too when the admin listener is not on
    loopback, since they show internal unit ids and backend addresses (issue #13). `/healthz`
    and `/readyz` stay open for probes and load balancers, `/metrics` too unless
    `metrics_open` is off (then it needs the token everywhere). Writes are checked (and
    audited) by the write pipeline itself, so only GET and HEAD are looked at here."""

    def __init__(self, app: Any, auth: BearerAuth, *, reads_open: bool, metrics_open: bool):
        self.app = app
        self.auth = auth
        self.reads_open = reads_open
        self.metrics_open = metrics_open

    def _needs_token(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return False
        if path == METRICS_PATH:
            return not self.metrics_open
        return not self.reads_open

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in _READ_METHODS
            and self._needs_token(scope["path"])
        ):
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
            if not self.auth.check(authorization):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(_READ_DENIED)),
                            (b"www-authenticate", b'Bearer realm="turnout-admin"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _READ_DENIED})
                return
        await self.app(scope, receive, send)
