"""OFREP on a running Turnout, driven by the real `openfeature-provider-ofrep` client from PyPI
(unmodified) through the OpenFeature SDK, row by row of ../shared/OFREP.md §3; the bulk
endpoint's ETag/304, CORS, 413, SSE and the exposure counters with raw HTTP."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from flags.flagmodel import hash_key
from tests.harness import LOOPBACK, TurnoutInstance, backends, release_doc, wait_until

APP_KEY = "app-secret-0001"
NARROW_KEY = "narrow-secret-0002"
REVOKED_KEY = "revoked-secret-0003"
SLOW_KEY = "slow-secret-0004"
ANALYTICS_KEY = "analytics-secret-0005"
_domains = itertools.count()


def flag_doc(stable: str, canary: str) -> dict[str, Any]:
    doc = release_doc(stable, canary)
    doc["flags"] = {
        "dark-mode": {"type": "boolean", "variants": {"on": True, "off": False}, "default": "on"},
        "greeting": {
            "type": "string",
            "variants": {"hello": "hello", "hi": "hi"},
            "default": "hello",
            "metadata": {"team": "growth"},
            "rules": [
                {
                    "conditions": [{"attribute": "email", "op": "ends_with", "value": "@corp.com"}],
                    "variant": "hi",
                }
            ],
        },
        "max-items": {"type": "number", "variants": {"few": 3, "many": 50}, "default": "few"},
        "ratio": {"type": "number", "variants": {"one": 1.0, "half": 0.5}, "default": "one"},
        "layout": {
            "type": "object",
            "variants": {"grid": {"cols": 3}, "list": [1, 2]},
            "default": "grid",
            "targets": {"list": ["listy"]},
        },
        "split": {
            "type": "boolean",
            "variants": {"on": True, "off": False},
            "default": "off",
            "rollout": [{"variant": "on", "weight": 50}, {"variant": "off", "weight": 50}],
        },
        "retired": {
            "type": "boolean",
            "variants": {"on": True, "off": False},
            "default": "on",
            "off_variant": "off",
            "enabled": False,
        },
        "deferred": {
            "type": "string",
            "variants": {"a": "A", "off": "OFF"},
            "default": "a",
            "off_variant": "off",
            "enabled": False,
            "defer_off_value": True,
        },
    }
    doc["api_keys"] = {
        "web-app": {"sha256": hash_key(APP_KEY)},
        "narrow": {"sha256": hash_key(NARROW_KEY), "flags": ["dark-mode"]},
        "old": {"sha256": hash_key(REVOKED_KEY), "revoked": True},
        "slow": {"sha256": hash_key(SLOW_KEY), "rate_per_s": 0.01, "burst": 1},
        "analytics": {"sha256": hash_key(ANALYTICS_KEY), "exposures": True},
    }
    return doc


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TurnoutInstance]:
    with backends("stable", "canary") as up:
        state: Path = tmp_path_factory.mktemp("ofrep") / "state"
        instance = TurnoutInstance(state, seed=flag_doc(up["stable"].url, up["canary"].url)).start()
        try:
            yield instance
        finally:
            instance.stop()


def client_for(inst: TurnoutInstance, key: str | None = APP_KEY) -> OpenFeatureClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    provider = OFREPProvider(inst.edge_url, headers_factory=lambda: headers)
    domain = f"d{next(_domains)}"
    # openfeature-sdk 0.10 initialises a provider in a thread: evaluating before it is ready
    # answers PROVIDER_NOT_READY (seen on a loaded machine), so wait for it.
    api.set_provider_and_wait(provider, domain)
    return api.get_client(domain)


CTX = EvaluationContext(targeting_key="user-1", attributes={"email": "a@example.com"})


# -- values of each type -------------------------------------------------------------------------


def test_values_of_every_type_reach_the_real_client(inst: TurnoutInstance) -> None:
    """bool, str, int, float (sent as 1.0), object and list values pass the real client's
    isinstance checks, with reason, variant and flat metadata."""
    client = client_for(inst)
    flag = client.get_boolean_details("dark-mode", False, CTX)
    assert (flag.value, flag.reason, flag.variant, flag.error_code) == (
        True,
        Reason.STATIC,
        "on",
        None,
    )
    hi = client.get_string_details(
        "greeting", "x", EvaluationContext("u2", {"email": "b@corp.com"})
    )
    assert (hi.value, hi.reason, hi.flag_metadata["team"]) == (
        "hi",
        Reason.TARGETING_MATCH,
        "growth",
    )
    assert client.get_integer_details("max-items", 0, CTX).value == 3
    ratio = client.get_float_details("ratio", 0.0, CTX)
    assert ratio.value == 1.0 and ratio.error_code is None
    assert client.get_object_details("layout", {}, CTX).value == {"cols": 3}
    assert client.get_object_details("layout", {}, EvaluationContext("listy")).value == [1, 2]


def test_type_mismatch_is_detected_by_the_client(inst: TurnoutInstance) -> None:
    """A string flag read as a boolean gives the code default with TYPE_MISMATCH."""
    details = client_for(inst).get_boolean_details("greeting", False, CTX)
    assert (details.value, details.error_code) == (False, ErrorCode.TYPE_MISMATCH)


def test_split_matches_the_position_and_needs_a_key(inst: TurnoutInstance) -> None:
    """A 50/50 rollout answers SPLIT by the unit's position; without a targetingKey it is
    TARGETING_KEY_MISSING (never a random bucket)."""
    from flags.hashing import position

    client = client_for(inst)
    for unit in ("u1", "u2", "u3", "u4", "u5", "u6"):
        got = client.get_boolean_details("split", False, EvaluationContext(unit))
        assert got.reason == Reason.SPLIT
        assert got.value is (position("split", unit) < 50_000)
    missing = client.get_boolean_details("split", True, EvaluationContext())
    assert (missing.value, missing.error_code) == (True, ErrorCode.TARGETING_KEY_MISSING)


def test_disabled_flag_and_code_default(inst: TurnoutInstance) -> None:
    """A disabled flag answers DISABLED with its off variant and value; one that defers answers
    without a value, so the client keeps its code default, variant still named."""
    client = client_for(inst)
    off = client.get_boolean_details("retired", True, CTX)
    assert (off.value, off.reason, off.variant, off.error_code) == (
        False,
        Reason.DISABLED,
        "off",
        None,
    )
    deferred = client.get_string_details("deferred", "code-default", CTX)
    assert (deferred.value, deferred.variant, deferred.reason) == (
        "code-default",
        "off",
        Reason.DISABLED,
    )


# -- errors ------------------------------------------------------------------------------------


def test_unknown_flag_is_flag_not_found(inst: TurnoutInstance) -> None:
    """404 FLAG_NOT_FOUND with errorDetails reaches the client as FLAG_NOT_FOUND."""
    details = client_for(inst).get_boolean_details("no-such-flag", True, CTX)
    assert (details.value, details.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    resp = httpx.post(
        inst.edge_url + "/ofrep/v1/evaluate/flags/no-such-flag",
        json={"context": {"targetingKey": "u"}},
        headers={"X-API-Key": APP_KEY},
    )
    assert resp.status_code == 404
    assert resp.json()["errorCode"] == "FLAG_NOT_FOUND" and resp.json()["errorDetails"]


def test_400s_carry_error_code_and_details(inst: TurnoutInstance) -> None:
    """INVALID_CONTEXT for an unusable targetingKey through the real client (it cannot send
    broken JSON: `requests` refuses NaN before sending); PARSE_ERROR for a non-JSON body and
    INVALID_CONTEXT for a context that is not an object, raw: each a 400 with errorCode and
    errorDetails (TARGETING_KEY_MISSING: test_split_matches_the_position_and_needs_a_key)."""
    client = client_for(inst)
    long_key = client.get_boolean_details("dark-mode", False, EvaluationContext("x" * 300))
    assert long_key.error_code == ErrorCode.INVALID_CONTEXT
    url = inst.edge_url + "/ofrep/v1/evaluate/flags/dark-mode"
    for body, code in (
        (b"{not json", "PARSE_ERROR"),
        (b'{"context": [1]}', "INVALID_CONTEXT"),
        (b'{"context": {"targetingKey": 7}}', "INVALID_CONTEXT"),
        (b"[]", "INVALID_CONTEXT"),
    ):
        resp = httpx.post(url, content=body, headers={"X-API-Key": APP_KEY})
        assert resp.status_code == 400, body
        assert resp.json()["errorCode"] == code and resp.json()["errorDetails"]
        assert resp.json()["key"] == "dark-mode"


def test_missing_and_revoked_keys_are_401_and_other_flags_403(inst: TurnoutInstance) -> None:
    """No key or a revoked key: 401 (GENERAL in the client); a key whose set lacks the flag:
    403; the narrow key still reads its own flag."""
    for key in (None, REVOKED_KEY, "not-a-key"):
        details = client_for(inst, key).get_boolean_details("dark-mode", False, CTX)
        assert (details.value, details.error_code) == (False, ErrorCode.GENERAL), key
        assert "unauthorized" in (details.error_message or "").lower()
    narrow = client_for(inst, NARROW_KEY)
    denied = narrow.get_string_details("greeting", "x", CTX)
    assert denied.error_code == ErrorCode.GENERAL
    assert "forbidden" in (denied.error_message or "").lower()
    assert narrow.get_boolean_details("dark-mode", False, CTX).value is True
    resp = httpx.post(inst.edge_url + "/ofrep/v1/evaluate/flags/dark-mode", json={})
    assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")


def test_rate_limit_is_429_with_integer_retry_after_and_the_client_backs_off(
    inst: TurnoutInstance,
) -> None:
    """A key past its rate gets 429 with an integer Retry-After; the real client then
    short-circuits its next call without a request (its 'paused' error)."""
    client = client_for(inst, SLOW_KEY)
    first = client.get_boolean_details("dark-mode", False, CTX)
    assert first.value is True
    limited = client.get_boolean_details("dark-mode", False, CTX)
    assert limited.error_code == ErrorCode.GENERAL
    assert "Rate limited" in (limited.error_message or "")
    paused = client.get_boolean_details("dark-mode", False, CTX)
    assert "paused" in (paused.error_message or "")
    resp = httpx.post(
        inst.edge_url + "/ofrep/v1/evaluate/flags/dark-mode",
        json={},
        headers={"X-API-Key": SLOW_KEY},
    )
    assert resp.status_code == 429
    assert resp.headers["retry-after"].isdigit() and int(resp.headers["retry-after"]) >= 1


def test_unexpected_failure_is_500_with_error_details(inst: TurnoutInstance) -> None:
    """A failure inside evaluation is a 500 with errorDetails (GENERAL in the client), and the
    next version heals it."""

    class Exploding:
        version = 0
        flags: dict[str, Any] = {"dark-mode": None}

        def evaluate(self, *args: Any) -> Any:
            raise RuntimeError("boom")

    ofrep = inst.context["edge"].ofrep
    saved = ofrep.flags
    ofrep.flags = Exploding()
    try:
        details = client_for(inst).get_boolean_details("dark-mode", False, CTX)
        assert details.error_code == ErrorCode.GENERAL and "boom" in (details.error_message or "")
        resp = httpx.post(
            inst.edge_url + "/ofrep/v1/evaluate/flags/dark-mode",
            json={},
            headers={"X-API-Key": APP_KEY},
        )
        assert resp.status_code == 500 and "boom" in resp.json()["errorDetails"]
    finally:
        ofrep.flags = saved


def test_huge_context_is_413(inst: TurnoutInstance) -> None:
    """A context over the cap is 413 before it is parsed."""
    resp = httpx.post(
        inst.edge_url + "/ofrep/v1/evaluate/flags/dark-mode",
        json={"context": {"targetingKey": "u", "blob": "x" * 100_000}},
        headers={"X-API-Key": APP_KEY},
    )
    assert resp.status_code == 413 and resp.json()["errorDetails"]


# -- bulk, CORS, SSE, metrics ------------------------------------------------------------------


def test_bulk_etag_304_inline_failures_and_key_sets(inst: TurnoutInstance) -> None:
    """Bulk answers every flag of the key's set with a weak ETag; If-None-Match (weak, in a
    list, or `*`) gives 304 with no body; another context changes the ETag; a split without a
    key fails inline; the narrow key sees only its flag; both paths with and without '/'."""
    url = inst.edge_url + "/ofrep/v1/evaluate/flags"
    headers = {"Authorization": f"Bearer {APP_KEY}"}
    resp = httpx.post(url, json={"context": {"targetingKey": "u1"}}, headers=headers)
    assert resp.status_code == 200
    etag = resp.headers["etag"]
    assert etag.startswith('W/"')
    body = resp.json()
    by_key = {item["key"]: item for item in body["flags"]}
    assert by_key["dark-mode"]["value"] is True and by_key["ratio"]["value"] == 1.0
    assert "value" not in by_key["deferred"] and by_key["deferred"]["variant"] == "off"
    assert body["eventStreams"][0]["type"] == "sse"
    assert body["metadata"]["version"].startswith("v")
    for inm in (etag, etag.removeprefix("W/"), f'"nope", {etag}', "*"):
        again = httpx.post(
            url + "/",
            json={"context": {"targetingKey": "u1"}},
            headers={**headers, "If-None-Match": inm},
        )
        assert again.status_code == 304 and again.content == b"", inm
    other = httpx.post(
        url,
        json={"context": {"targetingKey": "u1", "email": "a@corp.com"}},
        headers={**headers, "If-None-Match": etag},
    )
    assert other.status_code == 200 and other.headers["etag"] != etag
    no_key = httpx.post(url, json={"context": {}}, headers=headers).json()
    split = {item["key"]: item for item in no_key["flags"]}["split"]
    assert split["errorCode"] == "TARGETING_KEY_MISSING" and split["errorDetails"]
    narrow = httpx.post(url, json={}, headers={"X-API-Key": NARROW_KEY}).json()
    assert [item["key"] for item in narrow["flags"]] == ["dark-mode"]


def test_cors_preflight_and_exposed_headers(inst: TurnoutInstance) -> None:
    """A browser's preflight is allowed for the auth headers; answers expose ETag."""
    pre = httpx.options(
        inst.edge_url + "/ofrep/v1/evaluate/flags",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 204
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert "POST" in pre.headers["access-control-allow-methods"]
    resp = httpx.post(
        inst.edge_url + "/ofrep/v1/evaluate/flags",
        json={},
        headers={"X-API-Key": APP_KEY, "Origin": "https://app.example"},
    )
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "ETag" in resp.headers["access-control-expose-headers"]


def test_sse_stream_pokes_clients_on_a_new_version(inst: TurnoutInstance) -> None:
    """The advertised SSE stream sends `refetchEvaluation` when a new version is applied, and
    the bulk ETag changes with it."""
    url = inst.edge_url + "/ofrep/v1/evaluate/flags"
    headers = {"X-API-Key": APP_KEY}
    before = httpx.post(url, json={"context": {"targetingKey": "u1"}}, headers=headers)
    with socket.create_connection((LOOPBACK, inst.edge_port), timeout=10) as s:
        s.sendall(
            f"GET /ofrep/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {APP_KEY}\r\n\r\n".encode()
        )
        received = b""
        while b"turnout ofrep events" not in received:
            received += s.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        assert b"text/event-stream" in received
        resp = httpx.put(
            inst.admin_url + "/api/v1/releases/web",
            json={
                "stable": ["http://127.0.0.1:9"],
                "canary": ["http://127.0.0.1:9"],
                "stage": "ga",
            },
            headers=inst.auth,
        )
        assert resp.status_code == 200, resp.text
        while b"refetchEvaluation" not in received:
            chunk = s.recv(4096)
            assert chunk, "stream closed before the event"
            received += chunk
    event_line = next(
        line for line in received.split(b"\n") if line.startswith(b"data: ") and b"refetch" in line
    )
    assert orjson.loads(event_line[6:])["type"] == "refetchEvaluation"
    assert wait_until(
        lambda: (
            httpx.post(url, json={"context": {"targetingKey": "u1"}}, headers=headers).headers[
                "etag"
            ]
            != before.headers["etag"]
        )
    )


def test_exposures_are_counted_per_declared_flag_and_variant(inst: TurnoutInstance) -> None:
    """Served evaluations appear in /metrics by flag and variant; unknown flags never do."""
    client = client_for(inst)
    for _ in range(3):
        client.get_string_details("greeting", "x", EvaluationContext("u9", {"email": "z@corp.com"}))
    client.get_boolean_details("no-such-flag", False, CTX)
    text = httpx.get(inst.admin_url + "/metrics", headers=inst.auth).text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("turnout_flag_exposures_total")
        and 'flag="greeting"' in x
        and 'variant="hi"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 3
    assert "no-such-flag" not in text


def test_exposure_stream_sends_each_served_evaluation(inst: TurnoutInstance) -> None:
    """A key allowed to read exposures gets one SSE `exposure` event per evaluation served
    (flag, variant, reason, unit); a key without that right is 403."""
    denied = httpx.get(inst.edge_url + "/ofrep/v1/exposures", headers={"X-API-Key": APP_KEY})
    assert denied.status_code == 403
    with socket.create_connection((LOOPBACK, inst.edge_port), timeout=10) as s:
        s.sendall(
            f"GET /ofrep/v1/exposures?key={ANALYTICS_KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        received = b""
        while b"turnout exposures" not in received:
            received += s.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        client_for(inst).get_string_details(
            "greeting", "x", EvaluationContext("reader-1", {"email": "r@corp.com"})
        )
        while b'"unit":"reader-1"}' not in received:
            chunk = s.recv(4096)
            assert chunk, "stream closed before the event"
            received += chunk
    data = next(
        line[6:] for line in received.split(b"\n") if line.startswith(b"data: ") and b"flag" in line
    )
    event = orjson.loads(data)
    assert (event["flag"], event["variant"], event["reason"], event["unit"]) == (
        "greeting",
        "hi",
        "TARGETING_MATCH",
        "reader-1",
    )


def test_rate_bucket_refills_with_the_clock() -> None:
    """A key's token bucket (driven by an explicit clock): `burst` requests pass, the next is
    429 with the whole seconds until a token is back, and after that long one passes again."""
    from edge.ofrep import Ofrep, Refusal
    from flags.document import load_document
    from flags.evaluate import compile_snapshot

    now = [1000.0]
    ofrep = Ofrep(clock=lambda: now[0])
    doc = load_document(
        {"api_keys": {"k": {"sha256": hash_key("s"), "rate_per_s": 0.5, "burst": 2}}}
    )
    ofrep.apply(compile_snapshot(doc))
    headers = [(b"x-api-key", b"s")]
    ofrep._authorize(headers, None)
    ofrep._authorize(headers, None)
    with pytest.raises(Refusal) as info:
        ofrep._authorize(headers, None)
    assert info.value.status == 429
    assert dict(info.value.headers)[b"retry-after"] == b"2"  # 1 token at 0.5/s
    now[0] += 2.0
    ofrep._authorize(headers, None)
    with pytest.raises(Refusal):
        ofrep._authorize(headers, None)


def test_base_url_with_a_path_prefix(tmp_path: Path) -> None:
    """With `ofrep_path_prefix: /tools/ff`, the real client configured with the base URL
    `http://host/tools/ff` is answered, the bulk answer names the prefixed stream, and the
    unprefixed `/ofrep/` path is ordinary proxied traffic."""
    with backends("stable", "canary") as up:
        instance = TurnoutInstance(
            tmp_path / "state",
            seed=flag_doc(up["stable"].url, up["canary"].url),
            ofrep_path_prefix="/tools/ff",
        ).start()
        try:
            headers = {"Authorization": f"Bearer {APP_KEY}"}
            provider = OFREPProvider(
                instance.edge_url + "/tools/ff", headers_factory=lambda: headers
            )
            domain = f"d{next(_domains)}"
            api.set_provider_and_wait(provider, domain)
            details = api.get_client(domain).get_boolean_details("dark-mode", False, CTX)
            assert (details.value, details.reason, details.error_code) == (
                True,
                Reason.STATIC,
                None,
            )
            bulk = httpx.post(
                instance.edge_url + "/tools/ff/ofrep/v1/evaluate/flags", json={}, headers=headers
            ).json()
            assert bulk["eventStreams"][0]["endpoint"]["requestUri"] == "/tools/ff/ofrep/v1/events"
            proxied = httpx.post(
                instance.edge_url + "/ofrep/v1/evaluate/flags/dark-mode", json={}, headers=headers
            )
            assert proxied.json()["backend"] in ("stable", "canary")  # the upstream answered
        finally:
            instance.stop()
