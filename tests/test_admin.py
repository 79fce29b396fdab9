"""The admin API over a real FileStore and a real ConfigWatcher, called in-process through
httpx's ASGITransport (Starlette's TestClient warns about httpx, and warnings are errors)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import SecretStr
from starlette.applications import Starlette

from admin.app import create_admin_app
from admin.audit import escape
from admin.auth import resolve_admin_token
from flags.document import Document, load_document
from flags.errors import ConfigError
from flags.store import Revision
from stores.filestore import FileStore
from stores.settings import Settings
from stores.watch import ConfigWatcher
from tests.harness import release_doc

pytestmark = pytest.mark.timeout(30)

TOKEN = "test-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = release_doc(
    "http://127.0.0.1:9001", "http://127.0.0.1:9002", internal={"unit_ids": ["alice"]}
)


class RacingStore(FileStore):
    """A FileStore where another writer commits right after the next read of the latest
    revision: the interleaving a compare-and-set exists for."""

    race_next_read = False

    async def latest(self) -> Revision | None:
        revision = await super().latest()
        if self.race_next_read and revision is not None:
            self.race_next_read = False
            await self.commit(
                revision.document,
                expected_version=revision.version,
                actor="other",
                summary="concurrent",
            )
        return revision


T = TypeVar("T")


class Client:
    """Synchronous requests into an ASGI app, all on one event loop."""

    def __init__(self, app: Starlette, runner: asyncio.Runner) -> None:
        self.runner = runner
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        self.http = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8081")

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.http.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


@dataclass
class Admin:
    client: Client
    store: RacingStore
    watcher: ConfigWatcher
    runner: asyncio.Runner

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def version(self) -> int:
        return self.run(self.store.current_version())

    def document(self) -> Document:
        revision = self.run(self.store.latest())
        assert revision is not None
        return revision.document

    def stage(self, body: Any, **headers: str) -> Any:
        return self.client.post(
            "/api/v1/releases/web/stage", json=body, headers={**AUTH, **headers}
        )


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "admin_token": SecretStr(TOKEN),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def admin(tmp_path: Path, runner: asyncio.Runner) -> Admin:
    store = RacingStore(tmp_path / "store")
    runner.run(store.open())
    revision = runner.run(
        store.commit(load_document(SEED), expected_version=0, actor="seed", summary="seed")
    )
    watcher = ConfigWatcher(store)
    runner.run(watcher.sync())
    assert watcher.revision == revision
    app = create_admin_app(_settings(tmp_path), store, watcher, CollectorRegistry())
    return Admin(Client(app, runner), store, watcher, runner)


# -- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
    ids=["missing", "wrong", "no-scheme", "basic"],
)
def test_write_without_valid_token_is_401_and_changes_nothing(
    admin: Admin, headers: dict[str, str]
) -> None:
    """A write without the right bearer token is refused with 401 + WWW-Authenticate."""
    response = admin.client.post(
        "/api/v1/releases/web/stage", json={"stage": "ga"}, headers=headers
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert admin.version() == 1
    assert admin.document().releases["web"].stage == "beta"


def test_reads_are_open(admin: Admin) -> None:
    """Reading the configuration needs no token."""
    response = admin.client.get("/api/v1/config")
    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert response.headers["etag"] == '"1"'
    assert response.json()["document"]["releases"]["web"]["stage"] == "beta"


# -- stages ----------------------------------------------------------------------------------


def test_stage_by_name_writes_a_new_version_applied_at_once(admin: Admin) -> None:
    """POST stage {"stage": "open"} commits version 2 and this instance serves it at once."""
    response = admin.stage({"stage": "open"})
    assert response.status_code == 200
    body = response.json()
    assert (body["version"], body["summary"], body["changed"]) == (
        2,
        "web: stage beta -> open",
        True,
    )
    # What changed, with the exact share of units that move (50 - 10 = 40 %).
    assert body["changes"][0]["share"] == pytest.approx(0.4)
    assert response.headers["etag"] == '"2"'
    assert admin.version() == 2
    assert admin.watcher.version == 2
    assert admin.watcher.snapshot.releases["web"].percent == 50.0


@pytest.mark.parametrize("percent", [12.5, 0.001])
def test_stage_by_percent(admin: Admin, percent: float) -> None:
    """An explicit percentage (down to the 0.001 % step) becomes a custom stage."""
    response = admin.stage({"percent": percent})
    assert response.status_code == 200
    release = admin.client.get("/api/v1/releases/web").json()["release"]
    assert release["stage"] == "custom"
    assert release["percent"] == percent
    assert release["effective_percent"] == percent


@pytest.mark.parametrize("percent", [150, -1, "abc", 12.0001])
def test_invalid_percent_is_422_naming_percent(admin: Admin, percent: Any) -> None:
    """Out of range, not a number or finer than 0.001 %: 422 naming percent, no new version."""
    response = admin.stage({"percent": percent})
    assert response.status_code == 422
    assert "percent" in response.json()["field"]
    assert response.json()["error"]
    assert admin.version() == 1


def test_unknown_stage_is_422(admin: Admin) -> None:
    """A stage name the stage table does not define is refused."""
    response = admin.stage({"stage": "everyone"})
    assert response.status_code == 422
    assert response.json()["field"] == "stage"
    assert admin.version() == 1


def test_unknown_release_is_404(admin: Admin) -> None:
    """Every endpoint naming a release that does not exist answers 404."""
    stage = admin.client.post("/api/v1/releases/nope/stage", json={"stage": "ga"}, headers=AUTH)
    rollback = admin.client.post(
        "/api/v1/releases/nope/rollback", json={"reason": "x"}, headers=AUTH
    )
    assert stage.status_code == rollback.status_code == 404
    assert admin.client.get("/api/v1/releases/nope").status_code == 404
    assert admin.client.get("/api/v1/releases/nope/explain?unit_id=a").status_code == 404
    assert admin.version() == 1


def test_unknown_body_field_is_422_naming_it(admin: Admin) -> None:
    """A field the endpoint does not know is refused, not ignored."""
    response = admin.stage({"stage": "ga", "percnt": 5})
    assert response.status_code == 422
    assert response.json()["field"] == "percnt"
    assert admin.version() == 1


def test_bad_json_is_400(admin: Admin) -> None:
    """A body that is not JSON is a 400 and changes nothing."""
    response = admin.client.post(
        "/api/v1/releases/web/stage",
        content=b'{"stage": ',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert admin.version() == 1


def test_body_too_large_is_413(admin: Admin) -> None:
    """A body over the 1 MiB cap is refused with 413."""
    big = b'{"reason": "' + b"x" * (1024 * 1024) + b'"}'
    response = admin.client.post(
        "/api/v1/releases/web/rollback",
        content=big,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert admin.version() == 1


def test_get_on_a_mutation_route_is_405(admin: Admin) -> None:
    """Mutations answer only POST/PUT; a GET (or DELETE) gets 405 and changes nothing."""
    assert admin.client.get("/api/v1/releases/web/stage").status_code == 405
    assert admin.client.get("/api/v1/releases/web/rollback").status_code == 405
    assert admin.client.get("/api/v1/versions/1/restore").status_code == 405
    deleted = admin.client.delete("/api/v1/config", headers=AUTH)
    assert deleted.status_code == 405
    assert "PUT" in deleted.headers["allow"]
    assert admin.version() == 1


# -- rollback and restore --------------------------------------------------------------------


def test_rollback_sends_everyone_to_stable_with_the_reason(admin: Admin) -> None:
    """Rollback: stage off (internal users too), reason shown by explain, version + 1."""
    response = admin.client.post(
        "/api/v1/releases/web/rollback", json={"reason": "error rate up"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["version"] == 2
    release = admin.client.get("/api/v1/releases/web").json()["release"]
    assert release["stage"] == "off"
    assert release["rollback"]["reason"] == "error rate up"
    assert release["rollback"]["from_stage"] == "beta"
    explained = admin.client.get("/api/v1/releases/web/explain?unit_id=alice").json()
    assert explained["arm"] == "stable"
    assert explained["reason"] == "DISABLED"
    assert "error rate up" in explained["explanation"]
    assert explained["version"] == 2


def test_rollback_needs_a_reason(admin: Admin) -> None:
    """A rollback without a reason is refused naming the reason field."""
    response = admin.client.post("/api/v1/releases/web/rollback", json={}, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["field"] == "reason"
    assert admin.version() == 1


def test_restore_brings_back_an_old_stage_as_a_new_version(admin: Admin) -> None:
    """Restore of version 1 after a rollback writes version 3 with version 1's content."""
    admin.client.post("/api/v1/releases/web/rollback", json={"reason": "bad"}, headers=AUTH)
    response = admin.client.post("/api/v1/versions/1/restore", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["version"] == 3
    assert admin.document().releases["web"].stage == "beta"
    assert admin.document().releases["web"].rollback is None
    assert admin.watcher.version == 3


def test_restore_of_a_missing_version_is_404(admin: Admin) -> None:
    """Restoring a version that was never written is 404 and writes nothing."""
    response = admin.client.post("/api/v1/versions/99/restore", headers=AUTH)
    assert response.status_code == 404
    assert admin.client.get("/api/v1/versions/99").status_code == 404
    assert admin.version() == 1


# -- concurrency -----------------------------------------------------------------------------


def test_stale_if_match_is_412_and_changes_nothing(admin: Admin) -> None:
    """If-Match naming an older version is refused with 412."""
    admin.stage({"stage": "open"})
    response = admin.stage({"stage": "ga"}, **{"If-Match": '"1"'})
    assert response.status_code == 412
    assert response.json()["field"] == "If-Match"
    assert admin.version() == 2
    assert admin.document().releases["web"].stage == "open"


@pytest.mark.parametrize("tag", ['"1"', "1", 'W/"1"'])
def test_current_if_match_is_accepted(admin: Admin, tag: str) -> None:
    """If-Match with the current version, quoted, bare or weak, lets the write through."""
    response = admin.stage({"stage": "ga"}, **{"If-Match": tag})
    assert response.status_code == 200
    assert admin.version() == 2


def test_malformed_if_match_is_400(admin: Admin) -> None:
    """An If-Match that names no version is a 400, not a silent unconditional write."""
    response = admin.stage({"stage": "ga"}, **{"If-Match": "abc"})
    assert response.status_code == 400
    assert admin.version() == 1


def test_lost_compare_and_set_without_if_match_is_409(admin: Admin) -> None:
    """Another writer committing between our read and our commit makes this write 409."""
    admin.store.race_next_read = True
    response = admin.stage({"stage": "ga"})
    assert response.status_code == 409
    assert admin.version() == 2  # only the other writer's version
    assert admin.document().releases["web"].stage == "beta"


def test_lost_compare_and_set_with_if_match_is_412(admin: Admin) -> None:
    """The same race with If-Match answers 412: the client's precondition no longer holds."""
    admin.store.race_next_read = True
    response = admin.stage({"stage": "ga"}, **{"If-Match": '"1"'})
    assert response.status_code == 412
    assert admin.document().releases["web"].stage == "beta"


def test_store_unreachable_is_503_never_a_fake_success(admin: Admin, tmp_path: Path) -> None:
    """When the store cannot be read, reads and writes answer 503 with a clear message."""
    marker = tmp_path / "store" / "CURRENT"
    marker.unlink()
    marker.mkdir()  # reading the version marker now fails inside the store
    response = admin.stage({"stage": "ga"})
    assert response.status_code == 503
    assert "store" in response.json()["error"]
    assert admin.client.get("/api/v1/config").status_code == 503
    assert admin.watcher.version == 1


def test_write_on_a_store_that_lost_data_is_refused(admin: Admin, tmp_path: Path) -> None:
    """A store behind the served version (emptied) gets no write on top until re-seeded."""
    store_dir = tmp_path / "store"
    (store_dir / "CURRENT").unlink()
    for version_file in (store_dir / "versions").iterdir():
        version_file.unlink()
    body = {"stable": ["http://127.0.0.1:9101"], "canary": ["http://127.0.0.1:9102"]}
    response = admin.client.put("/api/v1/releases/api", json=body, headers=AUTH)
    assert response.status_code == 503
    assert "lost data" in response.json()["error"]
    assert admin.version() == 0
    assert admin.watcher.version == 1


# -- history ---------------------------------------------------------------------------------


def test_version_history_is_newest_first_with_actors(admin: Admin) -> None:
    """The history lists every version newest first, with the actor that wrote it."""
    admin.stage({"stage": "open"}, **{"X-Turnout-Actor": "ops-ann"})
    admin.stage({"percent": 20}, **{"X-Turnout-Actor": "pm\nbob"})
    history = admin.client.get("/api/v1/versions").json()
    assert history["current"] == 3
    versions = history["versions"]
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert [v["actor"] for v in versions] == ["pmbob", "ops-ann", "seed"]
    assert versions[1]["summary"] == "web: stage beta -> open"
    one = admin.client.get("/api/v1/versions/1").json()
    assert one["document"]["releases"]["web"]["stage"] == "beta"


# -- whole documents and releases ------------------------------------------------------------


def test_put_release_creates_and_validates(admin: Admin) -> None:
    """PUT a release creates it; an invalid upstream is refused naming the field."""
    body = {"stable": ["http://127.0.0.1:9101"], "canary": ["http://127.0.0.1:9102"]}
    created = admin.client.put("/api/v1/releases/api", json=body, headers=AUTH)
    assert created.status_code == 200
    assert created.json()["summary"] == "api: release created"
    bad = {"stable": ["ftp://x"], "canary": ["http://127.0.0.1:9102"]}
    refused = admin.client.put("/api/v1/releases/api", json=bad, headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["field"] == "releases.api.stable.0"
    unknown = admin.client.put("/api/v1/releases/api", json={**body, "colour": 1}, headers=AUTH)
    assert unknown.json()["field"] == "releases.api.colour"
    assert admin.version() == 2


def test_put_config_replaces_the_document(admin: Admin) -> None:
    """PUT /config replaces the content; a broken document is 422 naming the field."""
    new = {**SEED, "version": 77}
    new["releases"] = {"web": {**SEED["releases"]["web"], "stage": "ga"}}
    response = admin.client.put("/api/v1/config", json=new, headers=AUTH)
    assert response.status_code == 200
    assert admin.version() == 2  # the store assigns versions, not the body
    assert admin.document().releases["web"].stage == "ga"
    broken = {**SEED, "routes": [{"host": "*", "path_prefix": "/", "release": "missing"}]}
    refused = admin.client.put("/api/v1/config", json=broken, headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["field"] == "routes.0.release"
    assert admin.version() == 2


def test_releases_list_shows_stage_percent_and_arms(admin: Admin) -> None:
    """The release list carries stage, effective percent, both arms and rollback info."""
    listing = admin.client.get("/api/v1/releases").json()
    assert listing["version"] == 1
    (web,) = listing["releases"]
    assert web["name"] == "web"
    assert web["stage"] == "beta"
    assert web["effective_percent"] == 10.0
    assert web["stable"] == ["http://127.0.0.1:9001"]
    assert web["canary"] == ["http://127.0.0.1:9002"]
    assert web["rollback"] is None


# -- explain ---------------------------------------------------------------------------------


def test_explain_internal_user(admin: Admin) -> None:
    """An allow-listed unit gets the canary with reason TARGETING_MATCH."""
    data = admin.client.get("/api/v1/releases/web/explain", params={"unit_id": "alice"}).json()
    assert data["arm"] == "canary"
    assert data["reason"] == "TARGETING_MATCH"
    assert "internal" in data["explanation"]


def test_explain_split_user(admin: Admin) -> None:
    """Any other unit is placed by its hash position against the threshold."""
    data = admin.client.get("/api/v1/releases/web/explain", params={"unit_id": "user-42"}).json()
    assert data["reason"] == "SPLIT"
    assert data["threshold"] == 10_000
    assert data["arm"] == ("canary" if data["position"] < 10_000 else "stable")
    assert str(data["position"]) in data["explanation"]


def test_explain_needs_a_unit_id(admin: Admin) -> None:
    """Explain without unit_id is refused naming the parameter."""
    response = admin.client.get("/api/v1/releases/web/explain")
    assert response.status_code == 422
    assert response.json()["field"] == "unit_id"


# -- health ----------------------------------------------------------------------------------


def test_readyz_when_serving_store_config(admin: Admin) -> None:
    """Ready and not stale once the store's configuration is applied and confirmed."""
    response = admin.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    assert response.json()["version"] == 1
    assert response.json()["source"] == "store"
    assert response.json()["stale"] is False
    assert admin.client.get("/healthz").status_code == 200


def test_readyz_stale_but_ready_is_200(admin: Admin) -> None:
    """A store that stopped answering leaves the instance ready but marked stale."""
    admin.watcher.connected = False
    response = admin.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["stale"] is True


def test_readyz_without_configuration_is_503(tmp_path: Path, runner: asyncio.Runner) -> None:
    """Before any configuration is loaded, readiness is 503 with the same body shape."""
    store = FileStore(tmp_path / "store")
    watcher = ConfigWatcher(store)
    app = create_admin_app(_settings(tmp_path), store, watcher, CollectorRegistry())
    response = Client(app, runner).get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not_ready"
    assert response.json()["source"] == "default"


def test_metrics_exposition(admin: Admin) -> None:
    """/metrics renders the registry in the Prometheus text format."""
    response = admin.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST


# -- exposure and the token ------------------------------------------------------------------


def test_non_loopback_admin_host_without_token_is_refused(tmp_path: Path) -> None:
    """Listening beyond loopback without a configured token refuses to build the app."""
    store = FileStore(tmp_path / "store")
    settings = _settings(tmp_path, admin_host="0.0.0.0", admin_token=None)
    with pytest.raises(ConfigError) as caught:
        create_admin_app(settings, store, ConfigWatcher(store), CollectorRegistry())
    assert caught.value.field == "admin_host"
    allowed = _settings(tmp_path, admin_host="0.0.0.0")
    create_admin_app(allowed, store, ConfigWatcher(store), CollectorRegistry())


def test_generated_token_file_is_private_and_reused(tmp_path: Path) -> None:
    """Without a configured token one is generated once into <state_dir>/admin-token, 0600."""
    settings = _settings(tmp_path, admin_token=None)
    first = resolve_admin_token(settings)
    path = tmp_path / "state" / "admin-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 32
    assert resolve_admin_token(settings) == first
    assert resolve_admin_token(_settings(tmp_path)) == TOKEN


def test_generated_token_authorises_writes(tmp_path: Path, runner: asyncio.Runner) -> None:
    """An app built without a configured token accepts the token from the generated file."""
    store = FileStore(tmp_path / "store")
    runner.run(store.open())
    settings = _settings(tmp_path, admin_token=None)
    app = create_admin_app(settings, store, ConfigWatcher(store), CollectorRegistry())
    token = (tmp_path / "state" / "admin-token").read_text().strip()
    client = Client(app, runner)
    body = {"stable": ["http://127.0.0.1:1"], "canary": ["http://127.0.0.1:2"]}
    denied = client.put("/api/v1/releases/web", json=body, headers=AUTH)
    ok = client.put("/api/v1/releases/web", json=body, headers={"Authorization": f"Bearer {token}"})
    assert denied.status_code == 401
    assert ok.status_code == 200
    assert ok.json()["version"] == 1


# -- audit -----------------------------------------------------------------------------------


def _audit_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "turnout.audit"]


def test_every_write_attempt_is_audited(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    """Denied, refused and successful writes each leave one structured audit line."""
    caplog.set_level(logging.INFO, logger="turnout.audit")
    admin.client.post("/api/v1/releases/web/stage", json={"stage": "ga"})
    admin.stage({"percent": 150})
    admin.client.post(
        "/api/v1/releases/web/rollback",
        json={"reason": "bad\r\nforged line"},
        headers={**AUTH, "X-Turnout-Actor": "ops"},
    )
    denied, refused, ok = _audit_records(caplog)
    assert (denied["result"], denied["status"], denied["authenticated"]) == ("denied", 401, False)
    assert (refused["result"], refused["status"]) == ("refused", 422)
    assert refused["before_version"] == 1
    assert refused["after_version"] is None
    assert ok["result"] == "ok"
    assert ok["actor"] == "ops"
    assert (ok["action"], ok["target"]) == ("release.rollback", "web")
    assert (ok["before_version"], ok["after_version"]) == (1, 2)
    assert ok["reason"] == "bad\\x0d\\x0aforged line"
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_audit_escape_spells_out_control_characters() -> None:
    """C0, DEL, C1 and Unicode line separators are escaped; printable text is kept."""
    assert escape("a\x00b\x7fc\x85d\u2028e é") == "a\\x00b\\x7fc\\x85d\\u2028e é"


# -- store down: local overrides and re-seed --------------------------------------------------


def test_local_override_rolls_back_this_instance_while_the_store_is_down(
    admin: Admin, tmp_path: Path
) -> None:
    """With the store unreadable, a rollback asking for a local override is served at once (202) and pending."""
    marker = tmp_path / "store" / "CURRENT"
    marker.unlink()
    marker.mkdir()
    plain = admin.client.post(
        "/api/v1/releases/web/rollback", json={"reason": "store down"}, headers=AUTH
    )
    assert plain.status_code == 503
    assert admin.watcher.snapshot.releases["web"].disabled is False
    response = admin.client.post(
        "/api/v1/releases/web/rollback",
        json={"reason": "store down", "local_override": True},
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    assert response.json()["local_override"] is True
    assert admin.watcher.snapshot.releases["web"].disabled is True
    assert admin.watcher.pending_override is True
    assert admin.client.get("/readyz").json()["pending_override"] is True


def test_local_override_flag_must_be_boolean(admin: Admin) -> None:
    """`local_override` other than true/false is refused with 422 naming it; nothing changes."""
    response = admin.stage({"stage": "ga", "local_override": "yes"})
    assert response.status_code == 422
    assert response.json()["field"] == "local_override"
    assert admin.version() == 1


def test_store_reseed_needs_the_token_and_restores_the_emptied_store(
    admin: Admin, tmp_path: Path
) -> None:
    """POST /api/v1/store/reseed: 401 without the token; with it, an emptied store gets version 1 back."""
    store_dir = tmp_path / "store"
    (store_dir / "CURRENT").unlink()
    for version_file in (store_dir / "versions").iterdir():
        version_file.unlink()
    assert admin.client.post("/api/v1/store/reseed").status_code == 401
    assert admin.version() == 0
    response = admin.client.post("/api/v1/store/reseed", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["reseeded"] is True
    assert admin.version() == 1
    again = admin.client.post("/api/v1/store/reseed", headers=AUTH)
    assert again.json()["reseeded"] is False


# -- issue #13: reads off loopback, dry runs, no-change writes, emptying documents -----------


def _admin_on(tmp_path: Path, runner: asyncio.Runner, **overrides: Any) -> Admin:
    store = RacingStore(tmp_path / "store-extra")
    runner.run(store.open())
    runner.run(store.commit(load_document(SEED), expected_version=0, actor="seed", summary="s"))
    watcher = ConfigWatcher(store)
    runner.run(watcher.sync())
    app = create_admin_app(_settings(tmp_path, **overrides), store, watcher, CollectorRegistry())
    return Admin(Client(app, runner), store, watcher, runner)


def test_reads_need_the_token_when_the_listener_is_not_loopback(
    tmp_path: Path, runner: asyncio.Runner
) -> None:
    """On 0.0.0.0 every read but /healthz, /readyz and /metrics is 401 without the token
    (it shows unit ids and backends) and 200 with it."""
    admin = _admin_on(tmp_path, runner, admin_host="0.0.0.0")
    for path in ("/api/v1/releases", "/api/v1/config", "/api/v1/versions"):
        assert admin.client.get(path).status_code == 401, path
        assert admin.client.get(path, headers=AUTH).status_code == 200, path
    explain = "/api/v1/releases/web/explain?unit_id=alice"
    assert admin.client.get(explain).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert admin.client.get(path).status_code == 200, path


def test_metrics_can_be_closed(tmp_path: Path, runner: asyncio.Runner) -> None:
    """`metrics_open: false` puts /metrics behind the token even on loopback; probes stay open."""
    admin = _admin_on(tmp_path, runner, metrics_open=False)
    assert admin.client.get("/metrics").status_code == 401
    assert admin.client.get("/metrics", headers=AUTH).status_code == 200
    assert admin.client.get("/healthz").status_code == 200
    assert admin.client.get("/api/v1/releases").status_code == 200  # loopback reads stay open


def test_identical_replace_makes_no_version(admin: Admin) -> None:
    """PUT of the document already in force answers "no change" and writes no version."""
    response = admin.client.put("/api/v1/config", json=SEED, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["changed"] is False
    assert response.json()["summary"] == "no change"
    assert admin.version() == 1


def test_dry_run_describes_and_writes_nothing(admin: Admin) -> None:
    """`?dry_run=true` validates, lists the changes with the share of units, writes nothing."""
    document = orjson.loads(orjson.dumps(SEED))
    document["releases"]["web"]["stage"] = "ga"
    response = admin.client.put("/api/v1/config?dry_run=true", json=document, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["dry_run"] is True
    assert body["changes"][0]["share"] == pytest.approx(0.9)
    assert "90 % of its units change arm" in body["changes"][0]["text"]
    assert admin.version() == 1
    bad = admin.client.put("/api/v1/config?dry_run=maybe", json=document, headers=AUTH)
    assert (bad.status_code, bad.json()["field"]) == (422, "dry_run")


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"releases": {}, "routes": []}, "routes"),
        (
            {
                "releases": {
                    "api": {"stable": ["http://127.0.0.1:1"], "canary": ["http://127.0.0.1:2"]}
                },
                "routes": [{"host": "*", "path_prefix": "/", "release": "api"}],
            },
            "releases",
        ),
    ],
    ids=["no-routes", "no-release-with-traffic"],
)
def test_emptying_document_is_refused_unless_allowed(
    admin: Admin, document: dict[str, Any], field: str
) -> None:
    """A document that drops every route, or every release that has traffic, is 422 naming
    the field and --allow-empty; with `?allow_empty=true` it is written."""
    refused = admin.client.put("/api/v1/config", json=document, headers=AUTH)
    assert refused.status_code == 422
    assert refused.json()["field"] == field
    assert "allow-empty" in refused.json()["error"]
    assert admin.version() == 1
    allowed = admin.client.put("/api/v1/config?allow_empty=true", json=document, headers=AUTH)
    assert allowed.status_code == 200
    assert admin.version() == 2


def test_release_list_falls_back_to_the_served_snapshot(admin: Admin) -> None:
    """With the store unreadable, GET /api/v1/releases answers from this instance's snapshot,
    marked stale, instead of 503 (so `turnout status` works during an outage)."""
    marker = Path(admin.store.root) / "CURRENT"
    marker.unlink()
    marker.mkdir()
    response = admin.client.get("/api/v1/releases")
    assert response.status_code == 200
    body = response.json()
    assert (body["source"], body["stale"], body["version"]) == ("instance", True, 1)
    assert body["releases"][0]["name"] == "web"
    assert admin.client.get("/api/v1/config").status_code == 503  # the store's own view
