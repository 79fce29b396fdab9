"""The `turnout` CLI against a real admin server (uvicorn on a free 127.0.0.1 port)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from websockets.asyncio.client import connect

from admin.app import create_admin_app
from flags.document import Document, load_document
from stores.filestore import FileStore
from stores.settings import Settings
from stores.watch import ConfigWatcher
from tests.harness import release_doc
from turnout.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, main
from turnout.demo import DemoBackend, demo_document

pytestmark = pytest.mark.timeout(30)

TOKEN = "cli-test-token-0123456789abcdef"
SERVER_START_TIMEOUT_S = 10.0
SEED = release_doc(
    "http://127.0.0.1:9001", "http://127.0.0.1:9002", internal={"unit_ids": ["alice"]}
)


@dataclass
class AdminServer:
    url: str
    store_dir: Path

    def document(self) -> Document:
        revision = asyncio.run(FileStore(self.store_dir).latest())
        assert revision is not None
        return revision.document

    def version(self) -> int:
        return asyncio.run(FileStore(self.store_dir).current_version())


@pytest.fixture(autouse=True)
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI sees no TURNOUT_* variables but a private state directory."""
    for name in ("TURNOUT_ADMIN_URL", "TURNOUT_ADMIN_TOKEN", "TURNOUT_ACTOR"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "cli-state"
    monkeypatch.setenv("TURNOUT_STATE_DIR", str(state))
    return state


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AdminServer]:
    """The admin app under uvicorn in a thread, over a FileStore seeded with release `web`."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store_dir = tmp_path / "store"
    settings = Settings(state_dir=str(tmp_path / "state"), admin_token=SecretStr(TOKEN))
    servers: list[uvicorn.Server] = []
    failure: list[BaseException] = []

    async def run() -> None:
        store = FileStore(store_dir, poll_interval_s=0.05)
        await store.open()
        await store.commit(load_document(SEED), expected_version=0, actor="seed", summary="seed")
        watcher = ConfigWatcher(store, poll_interval_s=0.1)
        await watcher.start()
        app = create_admin_app(settings, store, watcher, CollectorRegistry())
        config = uvicorn.Config(app, lifespan="off", ws="none", http="h11", log_level="warning")
        uv = uvicorn.Server(config)
        servers.append(uv)
        try:
            await uv.serve(sockets=[listener])
        finally:
            await watcher.stop()

    def thread_main() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)

    thread = threading.Thread(target=thread_main, name="admin-server", daemon=True)
    thread.start()
    started = threading.Event()
    while not started.wait(0.01):
        if failure or not thread.is_alive():
            raise RuntimeError(f"admin server did not start: {failure}")
        if servers and servers[0].started:
            started.set()
    try:
        yield AdminServer(f"http://127.0.0.1:{port}", store_dir)
    finally:
        servers[0].should_exit = True
        thread.join(SERVER_START_TIMEOUT_S)
        listener.close()
    assert not failure, failure


def turnout(server: AdminServer, *args: str) -> int:
    return main(["--admin", server.url, "--token", TOKEN, *args])


# -- writes ----------------------------------------------------------------------------------


def test_stage_by_name(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout stage web open` writes version 2 and prints it."""
    assert turnout(server, "stage", "web", "open") == EXIT_OK
    assert "version 2: web: stage beta -> open" in capsys.readouterr().out
    assert server.document().releases["web"].stage == "open"


def test_stage_by_percent(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """A number is a percentage: `turnout stage web 12.5` sets a custom 12.5 %."""
    assert turnout(server, "stage", "web", "12.5") == EXIT_OK
    release = server.document().releases["web"]
    assert (release.stage, release.percent) == ("custom", 12.5)


def test_invalid_stage_is_refused_naming_the_field(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A percentage over 100 exits 1 with the API's message and field; nothing changes."""
    assert turnout(server, "stage", "web", "150") == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "field: percent" in err
    assert "between 0 and 100" in err
    assert server.version() == 1


def test_rollback_then_explain_shows_the_reason(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `rollback`, `explain` shows even an internal user on stable, with the reason."""
    assert turnout(server, "rollback", "web", "--reason", "errors up") == EXIT_OK
    assert "version 2" in capsys.readouterr().out
    assert turnout(server, "explain", "web", "alice") == EXIT_OK
    out = capsys.readouterr().out
    assert "alice -> stable (DISABLED)" in out
    assert "errors up" in out


def test_explain_internal_user(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout explain web alice` says the allow-list puts alice on the canary."""
    assert turnout(server, "explain", "web", "alice") == EXIT_OK
    assert "alice -> canary (TARGETING_MATCH)" in capsys.readouterr().out


def test_status_table(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout status` prints the config version, readiness and one row per release."""
    assert turnout(server, "status") == EXIT_OK
    out = capsys.readouterr().out
    assert "config version 1" in out
    assert "ready" in out
    row = next(line for line in out.splitlines() if line.startswith("web"))
    assert row.split()[:3] == ["web", "beta", "10"]
    assert "http://127.0.0.1:9001" in row
    assert "http://127.0.0.1:9002" in row


def test_versions_and_restore(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`versions` lists the history newest first; `restore 1` brings stage beta back as v3."""
    assert turnout(server, "stage", "web", "ga") == EXIT_OK
    capsys.readouterr()
    assert turnout(server, "versions") == EXIT_OK
    header, newest, oldest = capsys.readouterr().out.splitlines()
    assert header.split() == ["VERSION", "TIME", "ACTOR", "SUMMARY"]
    assert newest.split()[:2] == ["*", "2"]  # * marks the current version
    assert newest.split()[4] == "token"
    assert oldest.split()[0] == "1"
    assert oldest.split()[3] == "seed"
    assert turnout(server, "restore", "1") == EXIT_OK
    assert "version 3: restore content of version 1" in capsys.readouterr().out
    assert server.document().releases["web"].stage == "beta"


def test_if_match_stale_is_refused(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`--if-match` with an old version exits 1 and changes nothing."""
    assert turnout(server, "stage", "web", "open") == EXIT_OK
    assert turnout(server, "stage", "web", "ga", "--if-match", "1") == EXIT_REFUSED
    assert "If-Match" in capsys.readouterr().err
    assert server.document().releases["web"].stage == "open"
    assert turnout(server, "stage", "web", "ga", "--if-match", "2") == EXIT_OK


# -- apply / get -----------------------------------------------------------------------------


def test_apply_yaml_file(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`turnout apply FILE` replaces the document from a YAML file."""
    document = json.loads(json.dumps(SEED))
    document["releases"]["web"]["stage"] = "open"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    assert turnout(server, "apply", str(path)) == EXIT_OK
    assert "version 2: document replaced" in capsys.readouterr().out
    assert server.document().releases["web"].stage == "open"


def test_apply_invalid_file_names_the_field(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid document exits 1, names the failing field and writes nothing."""
    document = json.loads(json.dumps(SEED))
    document["routes"][0]["release"] = "missing"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    assert turnout(server, "apply", str(path)) == EXIT_REFUSED
    assert "field: routes.0.release" in capsys.readouterr().err
    assert server.version() == 1


def test_apply_unreadable_file_is_a_usage_error(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or non-mapping file exits 2 before anything is sent."""
    assert turnout(server, "apply", str(tmp_path / "nope.yaml")) == EXIT_USAGE
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert turnout(server, "apply", str(listing)) == EXIT_USAGE
    assert server.version() == 1


def test_get_prints_the_document(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout get` prints the current document as JSON."""
    assert turnout(server, "get") == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1
    assert printed["releases"]["web"]["stage"] == "beta"


# -- configuration of the client -------------------------------------------------------------


def test_write_without_token_is_refused(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without any token a write exits 1 with the 401 and a hint where the token comes from."""
    assert main(["stage", "web", "ga", "--admin", server.url]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "HTTP 401" in err
    assert "TURNOUT_ADMIN_TOKEN" in err
    assert server.version() == 1


def test_url_and_token_from_the_environment(
    server: AdminServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TURNOUT_ADMIN_URL and TURNOUT_ADMIN_TOKEN replace --admin and --token."""
    monkeypatch.setenv("TURNOUT_ADMIN_URL", server.url)
    monkeypatch.setenv("TURNOUT_ADMIN_TOKEN", TOKEN)
    assert main(["stage", "web", "ga"]) == EXIT_OK
    assert server.document().releases["web"].stage == "ga"


def test_token_from_the_state_dir_file(
    server: AdminServer, cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --token or the variable, <TURNOUT_STATE_DIR>/admin-token is used."""
    cli_env.mkdir()
    (cli_env / "admin-token").write_text(TOKEN + "\n")
    assert main(["--admin", server.url, "rollback", "web", "--reason", "r"]) == EXIT_OK
    assert server.document().releases["web"].stage == "off"


def test_unreachable_admin_api_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """A closed port exits 3 with one line naming the URL and no traceback."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    assert main(["--admin", url, "status"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert url in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [["stage", "web"], ["restore", "abc"], ["rollback", "web"], ["frobnicate"], []],
    ids=["missing-value", "bad-version", "missing-reason", "unknown-command", "no-command"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Bad arguments exit 2 without contacting anything."""
    assert main(argv) == EXIT_USAGE


def test_bad_admin_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An admin URL without http:// or https:// exits 2."""
    assert main(["--admin", "127.0.0.1:8081", "status"]) == EXIT_USAGE
    assert "http://" in capsys.readouterr().err


# -- the demo's parts ------------------------------------------------------------------------


def test_demo_seed_document_is_valid() -> None:
    """The demo's release `web` passes the document's whole validation."""
    document = load_document(demo_document("http://127.0.0.1:1", "http://127.0.0.1:2"))
    release = document.releases["web"]
    assert (release.stage, release.internal.unit_ids) == ("beta", ("alice",))


def test_demo_backend_answers_keep_alive_and_websocket() -> None:
    """A demo backend reports its version and the edge's headers over one keep-alive
    connection, and echoes WebSocket messages on /ws prefixed with its version."""

    async def scenario() -> tuple[list[Any], list[str], set[str]]:
        backend = DemoBackend("canary")
        await backend.start()
        try:
            async with httpx.AsyncClient(base_url=backend.url) as client:
                answers = []
                connection_headers = set()
                for path in ("/a", "/b"):
                    response = await client.get(
                        path, headers={"X-User-Id": "u1", "X-Turnout-Arm": "canary"}
                    )
                    answers.append(response.json())
                    connection_headers.add(response.headers["connection"])
            async with connect(f"ws://127.0.0.1:{backend.port}/ws") as ws:
                await ws.send("hello")
                echoes = [str(await ws.recv())]
        finally:
            await backend.close()
        return answers, echoes, connection_headers

    answers, echoes, connection_headers = asyncio.run(scenario())
    assert answers[0] == {"version": "canary", "path": "/a", "user": "u1", "arm_header": "canary"}
    assert answers[1]["path"] == "/b"
    assert connection_headers == {"keep-alive"}
    assert echoes == ["canary: hello"]


def test_rollback_local_while_the_store_is_down_is_applied_here(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rollback --local` with the store unreadable: the API accepts a local override and says so; plain rollback is refused."""
    marker = server.store_dir / "CURRENT"
    marker.unlink()
    marker.mkdir()  # the store can no longer be read
    assert turnout(server, "rollback", "web", "--reason", "store down") == EXIT_REFUSED
    assert "503" in capsys.readouterr().err
    assert turnout(server, "rollback", "web", "--reason", "store down", "--local") == EXIT_OK
    assert "local override on this instance" in capsys.readouterr().out


def test_store_reseed_repairs_a_pointer_that_went_backwards(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`turnout store reseed` writes the served version back over a regressed pointer, once."""
    assert turnout(server, "stage", "web", "open") == EXIT_OK
    assert server.version() == 2
    (server.store_dir / "CURRENT").write_text("1")  # restored from an old backup, say
    capsys.readouterr()
    assert turnout(server, "store", "reseed") == EXIT_OK  # the watcher only alarms on this
    assert "re-seeded with version 2" in capsys.readouterr().out
    assert server.version() == 2
    assert server.document().releases["web"].stage == "open"
    assert turnout(server, "store", "reseed") == EXIT_OK
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["file", "environment"])
def test_serve_with_the_removed_edge_server_setting_fails_in_one_line(
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`edge_server` (in the settings file or as TURNOUT_EDGE_SERVER) stops `turnout serve`
    before anything starts, with one line naming the replacement (workers: N)."""
    args = ["serve"]
    if source == "file":
        config = tmp_path / "turnout.yaml"
        config.write_text(f"edge_server: uvicorn\nstate_dir: {tmp_path / 'state'}\n")
        args += ["--config", str(config)]
    else:
        monkeypatch.setenv("TURNOUT_EDGE_SERVER", "turnout")
        monkeypatch.setenv("TURNOUT_STATE_DIR", str(tmp_path / "state"))
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "edge_server was removed" in err and "use workers: N" in err
    assert not (tmp_path / "state").exists()  # nothing was started or written
