"""The `turnout` CLI against a real admin server (uvicorn on a free 127.0.0.1 port)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from websockets.asyncio.client import connect

from admin.app import create_admin_app
from flags.document import Document, load_document
from stores.filestore import FileStore
from stores.settings import Settings
from stores.watch import ConfigWatcher
from tests.harness import TurnoutInstance, release_doc
from tests.redisproc import redis_server
from turnout.cli import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, build_parser, main
from turnout.demo import DemoBackend, demo_document

pytestmark = pytest.mark.timeout(30)

TOKEN = "cli-test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
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
    path.write_text(json.dumps(document))
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


# -- issue #13: safe changes, errors a person can act on, a tool people live in ---------------

README_STYLE_DOCUMENT = """\
stages: {off: 0, internal: 0, beta: 10, open: 50, ga: 100}
releases:
  web:
    stable: ["http://127.0.0.1:9001"]
    canary: ["http://127.0.0.1:9002"]
    stage: STAGE
    internal: {unit_ids: [alice]}
routes:
  - {host: "*", path_prefix: "/", release: web}
"""


def _yaml_file(tmp_path: Path, stage: str, name: str = "routing.yaml") -> Path:
    path = tmp_path / name
    path.write_text(README_STYLE_DOCUMENT.replace("STAGE", stage))
    return path


def test_validate_reads_yaml_1_2_and_names_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`turnout validate` accepts `stage: off` (a string in YAML 1.2), refuses a duplicate key
    with its line and an invalid field by name; no server is involved."""
    assert main(["validate", str(_yaml_file(tmp_path, "off"))]) == EXIT_OK
    assert "valid (1 releases, 1 routes)" in capsys.readouterr().out
    twice = tmp_path / "twice.yaml"
    twice.write_text(README_STYLE_DOCUMENT.replace("STAGE", "beta") + "releases: {}\n")
    assert main(["validate", str(twice)]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert (
        'line 10, column 1: duplicate key "releases" (in the mapping that starts at line 1)' in err
    )
    bad = _yaml_file(tmp_path, "sideways", "bad.yaml")
    assert main(["validate", str(bad), "-o", "json"]) == EXIT_REFUSED
    result = json.loads(capsys.readouterr().out)
    assert (result["valid"], result["field"]) == (False, "releases.web.stage")
    assert main(["validate", str(tmp_path / "missing.yaml")]) == EXIT_REFUSED
    assert "no such file" in capsys.readouterr().err


def test_apply_yaml_with_stage_off_and_diff(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply` of a YAML file with `stage: off` sets the stage off and prints what changed;
    `diff` shows the same change with the exact share of units."""
    assert turnout(server, "apply", str(_yaml_file(tmp_path, "off"))) == EXIT_OK
    out = capsys.readouterr().out
    assert "version 2: document replaced" in out
    assert "10 % of its units change arm (exact" in out
    assert server.document().releases["web"].stage == "off"
    assert turnout(server, "diff") == EXIT_OK
    out = capsys.readouterr().out
    assert "version 1 -> 2:" in out
    assert "release web: stage beta (10 %) -> off (0 %)" in out
    assert turnout(server, "diff", "1", "2", "-o", "json") == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["changes"][0]["share"] == pytest.approx(0.1)


def test_apply_dry_run_and_identical_apply_write_nothing(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--dry-run` describes the change and writes nothing; applying the document in force
    says "no change" and writes no version."""
    assert turnout(server, "apply", str(_yaml_file(tmp_path, "ga")), "--dry-run") == EXIT_OK
    out = capsys.readouterr().out
    assert "90 % of its units change arm" in out
    assert "nothing was written" in out
    assert server.version() == 1
    assert turnout(server, "apply", str(_yaml_file(tmp_path, "beta"))) == EXIT_OK
    assert "no change" in capsys.readouterr().out
    assert server.version() == 1


def test_apply_of_an_empty_document_needs_allow_empty(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`releases: {}` + `routes: []` is refused (every user would get 404) unless
    --allow-empty."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("releases: {}\nroutes: []\n")
    assert turnout(server, "apply", str(empty)) == EXIT_REFUSED
    assert "--allow-empty" in capsys.readouterr().err
    assert server.version() == 1
    assert turnout(server, "apply", str(empty), "--allow-empty") == EXIT_OK
    assert server.version() == 2


def test_apply_duplicate_key_is_refused_before_sending(
    server: AdminServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `web:` entries (the second at ga) never reach the server: exit 2 with the line."""
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(
        README_STYLE_DOCUMENT.replace("STAGE", "beta").replace(
            "routes:",
            "  web: {stable: ['http://127.0.0.1:9001'], canary: ['http://127.0.0.1:9002'], stage: ga}\nroutes:",
        )
    )
    assert turnout(server, "apply", str(doubled)) == EXIT_USAGE
    assert 'duplicate key "web"' in capsys.readouterr().err
    assert server.version() == 1


@pytest.mark.parametrize("value", ["-5", "150", "-0.5", "101%"])
def test_out_of_range_percentage_gets_the_range_message(
    server: AdminServer, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stage web -5` is a percentage out of range, not an unknown stage."""
    assert turnout(server, "stage", "web", value) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "between 0 and 100" in err
    assert "unknown stage" not in err


def test_write_refused_for_a_store_outage_suggests_local(
    server: AdminServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage change refused with 503 (store down) tells the operator about --local."""
    marker = server.store_dir / "CURRENT"
    marker.unlink()
    marker.mkdir()
    assert turnout(server, "stage", "web", "off") == EXIT_REFUSED
    assert "add --local" in capsys.readouterr().err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout --version` prints the version and exits 0."""
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("turnout ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                for inner, subsub in _subparsers(sub).items():
                    found[f"{name} {inner}"] = subsub
    return found


def test_every_argument_has_help_and_every_command_examples() -> None:
    """Each option and positional of every command has help text, and each command's help
    ends with an examples section."""
    commands = _subparsers(build_parser())
    assert {"serve", "demo", "validate", "apply", "diff", "status", "store reseed"} <= set(commands)
    for name, sub in commands.items():
        assert sub.epilog and sub.epilog.startswith("examples:"), name
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.dest} has no help"


def test_nested_help_is_the_subcommands_own(capsys: pytest.CaptureFixture[str]) -> None:
    """`turnout store reseed --help` prints reseed's help, not store's."""
    assert main(["store", "reseed", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("usage: turnout store reseed")
    assert "at the same version" in " ".join(out.split())


def test_url_and_token_from_the_settings_file_in_any_directory(
    server: AdminServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With `--config` (or TURNOUT_CONFIG) naming the instance's settings file, the CLI finds
    the admin port and token from any working directory."""
    port = server.url.rsplit(":", 1)[1]
    settings = tmp_path / "etc" / "settings.yaml"
    settings.parent.mkdir()
    settings.write_text(f"admin_host: 127.0.0.1\nadmin_port: {port}\nadmin_token: {TOKEN}\n")
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["--config", str(settings), "stage", "web", "open"]) == EXIT_OK
    monkeypatch.setenv("TURNOUT_CONFIG", str(settings))
    assert main(["stage", "web", "ga"]) == EXIT_OK
    assert server.document().releases["web"].stage == "ga"


def test_token_file_next_to_the_settings_file(
    server: AdminServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A relative state_dir in the settings file also finds the generated token file from
    another directory (relative to the settings file)."""
    port = server.url.rsplit(":", 1)[1]
    home = tmp_path / "deploy"
    (home / "state").mkdir(parents=True)
    (home / "state" / "admin-token").write_text(TOKEN + "\n")
    settings = home / "settings.yaml"
    settings.write_text(f"admin_port: {port}\nstate_dir: state\n")
    monkeypatch.delenv("TURNOUT_STATE_DIR")
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(settings), "rollback", "web", "--reason", "drill"]) == EXIT_OK


def test_read_commands_speak_json(server: AdminServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`--output json` on status, versions and explain prints one JSON document for scripts."""
    assert turnout(server, "status", "-o", "json") == EXIT_OK
    status = json.loads(capsys.readouterr().out)
    assert status["config"]["releases"][0]["name"] == "web"
    assert status["instance"]["status"] == "ready"
    assert turnout(server, "versions", "--output", "json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["current"] == 1
    assert turnout(server, "explain", "web", "alice", "-o", "json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["arm"] == "canary"


def test_explain_names_the_email_domain_rule() -> None:
    """A unit placed by its e-mail domain is explained as such, not as the allow-list."""
    from flags.evaluate import compile_snapshot, explain

    raw = release_doc(
        "http://127.0.0.1:1", "http://127.0.0.1:2", internal={"email_domains": ["example.com"]}
    )
    snapshot = compile_snapshot(load_document(raw))
    result = explain(snapshot, "web", "bob", "bob@example.com")
    assert result["arm"] == "canary"
    assert "e-mail domain example.com" in str(result["explanation"])
    assert "allow-list" not in str(result["explanation"])


def _turnout_process(
    *argv: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turnout.cli", *argv],
        cwd=cwd,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")},
            "PYTHONPATH": str(REPO),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("which", ["edge", "admin"])
def test_busy_port_is_one_line_naming_the_setting(tmp_path: Path, which: str) -> None:
    """`turnout serve` on a port already taken exits 2 with one line naming the setting, the
    flag and the port: no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            free = other.getsockname()[1]
        result = _turnout_process(
            "serve",
            "--edge-port",
            str(busy if which == "edge" else free),
            "--admin-port",
            str(busy if which == "admin" else free),
            cwd=tmp_path,
            env={"TURNOUT_STATE_DIR": str(tmp_path / "state")},
        )
    assert result.returncode == EXIT_USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{which}_port: port {busy}" in lines[0]
    assert f"--{which}-port" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("settings_text", "words"),
    [
        ("edge_port: 1\nedge_port: 2\n", "duplicate key"),
        ("edge_port: [1]\n", "edge_port: must be a whole number"),
        ("seed_file: missing.yaml\n", "seed_file: "),
        ("access_log: /nonexistent-dir/x/access.log\n", "access_log: cannot open"),
        ("state_dir: /proc/no-such-dir\n", "state_dir: cannot create or write /proc/"),
        ("store: bogus://x\n", "store: must be a directory path or a URL"),
        (
            "seed: {releases: {web: {stable: [x], canary: [y]}}}\n",
            "seed: the inline seed: releases.web.stable.0: upstream must be an http",
        ),
    ],
    ids=[
        "duplicate",
        "bad-value",
        "missing-seed",
        "unwritable-access-log",
        "unwritable-state-dir",
        "unknown-store-scheme",
        "invalid-inline-seed",
    ],
)
def test_startup_failures_are_one_line(tmp_path: Path, settings_text: str, words: str) -> None:
    """A wrong setting or an unreadable file stops `turnout serve` with one line naming it."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = (a.getsockname()[1], b.getsockname()[1])
    config = tmp_path / "settings.yaml"
    lines = [f"admin_port: {ports[1]}\n", settings_text]
    if "edge_port" not in settings_text:
        lines.append(f"edge_port: {ports[0]}\n")
    if "state_dir" not in settings_text:
        lines.append(f"state_dir: {tmp_path / 'state'}\n")
    config.write_text("".join(lines))
    result = _turnout_process("serve", "--config", str(config), cwd=tmp_path, env={})
    assert result.returncode == EXIT_USAGE, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("turnout:")]
    assert len(errors) == 1, result.stderr
    assert words in errors[0]
    assert "Traceback" not in result.stderr
    assert "pydantic" not in result.stderr


def test_status_answers_while_redis_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the instance's redis-server killed, `turnout status` still answers from the
    instance's own snapshot, says the store is unreachable and marks it stale."""
    with redis_server(tmp_path) as redis_proc:
        instance = TurnoutInstance(
            tmp_path / "instance",
            store=redis_proc.url,
            seed=SEED,
            poll_interval_s=0.2,
            access_log="off",
        )
        instance.start()
        try:
            assert main(["--admin", instance.admin_url, "status"]) == EXIT_OK
            assert "config version 1" in capsys.readouterr().out
            redis_proc.kill9()
            assert (
                main(["--admin", instance.admin_url, "--token", instance.token, "status"])
                == EXIT_OK
            )
            out = capsys.readouterr().out
            assert "store unreachable" in out
            assert "version 1 (stale)" in out
            assert (
                next(line for line in out.splitlines() if line.startswith("web")).split()[1]
                == "beta"
            )
        finally:
            instance.stop()


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


def test_serve_and_its_workers_do_not_load_httpx() -> None:
    """`turnout serve`, its supervisor and its edge workers never import httpx (only the
    client commands and webhooks do): a worker's memory counts (issue #9)."""
    code = (
        "import sys, turnout.cli, turnout.server, turnout.workers, turnout.edgeworker; "
        "sys.exit('httpx' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
