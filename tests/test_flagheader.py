"""Flags carried upstream (edge/flagheader.py) through a running Turnout, and the cohort
acceptance from outside: a unit routed to web's canary at `beta` gets the beta variant of a
flag bound to the `beta` cohort, and no one else does, on two instances and after a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from flags.flagmodel import hash_key
from tests.harness import TurnoutInstance, backends

UNITS = [f"user-{i}" for i in range(1000)]
SECRET = "header-test-secret"


def cohort_doc(stable: str, canary: str) -> dict[str, Any]:
    return {
        "cohorts": {"beta": {"salt": "beta-2026"}},
        "releases": {
            "web": {"stable": [stable], "canary": [canary], "stage": "beta", "cohort": "beta"}
        },
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
        "flags": {
            "checkout": {
                "type": "string",
                "variants": {"beta": "new", "control": "old"},
                "default": "control",
                "cohort": "beta",
                "rollout": [
                    {"variant": "beta", "weight": 10},
                    {"variant": "control", "weight": 90},
                ],
                "upstream": ["web"],
            },
            "staff": {
                "type": "boolean",
                "variants": {"on": True, "off": False},
                "default": "off",
                "rules": [
                    {
                        "conditions": [
                            {"attribute": "email", "op": "ends_with", "value": "@corp.com"}
                        ],
                        "variant": "on",
                    }
                ],
                "upstream": ["web"],
            },
            "not-sent": {
                "type": "boolean",
                "variants": {"on": True, "off": False},
                "default": "on",
            },
        },
        "api_keys": {"app": {"sha256": hash_key(SECRET)}},
    }


def upstream_flags(client: httpx.Client, edge: str, unit: str, **headers: str) -> tuple[str, Any]:
    resp = client.get(edge + "/page", headers={"x-user-id": unit, **headers})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    sent = [v for k, v in body["headers"] if k == "x-turnout-flags"]
    return body["backend"], sent


def check_instance(inst: TurnoutInstance) -> dict[str, str]:
    """Every unit's backend agrees with the variant sent upstream and served over OFREP."""
    seen = {}
    with httpx.Client(timeout=10) as client:
        for unit in UNITS:
            backend, sent = upstream_flags(client, inst.edge_url, unit)
            assert len(sent) == 1, sent
            pairs = dict(p.split("=") for p in sent[0].split(", "))
            assert pairs == {"checkout": pairs["checkout"], "staff": "off"}
            assert (pairs["checkout"] == "beta") is (backend == "canary"), unit
            seen[unit] = backend
        for unit in UNITS[:100]:
            served = client.post(
                inst.edge_url + "/ofrep/v1/evaluate/flags/checkout",
                json={"context": {"targetingKey": unit}},
                headers={"X-API-Key": SECRET},
            ).json()
            assert (served["variant"] == "beta") is (seen[unit] == "canary"), unit
    return seen


def test_beta_cohort_flag_goes_with_the_beta_canary_across_instances_and_restart(
    tmp_path: Path,
) -> None:
    """For 1,000 units through the proxy: the variant sent upstream is `beta` exactly for the
    units routed to the canary (about 10 %), the same on a second instance sharing the store
    and after a restart; OFREP serves the same variant."""
    state = tmp_path / "state"
    with backends("stable", "canary") as up:
        doc = cohort_doc(up["stable"].url, up["canary"].url)
        first = TurnoutInstance(state, seed=doc).start()
        second = TurnoutInstance(state).start()
        try:
            one = check_instance(first)
            assert check_instance(second) == one
        finally:
            second.stop()
            first.stop()
        assert 60 < sum(b == "canary" for b in one.values()) < 140
        again = TurnoutInstance(state).start()
        try:
            assert check_instance(again) == one
        finally:
            again.stop()


def test_inbound_flag_headers_are_stripped_and_rules_see_the_email(tmp_path: Path) -> None:
    """A client's own `x-turnout-flags` never reaches the backend; the e-mail header feeds the
    flags' rules; flags not asked for by the release are not sent."""
    with backends("stable", "canary") as up:
        inst = TurnoutInstance(
            tmp_path / "state", seed=cohort_doc(up["stable"].url, up["canary"].url)
        ).start()
        try:
            with httpx.Client(timeout=10) as client:
                _, sent = upstream_flags(
                    client,
                    inst.edge_url,
                    "user-1",
                    **{"x-turnout-flags": "checkout=beta, forged=1", "x-user-email": "a@corp.com"},
                )
            assert len(sent) == 1
            assert "forged" not in sent[0] and "not-sent" not in sent[0]
            assert "staff=on" in sent[0]
        finally:
            inst.stop()


def test_header_is_capped_and_says_so() -> None:
    """Past MAX_FLAGS_HEADER_BYTES the remaining pairs are left out and the truncation header
    is added; the kept value stays under the cap."""
    from edge.flagheader import MAX_FLAGS_HEADER_BYTES, flag_header_entries
    from flags.document import load_document
    from flags.evaluate import compile_snapshot

    doc = cohort_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    for i in range(200):
        doc["flags"][f"long-flag-name-number-{i:03d}-" + "x" * 20] = {
            "type": "boolean",
            "variants": {"on": True, "off": False},
            "default": "on",
            "upstream": ["web"],
        }
    snapshot = compile_snapshot(load_document(doc))
    flags = snapshot.flags
    assert flags is not None
    entries = flag_header_entries(flags, snapshot.releases["web"].upstream_flags, "user-1", None)
    assert entries[0] == b"x-turnout-flags"
    assert len(entries[2]) <= MAX_FLAGS_HEADER_BYTES
    assert entries[4:] == [b"x-turnout-flags-truncated", b": ", b"1", b"\r\n"]
    assert flag_header_entries(flags, (), "user-1", None) == []


def test_each_route_sends_the_flags_its_backend_asks_for(tmp_path: Path) -> None:
    """Two routes to the same release: `/api` asks for `not-sent` in its route's `flags:`
    and gets it beside the release's own (`upstream: [web]`) flags, in key order; `/page`
    gets only the release's. Decisions do not differ between the two routes."""
    with backends("stable", "canary") as up:
        doc = cohort_doc(up["stable"].url, up["canary"].url)
        doc["routes"].insert(
            0, {"host": "*", "path_prefix": "/api", "release": "web", "flags": ["not-sent"]}
        )
        inst = TurnoutInstance(tmp_path / "state", seed=doc).start()
        try:
            with httpx.Client(timeout=10) as client:
                for unit in UNITS[:50]:
                    page_backend, page = upstream_flags(client, inst.edge_url, unit)
                    resp = client.get(inst.edge_url + "/api/x", headers={"x-user-id": unit})
                    body = resp.json()
                    api = [v for k, v in body["headers"] if k == "x-turnout-flags"]
                    assert body["backend"] == page_backend
                    assert [p.split("=")[0] for p in page[0].split(", ")] == ["checkout", "staff"]
                    assert [p.split("=")[0] for p in api[0].split(", ")] == [
                        "checkout",
                        "not-sent",
                        "staff",
                    ]
                    assert "not-sent=on" in api[0]
        finally:
            inst.stop()


def test_a_route_asking_for_an_unknown_flag_is_refused_with_the_field() -> None:
    from flags.document import load_document
    from flags.errors import ConfigError

    doc = cohort_doc("http://127.0.0.1:9", "http://127.0.0.1:9")
    doc["routes"][0]["flags"] = ["checkout", "nope"]
    try:
        load_document(doc)
    except ConfigError as exc:
        assert exc.field == "routes.0.flags.1"
        assert "nope" in str(exc)
    else:
        raise AssertionError("an unknown flag in a route was accepted")
    doc["routes"][0]["flags"] = ["checkout", "checkout"]
    try:
        load_document(doc)
    except ConfigError as exc:
        assert exc.field == "routes.0.flags"
    else:
        raise AssertionError("a flag listed twice was accepted")
