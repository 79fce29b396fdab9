"""`Location` / `Content-Location` that point at an upstream, made client-facing (issue #12
point 6; nginx `proxy_redirect default`).

An upstream that redirects to its own absolute URL (`http://10.0.0.5:8080/login`) would leak
its address and send the client where it cannot go. nginx replaces the upstream's URL with the
proxy's; we go one step further and make the reference relative (`/login`): RFC 9110 §10.2.2
and §8.7 let both fields be relative references, resolved by the client against the URI it
asked for, which is the client-facing origin by definition. So the rewrite needs no Host
header, cannot reflect a spoofed one, and is right behind any number of outer proxies.

Only references to one of the answering arm's upstream origins are rewritten (scheme, host
and port compared case-insensitively, default ports implied); any other URL is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from edge.upstream import UpstreamPool

LOCATION_FIELDS = frozenset({b"location", b"content-location"})


def upstream_origins(pools: Iterable[UpstreamPool]) -> tuple[bytes, ...]:
    """The lower-case origins (`scheme://host[:port]`) an arm's upstreams are reached at, each
    with and without its default port."""
    out: list[bytes] = []
    for pool in pools:
        scheme = "https" if pool.ssl is not None else "http"
        default = 443 if pool.ssl is not None else 80
        host = pool.host.lower()
        if ":" in host:  # an IPv6 literal (RFC 3986 §3.2.2)
            host = f"[{host}]"
        out.append(f"{scheme}://{host}:{pool.port}".encode("ascii"))
        if pool.port == default:
            out.append(f"{scheme}://{host}".encode("ascii"))
    return tuple(out)


def relative_location(value: bytes, origins: tuple[bytes, ...]) -> bytes:
    """`value` without its upstream origin (a path-absolute reference), else unchanged."""
    lowered = value[:300].lower()
    for origin in origins:
        if lowered.startswith(origin):
            rest = value[len(origin) :]
            if not rest:
                return b"/"
            if rest.startswith(b"//"):
                # "//evil.example/" alone would be a network-path reference (RFC 3986 §4.2):
                # an open redirect. "/.//evil.example/" stays a path on the client's origin.
                return b"/." + rest
            if rest[:1] == b"/":
                return rest
            if rest[:1] in (b"?", b"#"):
                return b"/" + rest
    return value
