"""The edge's listening socket, bound before the event loop serves it.

With `workers: N` every worker process binds its own socket to the same address with
`SO_REUSEPORT` (Linux >= 3.9): the kernel hashes each new connection to one of the sockets in
the group, so there is no shared accept queue to fight over (no thundering herd) and no
accept mutex, unlike one socket inherited by N processes (nginx's `reuseport` option makes
the same choice). A socket bound with `SO_REUSEPORT` can only share its port with sockets of
the same user that also set it.
"""

from __future__ import annotations

import socket

DEFAULT_BACKLOG = 4096


def bind_listener(
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    listen: bool = True,
    backlog: int = DEFAULT_BACKLOG,
) -> socket.socket:
    """A non-blocking TCP socket bound to (host, port); `OSError` naming the address when it
    cannot bind. `listen=False` leaves listen() to the event loop's `create_server(sock=)`:
    a worker binds first (a taken port fails fast) but joins the SO_REUSEPORT group only once
    it can serve, so the kernel never queues connections for a worker still starting."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT that never listens: it holds the port
    for the group (port 0 is resolved to a free one) while the listening sockets of workers
    come and go; the kernel hands connections only to listening sockets."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
