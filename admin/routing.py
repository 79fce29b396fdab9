"""One route per path, with a handler per method: wrong methods get 405 and an `Allow`
header listing every method of the path (a GET never reaches a mutation, HARDENING.md §5)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Handler = Callable[[Request], Awaitable[Response]]


def route(path: str, handlers: dict[str, Handler]) -> Route:
    """A `Route` dispatching on the method; HEAD is served by the GET handler."""
    table = dict(handlers)
    if "GET" in table:
        table.setdefault("HEAD", table["GET"])

    async def endpoint(request: Request) -> Response:
        return await table[request.method](request)

    return Route(path, endpoint, methods=list(table))
