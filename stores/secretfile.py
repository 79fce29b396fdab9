"""Secrets an instance generates for itself when none is configured (admin token, cookie key).

Written once with mode 0600 into the state directory and read back on every start, so a single
instance keeps its cookies valid across restarts. A fleet must configure the same values
explicitly (`TURNOUT_COOKIE_SECRET`, `TURNOUT_ADMIN_TOKEN`): a generated one is per machine.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """The secret stored at `path`, creating it (atomically, 0600) when absent."""
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, value.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process won the race: use theirs
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        os.unlink(tmp)
    return value
