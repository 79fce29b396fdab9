"""Rate limits as the versioned document declares them (issue #12 point 5).

A limit is named, counts one kind of key, and allows `requests` per `per_s` seconds with a
burst of `burst` requests (GCRA, edge/ratelimit.py). Its name is the policy identifier of the
IETF `RateLimit-Policy` field (draft-ietf-httpapi-ratelimit-headers-10 §3), so it follows the
document's name rule.

Keys:
* `unit`   the unit id the edge identified (header or signed cookie),
* `client` the client address after the configured trusted hops,
* `route`  one bucket per matched route (host + path prefix), shared by all its users,
* `arm`    one bucket per release arm (release + stable/canary).

Rules of this file: pure data and validation; errors are `ConfigError`s naming the dotted field.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flags.errors import ConfigError

KEY_UNIT = "unit"
KEY_CLIENT = "client"
KEY_ROUTE = "route"
KEY_ARM = "arm"
MAX_RATE_LIMITS = 32
MAX_WINDOW_S = 86_400
MAX_REQUESTS = 10_000_000

RateKey = Literal["unit", "client", "route", "arm"]


class RateLimit(BaseModel):
    """`requests` per `per_s` seconds per key, bursts up to `burst` (default: `requests`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    key: RateKey
    requests: int = Field(ge=1, le=MAX_REQUESTS)
    # Whole seconds: the draft's `w` parameter is an Integer (draft-10 §3.1).
    per_s: int = Field(ge=1, le=MAX_WINDOW_S)
    burst: int | None = Field(default=None, ge=1, le=MAX_REQUESTS)
    # Empty: every release. Otherwise only requests routed to one of these releases.
    releases: tuple[str, ...] = Field(default=(), max_length=256)
    # The internal cohort (DESIGN.md §3) is not limited by default: it is the people testing
    # the canary, and a limit that locks them out hides the canary's problems.
    exempt_internal: bool = True

    @property
    def burst_requests(self) -> int:
        return self.burst if self.burst is not None else self.requests


def check_rate_limits(
    limits: Mapping[str, RateLimit], releases: Collection[str], name_rule: re.Pattern[str]
) -> None:
    """Cross-field checks: names, the release filter, the window's resolution.

    `name_rule` is the document's name pattern, passed in so both files share one rule
    without an import cycle.
    """
    if len(limits) > MAX_RATE_LIMITS:
        raise ConfigError("rate_limits", f"at most {MAX_RATE_LIMITS} limits")
    for name, limit in limits.items():
        where = f"rate_limits.{name}"
        if not name_rule.match(name):
            raise ConfigError(where, "limit names are 1-64 of a-z 0-9 _ . - (lower case)")
        for i, release in enumerate(limit.releases):
            if release not in releases:
                raise ConfigError(f"{where}.releases.{i}", f"unknown release {release!r}")
        # An emission interval below a microsecond is beyond what the clock can tell apart.
        if limit.per_s / limit.requests < 1e-6:
            raise ConfigError(f"{where}.requests", "more than 1,000,000 requests per second")
