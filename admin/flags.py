"""Flags for product managers: list, read, create/replace, delete, toggle, kill, percentage,
weights, rules, individual targets, explain; the global kill switch; OFREP API keys.

Every change goes through `admin.writes.perform_write` (auth, If-Match, audit, a new version)
and is one pure edit of flags/flagchanges.py. Reads are open like the rest of the API.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from admin.context import AdminContext
from admin.inputs import check_fields
from admin.responses import ApiError, json_response, versioned_response
from admin.routing import route
from admin.writes import perform_write
from flags import flagchanges
from flags.document import Document
from flags.flageval import explain_flag
from flags.flagmodel import hash_key

MAX_EXPLAIN_ATTRIBUTES = 32
MAX_EXPLAIN_VALUE_CHARS = 320
API_KEY_BYTES = 24  # 192 random bits, URL-safe text


def flag_view(doc: Document, key: str) -> dict[str, Any]:
    return {"key": key, **doc.flags[key].model_dump(mode="json")}


def require_flag(doc: Document, key: str) -> None:
    if key not in doc.flags:
        raise ApiError(404, f"unknown flag {key!r}", field="flag")


def routes(ctx: AdminContext) -> list[Route]:
    def write(action: str, fields: tuple[str, ...], change: Any) -> Any:
        """A POST handler: check the body's fields, then one pure edit of the named flag."""

        async def handler(request: Request) -> Response:
            key = request.path_params.get("key", "")

            async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
                if key:
                    require_flag(doc, key)
                check_fields(body, fields)
                result: tuple[Document, str] = change(doc, key, body)
                return result

            return await perform_write(ctx, request, action=action, target=key or "*", edit=edit)

        return handler

    async def list_flags(request: Request) -> Response:
        doc = await ctx.latest_document()
        views = [flag_view(doc, key) for key in sorted(doc.flags)]
        return versioned_response(
            {"version": doc.version, "flags_killed": doc.flags_killed, "flags": views},
            doc.version,
        )

    async def get_flag(request: Request) -> Response:
        key = request.path_params["key"]
        doc = await ctx.latest_document()
        require_flag(doc, key)
        return versioned_response(
            {"version": doc.version, "flag": flag_view(doc, key)}, doc.version
        )

    async def put(request: Request) -> Response:
        key = request.path_params["key"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            return flagchanges.put_flag(doc, key, body)

        return await perform_write(ctx, request, action="flag.put", target=key, edit=edit)

    async def delete(request: Request) -> Response:
        key = request.path_params["key"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            require_flag(doc, key)
            return flagchanges.delete_flag(doc, key)

        return await perform_write(
            ctx, request, action="flag.delete", target=key, edit=edit, body_required=False
        )

    async def explain(request: Request) -> Response:
        """Which rule, position, cohort and variant a unit gets, over the served snapshot."""
        key = request.path_params["key"]
        params = dict(request.query_params)
        if len(params) > MAX_EXPLAIN_ATTRIBUTES:
            raise ApiError(422, f"at most {MAX_EXPLAIN_ATTRIBUTES} attributes", field="query")
        context: dict[str, Any] = {}
        for name, value in params.items():
            if len(value) > MAX_EXPLAIN_VALUE_CHARS:
                raise ApiError(422, "value too long", field=name)
            context["targetingKey" if name == "unit_id" else name] = value
        flagset = ctx.watcher.snapshot.flags
        if flagset is None or key not in flagset.flags:
            raise ApiError(404, f"flag {key!r} is not in the served configuration", field="flag")
        return json_response({**explain_flag(flagset, key, context), "stale": ctx.watcher.stale})

    async def create_api_key(request: Request) -> Response:
        """A new key for an application: the secret is in this answer only; the document keeps
        its SHA-256."""
        name = request.path_params["name"]
        secret = "tk_" + secrets.token_urlsafe(API_KEY_BYTES)

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            check_fields(body, ("flags", "rate_per_s", "burst", "exposures", "description"))
            return flagchanges.put_api_key(doc, name, hash_key(secret), **body)

        response = await perform_write(
            ctx, request, action="api_key.create", target=name, edit=edit, body_required=False
        )
        if response.status_code == 200:
            data = orjson.loads(bytes(response.body))
            data["api_key"] = secret
            return versioned_response(data, data["version"])
        return response

    async def revoke_api_key(request: Request) -> Response:
        name = request.path_params["name"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            check_fields(body, ("reason",))
            return flagchanges.revoke_api_key(doc, name)

        return await perform_write(
            ctx, request, action="api_key.revoke", target=name, edit=edit, body_required=False
        )

    async def list_api_keys(request: Request) -> Response:
        doc = await ctx.latest_document()
        keys = [
            {
                "name": name,
                **{k: v for k, v in key.model_dump(mode="json").items() if k != "sha256"},
            }
            for name, key in sorted(doc.api_keys.items())
        ]
        return versioned_response({"version": doc.version, "api_keys": keys}, doc.version)

    toggle = write(
        "flag.toggle",
        ("enabled",),
        lambda doc, key, body: flagchanges.set_enabled(doc, key, body.get("enabled")),
    )
    kill = write(
        "flag.kill",
        ("killed", "reason"),
        lambda doc, key, body: flagchanges.set_killed(
            doc, key, body.get("killed", True), body.get("reason", "")
        ),
    )
    percent = write(
        "flag.percent",
        ("percent", "variant", "rest"),
        lambda doc, key, body: flagchanges.set_percent(
            doc, key, body.get("percent"), body.get("variant"), body.get("rest")
        ),
    )
    weights = write(
        "flag.weights",
        ("weights",),
        lambda doc, key, body: flagchanges.set_weights(doc, key, body.get("weights")),
    )
    add_rule = write(
        "flag.rule",
        ("rule", "index"),
        lambda doc, key, body: flagchanges.add_rule(doc, key, body.get("rule"), body.get("index")),
    )
    targets = write(
        "flag.targets",
        ("variant", "unit_ids"),
        lambda doc, key, body: flagchanges.set_targets(
            doc, key, body.get("variant"), body.get("unit_ids")
        ),
    )
    global_kill = write(
        "flags.kill_all",
        ("killed", "reason"),
        lambda doc, key, body: flagchanges.set_global_kill(doc, body.get("killed", True)),
    )

    async def remove_rule(request: Request) -> Response:
        key = request.path_params["key"]
        index = request.path_params["index"]

        async def edit(doc: Document, body: dict[str, Any]) -> tuple[Document, str]:
            require_flag(doc, key)
            return flagchanges.remove_rule(doc, key, index)

        return await perform_write(
            ctx, request, action="flag.rule.delete", target=key, edit=edit, body_required=False
        )

    return [
        route("/api/v1/flags", {"GET": list_flags}),
        route("/api/v1/flags-kill", {"POST": global_kill}),
        route("/api/v1/flags/{key}", {"GET": get_flag, "PUT": put, "DELETE": delete}),
        route("/api/v1/flags/{key}/toggle", {"POST": toggle}),
        route("/api/v1/flags/{key}/kill", {"POST": kill}),
        route("/api/v1/flags/{key}/percent", {"POST": percent}),
        route("/api/v1/flags/{key}/weights", {"POST": weights}),
        route("/api/v1/flags/{key}/rules", {"POST": add_rule}),
        route("/api/v1/flags/{key}/rules/{index:int}", {"DELETE": remove_rule}),
        route("/api/v1/flags/{key}/targets", {"POST": targets}),
        route("/api/v1/flags/{key}/explain", {"GET": explain}),
        route("/api/v1/api-keys", {"GET": list_api_keys}),
        route("/api/v1/api-keys/{name}", {"POST": create_api_key}),
        route("/api/v1/api-keys/{name}/revoke", {"POST": revoke_api_key}),
    ]
