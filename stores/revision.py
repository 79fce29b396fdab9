"""How a revision is written to a store and read back: one JSON object (metadata and the
document, keys sorted so equal documents give equal bytes) and its SHA-256.

Every store and the watcher's bootstrap copy use these, so a revision read from any of them is
validated the same way (DESIGN.md §4: an invalid stored revision is rejected whole).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from flags.document import load_document
from flags.errors import ConfigError
from flags.store import Revision, VersionInfo


def checksum(data: bytes) -> str:
    """SHA-256 of a stored revision's bytes, kept beside it to detect corruption."""
    return hashlib.sha256(data).hexdigest()


def encode_revision(revision: Revision) -> bytes:
    payload = {
        "info": revision.info.to_dict(),
        "document": revision.document.model_dump(mode="json"),
    }
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def decode_revision(data: bytes) -> Revision:
    """Parse a stored revision; `ConfigError` when its document is invalid."""
    try:
        raw: Any = orjson.loads(data)
        info = VersionInfo.from_dict(raw["info"])
        document_raw = raw["document"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError("document", f"unreadable stored revision: {exc}") from None
    document = load_document(document_raw)
    if document.version != info.version:
        raise ConfigError("version", "document version differs from its metadata")
    return Revision(document=document, info=info)
