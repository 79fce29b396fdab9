"""Flags carried upstream: one request header with the unit's variants (issue #11, 4).

    x-turnout-flags: checkout=beta, dark-mode=on

Format: `key=variant` pairs joined by ", ", in flag-key order. Keys and variant names are
restricted to [A-Za-z0-9._-] by validation (flags/flagmodel.py), so the value needs no
quoting or escaping. A request carries the flags its route asks for (`routes[].flags`) and
those that name the route's release in `upstream:`, in key order. The value is
capped at MAX_FLAGS_HEADER_BYTES: pairs past the cap are left out and
`x-turnout-flags-truncated: 1` says so (backends' header limits are 8-16 KiB in total, nginx's
and Node's defaults). A flag that cannot be evaluated (a split without a unit id) is left out.
Inbound `x-turnout-*` headers never reach the backend (the pipeline's request filter).
"""

from __future__ import annotations

from flags.flageval import CompiledFlag, FlagSet

MAX_FLAGS_HEADER_BYTES = 4096
HEADER_NAME = b"x-turnout-flags"


def flag_header_entries(
    flagset: FlagSet, compiled: tuple[CompiledFlag, ...], unit: str | None, email: str | None
) -> list[bytes]:
    """Header entries in the pipeline's (name, ': ', value, CRLF) form; [] when none apply.
    `compiled`: the matched route's flags (`CompiledRelease.upstream_flags`)."""
    if not compiled:
        return []
    ctx = {"targetingKey": unit, "email": email} if email is not None else {"targetingKey": unit}
    pairs: list[str] = []
    size = 0
    truncated = False
    for flag in compiled:
        result = flag.run(unit, ctx, flagset, 0)
        if result.variant is None or result.error_code is not None:
            continue
        pair = f"{flag.key}={result.variant}"
        size += len(pair) + 2
        if size > MAX_FLAGS_HEADER_BYTES:
            truncated = True
            break
        pairs.append(pair)
    out: list[bytes] = []
    if pairs:
        out += (HEADER_NAME, b": ", ", ".join(pairs).encode("ascii"), b"\r\n")
    if truncated:
        out += (b"x-turnout-flags-truncated", b": ", b"1", b"\r\n")
    return out
