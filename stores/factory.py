"""Pick a `Store` from one setting: a directory (or `file://` URL) or a Redis URL.

`stores.redisstore` is imported only when a Redis URL is given, so an edge running on the
embedded file store never imports `redis` (DESIGN.md §1 rule 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from flags.store import Store
from stores.filestore import FileStore

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "unix")


def make_store(
    url_or_path: str,
    *,
    poll_interval_s: float,
    redis_options: Mapping[str, Any] | None = None,
) -> Store:
    """`FileStore` for a path or `file://…`, `RedisStore` for `redis://`, `rediss://`,
    `unix://` and `redis+sentinel://` URLs. `redis_options` are `RedisStore.from_url`
    keywords (key_prefix, timeouts, wait_replicas, wait_timeout_ms)."""
    scheme = urlsplit(url_or_path).scheme.lower()
    if scheme in REDIS_SCHEMES:
        from stores.redisstore import RedisStore

        return RedisStore.from_url(url_or_path, **dict(redis_options or {}))
    if scheme == "file":
        return FileStore(unquote(urlsplit(url_or_path).path), poll_interval_s=poll_interval_s)
    return FileStore(url_or_path, poll_interval_s=poll_interval_s)
