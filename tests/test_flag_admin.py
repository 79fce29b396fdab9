"""Flags for product managers through the admin API and `turnout flag ...` / `turnout import`,
against a running Turnout: each change is a new version (If-Match honoured), and what OFREP
serves on the edge follows it; API keys are created (secret shown once) and revoked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flags.hashing import position
from tests.harness import TurnoutInstance, backends, release_doc, wait_until
from turnout.cli import EXIT_OK, EXIT_REFUSED, main

DATA = Path(__file__).resolve().parent / "data"
FLAG = {
    "type": "boolean",
    "variants": {"on": True, "off": False},
    "default": "off",
}


@pytest.fixture
def inst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TurnoutInstance]:
    for name in ("TURNOUT_ADMIN_URL", "TURNOUT_ADMIN_TOKEN", "TURNOUT_ACTOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(tmp_path / "cli-state"))
    with backends("stable", "canary") as up:
        instance = TurnoutInstance(
            tmp_path / "state", seed=release_doc(up["stable"].url, up["canary"].url)
        ).start()
        try:
            yield instance
        finally:
            instance.stop()


def cli(inst: TurnoutInstance, *args: str) -> int:
    return main(["--admin", inst.admin_url, "--token", inst.token, *args])


def admin(inst: TurnoutInstance, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {**inst.auth, **kw.pop("headers", {})}
    return httpx.request(method, inst.admin_url + path, headers=headers, timeout=10, **kw)


def served(inst: TurnoutInstance, key: str, secret: str, unit: str = "u1", **attrs: Any) -> Any:
    resp = httpx.post(
        f"{inst.edge_url}/ofrep/v1/evaluate/flags/{key}",
        json={"context": {"targetingKey": unit, **attrs}},
        headers={"X-API-Key": secret},
        timeout=10,
    )
    return resp.json() if resp.status_code == 200 else resp.status_code


def test_flag_lifecycle_through_api_and_cli(
    inst: TurnoutInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    """create (If-Match), a stale If-Match refused, key creation, on/off, percent, target,
    kill, global kill, explain and list: each write a new version that OFREP serves next."""
    version = int(admin(inst, "GET", "/api/v1/flags").headers["etag"].strip('"'))
    stale = admin(inst, "PUT", "/api/v1/flags/promo", json=FLAG, headers={"If-Match": '"999"'})
    assert stale.status_code == 412
    created = admin(
        inst, "PUT", "/api/v1/flags/promo", json=FLAG, headers={"If-Match": f'"{version}"'}
    )
    assert created.status_code == 200 and created.json()["version"] == version + 1
    bad = admin(inst, "PUT", "/api/v1/flags/bad", json={**FLAG, "default": "maybe"})
    assert bad.status_code == 422 and bad.json()["field"] == "flags.bad.default"
    key = admin(inst, "POST", "/api/v1/api-keys/web", json={"flags": ["promo"]})
    assert key.status_code == 200, key.text
    secret = key.json()["api_key"]
    assert secret not in admin(inst, "GET", "/api/v1/config").text  # only the hash is stored

    def serves(predicate: Any) -> bool:
        return wait_until(lambda: predicate(served(inst, "promo", secret)))

    assert serves(lambda r: isinstance(r, dict) and r["value"] is False)
    assert cli(inst, "flag", "percent", "promo", "30") == EXIT_OK
    units = [f"u{i}" for i in range(200)]
    assert serves(lambda r: isinstance(r, dict) and r["reason"] == "SPLIT")
    for unit in units[:50]:
        got = served(inst, "promo", secret, unit)
        assert got["value"] is (position("promo", unit) < 30_000), unit
    assert cli(inst, "flag", "target", "promo", "off", "u-qa") == EXIT_OK
    assert wait_until(lambda: served(inst, "promo", secret, "u-qa")["reason"] == "TARGETING_MATCH")
    assert cli(inst, "flag", "kill", "promo", "--reason", "incident 42") == EXIT_OK
    assert serves(lambda r: r["reason"] == "DISABLED")
    assert cli(inst, "flag", "kill", "promo", "--undo") == EXIT_OK
    assert cli(inst, "flag", "kill", "--all") == EXIT_OK
    assert serves(lambda r: r["reason"] == "DISABLED")
    assert cli(inst, "flag", "kill", "--all", "--undo") == EXIT_OK
    assert cli(inst, "flag", "off", "promo") == EXIT_OK
    assert serves(lambda r: r["reason"] == "DISABLED")
    assert cli(inst, "flag", "on", "promo") == EXIT_OK
    assert cli(inst, "flag", "weights", "promo", "on=0", "off=100") == EXIT_OK
    assert serves(lambda r: r["reason"] == "SPLIT" and r["value"] is False)
    capsys.readouterr()
    assert cli(inst, "flag", "explain", "promo", "u5") == EXIT_OK
    out = capsys.readouterr().out
    assert "SPLIT" in out and f"position  {position('promo', 'u5')}" in out
    assert cli(inst, "flag", "list") == EXIT_OK
    assert "promo" in capsys.readouterr().out
    assert cli(inst, "flag", "percent", "promo", "101") == EXIT_REFUSED
    assert "percent" in capsys.readouterr().err


def test_api_key_revocation_is_401(inst: TurnoutInstance) -> None:
    """A revoked key is refused with 401 from the next applied version."""
    assert admin(inst, "PUT", "/api/v1/flags/promo", json=FLAG).status_code == 200
    secret = admin(inst, "POST", "/api/v1/api-keys/app", json={}).json()["api_key"]
    assert wait_until(lambda: isinstance(served(inst, "promo", secret), dict))
    assert admin(inst, "POST", "/api/v1/api-keys/app/revoke", json={}).status_code == 200
    assert wait_until(lambda: served(inst, "promo", secret) == 401)
    listed = admin(inst, "GET", "/api/v1/api-keys").json()["api_keys"]
    assert listed == [
        {
            "name": "app",
            "flags": None,
            "revoked": True,
            "rate_per_s": None,
            "burst": None,
            "exposures": False,
            "description": "",
        }
    ]


def test_import_flagd_dry_run_then_apply(
    inst: TurnoutInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    """`turnout import flagd FILE --dry-run` reports and writes nothing; without it the flags
    become a new version (the unmappable flag reported, left out)."""
    before = admin(inst, "GET", "/api/v1/flags").json()["version"]
    assert cli(inst, "import", "flagd", str(DATA / "flagd-flags.json"), "--dry-run") == EXIT_OK
    captured = capsys.readouterr()
    assert "clock-based: not mapped" in captured.err and "dry run" in captured.err
    assert admin(inst, "GET", "/api/v1/flags").json()["version"] == before
    assert cli(inst, "import", "flagd", str(DATA / "flagd-flags.json")) == EXIT_OK
    data = admin(inst, "GET", "/api/v1/flags").json()
    assert data["version"] == before + 1
    assert {f["key"] for f in data["flags"]} == {
        "new-header",
        "color",
        "limit",
        "legacy",
        "checkout-split",
    }


def test_rules_and_delete_through_the_api(
    inst: TurnoutInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule added by the CLI serves its variant; removing it by index restores the default;
    a flag another flag depends on cannot be deleted (field named); an unused one can."""
    assert admin(inst, "PUT", "/api/v1/flags/base", json=FLAG).status_code == 200
    child = {**FLAG, "prerequisites": [{"flag": "base", "variants": ["on"]}]}
    assert admin(inst, "PUT", "/api/v1/flags/child", json=child).status_code == 200
    secret = admin(inst, "POST", "/api/v1/api-keys/app", json={}).json()["api_key"]
    rule = (
        '{"conditions": [{"attribute": "plan", "op": "equals", "value": "pro"}], "variant": "on"}'
    )
    assert cli(inst, "flag", "rule", "base", rule) == EXIT_OK
    assert wait_until(
        lambda: (
            served(inst, "base", secret, plan="pro") != 401
            and served(inst, "base", secret, plan="pro")["variant"] == "on"
        )
    )
    assert served(inst, "base", secret, plan="free")["variant"] == "off"
    assert admin(inst, "DELETE", "/api/v1/flags/base/rules/0").status_code == 200
    assert wait_until(lambda: served(inst, "base", secret, plan="pro")["variant"] == "off")
    refused = admin(inst, "DELETE", "/api/v1/flags/base")
    assert refused.status_code == 422
    assert refused.json()["field"] == "flags.child.prerequisites.0.flag"
    assert admin(inst, "DELETE", "/api/v1/flags/child").status_code == 200
    assert admin(inst, "DELETE", "/api/v1/flags/base").status_code == 200
    assert admin(inst, "GET", "/api/v1/flags").json()["flags"] == []
