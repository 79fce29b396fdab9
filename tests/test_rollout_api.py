"""Guarded delivery from outside, through a real Turnout: maintenance mode on the edge (503 +
Retry-After, JSON or HTML by Accept, the internal cohort passes), the plan commands, the
health and status views, the event stream; and webhooks to real receivers (signed, retried,
never blocking)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from stores.events import EventBus
from stores.webhooks import Notifier
from tests.harness import ThreadedServer, TurnoutInstance, backends, release_doc, wait_until

PLAN = {
    "phases": [
        {"percent": 5.0, "min_duration_s": 3600},
        {"stage": "open", "advance": "approve"},
        {"stage": "ga"},
    ],
    "approvers": ["alice"],
}


@pytest.fixture
def turnout(tmp_path: Path) -> Iterator[TurnoutInstance]:
    with backends("stable", "canary") as up:
        doc = release_doc(
            up["stable"].url,
            up["canary"].url,
            stage="off",
            internal={"unit_ids": ["staff-1"]},
            plan=PLAN,
        )
        inst = TurnoutInstance(tmp_path, seed=doc).start()
        try:
            yield inst
        finally:
            inst.stop()


def post(
    inst: TurnoutInstance, path: str, body: dict[str, Any] | None = None, actor: str = "ops"
) -> httpx.Response:
    headers = {**inst.auth, "x-turnout-actor": actor}
    return httpx.post(f"{inst.admin_url}{path}", json=body or {}, headers=headers, timeout=5)


def test_maintenance_mode(turnout: TurnoutInstance) -> None:
    """Per-release maintenance: 503 with Retry-After, JSON for Accept: application/json and a
    short HTML page otherwise; the internal cohort still reaches the upstream; off again
    restores traffic; a bad value is refused naming the field; all of it as versions."""
    inst = turnout
    bad = post(inst, "/api/v1/releases/web/maintenance", {"enabled": True, "retry_after_s": 0})
    assert (
        bad.status_code == 422 and bad.json()["field"] == "releases.web.maintenance.retry_after_s"
    )
    on = post(
        inst,
        "/api/v1/releases/web/maintenance",
        {"enabled": True, "retry_after_s": 120, "message": "back <soon>"},
    )
    assert on.status_code == 200
    with httpx.Client(base_url=inst.edge_url, timeout=5) as client:
        assert wait_until(lambda: client.get("/").status_code == 503, timeout=10)
        as_json = client.get("/", headers={"accept": "application/json", "x-user-id": "u1"})
        assert as_json.status_code == 503 and as_json.headers["retry-after"] == "120"
        assert as_json.json() == {
            "error": "maintenance",
            "message": "back <soon>",
            "retry_after_s": 120,
        }
        as_html = client.get("/", headers={"accept": "text/html,*/*", "x-user-id": "u1"})
        assert as_html.headers["content-type"].startswith("text/html")
        assert "back &lt;soon&gt;" in as_html.text
        staff = client.get("/", headers={"x-user-id": "staff-1"})
        assert staff.status_code == 200
        assert post(inst, "/api/v1/maintenance", {"enabled": True}).status_code == 200
        assert post(inst, "/api/v1/releases/web/maintenance", {"enabled": False}).status_code == 200
        # The document-wide switch still holds every route.
        assert wait_until(lambda: client.get("/").status_code == 503, timeout=10)
        assert post(inst, "/api/v1/maintenance", {"enabled": False}).status_code == 200
        assert wait_until(lambda: client.get("/").status_code == 200, timeout=10)
    versions = httpx.get(f"{inst.admin_url}/api/v1/versions").json()["versions"]
    assert sum("maintenance" in v["summary"] for v in versions) == 4


def test_plan_commands_and_views(turnout: TurnoutInstance) -> None:
    """start moves the release to phase 0; pause/resume; approve refuses someone who is not an
    approver (and a plan not waiting); abort rolls back; health and status show the phase,
    the samples and the criteria; each command is a version."""
    inst = turnout
    started = post(inst, "/api/v1/releases/web/plan/start")
    assert started.status_code == 200, started.text
    release = httpx.get(f"{inst.admin_url}/api/v1/releases/web").json()["release"]
    assert release["stage"] == "custom" and release["percent"] == 5.0
    assert release["plan"]["state"]["status"] == "running"
    again = post(inst, "/api/v1/releases/web/plan/start")
    assert again.status_code == 422 and again.json()["field"] == "releases.web.plan.state"
    not_waiting = post(inst, "/api/v1/releases/web/plan/approve", actor="alice")
    assert not_waiting.status_code == 422
    assert post(inst, "/api/v1/releases/web/plan/pause").status_code == 200
    assert post(inst, "/api/v1/releases/web/plan/resume").status_code == 200
    assert post(inst, "/api/v1/releases/web/plan/jump").status_code == 404

    def healthy_view() -> bool:
        view = httpx.get(f"{inst.admin_url}/api/v1/releases/web/health").json()
        return view.get("plan", {}).get("status") == "running" and view["guarded"]

    assert wait_until(healthy_view, timeout=10)
    view = httpx.get(f"{inst.admin_url}/api/v1/releases/web/health").json()
    assert view["plan"]["phase"] == 0 and "time_in_phase_s" in view["plan"]
    assert set(view["plan"]["samples"]) == {"canary", "stable"}
    assert set(view["windows"]) == {"2", "5", "10", "30", "60"}
    status = httpx.get(f"{inst.admin_url}/api/v1/status").json()
    assert [r["release"] for r in status["releases"]] == ["web"]
    assert httpx.get(f"{inst.admin_url}/api/v1/releases/nope/health").status_code == 404
    aborted = post(inst, "/api/v1/releases/web/plan/abort", {"reason": "bad idea"})
    assert aborted.status_code == 200
    release = httpx.get(f"{inst.admin_url}/api/v1/releases/web").json()["release"]
    assert release["stage"] == "off" and release["plan"]["state"]["status"] == "aborted"


def test_event_stream(turnout: TurnoutInstance) -> None:
    """GET /api/v1/events is text/event-stream and carries a new version as an event."""
    inst = turnout
    got: list[str] = []

    def read() -> None:
        with httpx.stream("GET", f"{inst.admin_url}/api/v1/events", timeout=10) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                got.append(line)
                if line.startswith("data:") and "plan started" in line:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: bool(got), timeout=10)
    assert post(inst, "/api/v1/releases/web/plan/start").status_code == 200
    reader.join(10)
    assert "event: version" in got
    data = [orjson.loads(line[5:]) for line in got if line.startswith("data:")]
    assert data[-1]["data"]["summary"].startswith("web: plan started")


class Receiver:
    """A webhook receiver: answers `statuses` in turn (then 200), or hangs when told to."""

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.hang = hang
        self.calls: list[tuple[dict[str, str], bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.calls.append((headers, body))
        if self.hang:
            await asyncio.sleep(30)
        status = self.statuses.pop(0) if self.statuses else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_webhooks_are_signed_retried_and_never_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver answering 500 twice gets the event on the third try, signed with
    HMAC-SHA256 over "<timestamp>.<body>"; a hanging receiver never delays `notify` (the
    publisher returns at once) and gives up within its bounds."""
    monkeypatch.setattr("stores.webhooks.BACKOFF_FIRST_S", 0.01)
    flaky = Receiver([500, 500])
    hanging = Receiver(hang=True)
    servers = [
        ThreadedServer(flaky, http="h11").start(),
        ThreadedServer(hanging, http="h11").start(),
    ]
    try:

        async def main() -> tuple[Notifier, int]:
            notifier = Notifier(
                [servers[1].url, servers[0].url],
                b"s3cret",
                timeout_s=0.3,
                max_attempts=3,
                deadline_s=5,
            )
            bus = EventBus()
            bus.hooks.append(notifier.notify)
            notifier.start()
            bus.publish("guard.rollback", {"release": "web"})
            # publish returned without any I/O: the event waits on the queue for the worker.
            queued = notifier.queue.qsize() + len(flaky.calls) + len(hanging.calls)
            for _ in range(500):
                if notifier.delivered + notifier.failed >= 2:
                    break
                await asyncio.sleep(0.02)
            await notifier.aclose()
            return notifier, queued

        notifier, queued = asyncio.run(main())
        assert queued == 1
        assert notifier.delivered == 1 and notifier.failed == 1
        assert len(flaky.calls) == 3 and len(hanging.calls) == 3
        headers, body = flaky.calls[-1]
        expected = hmac.new(
            b"s3cret", headers["x-turnout-timestamp"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        assert headers["x-turnout-signature"] == f"sha256={expected}"
        assert headers["x-turnout-event"] == "guard.rollback"
        assert orjson.loads(body)["data"] == {"release": "web"}
    finally:
        for server in servers:
            server.stop()


def test_cli_plan_status_and_maintenance(
    turnout: TurnoutInstance, capsys: pytest.CaptureFixture[str]
) -> None:
    """`turnout plan web start`, `turnout status web` (phase, time in phase, samples, criteria
    vs thresholds, verdict), `turnout maintenance on web`, and a refused approval naming the
    field, through the real admin API."""
    from turnout.cli import main

    inst = turnout
    common = ["--admin", inst.admin_url, "--token", inst.token]
    assert main(["plan", "web", "start", *common]) == 0
    assert "plan started at phase 0" in capsys.readouterr().out
    assert main(["plan", "web", "approve", *common, "--actor", "mallory"]) != 0
    assert "nothing to approve" in capsys.readouterr().err

    def shows_plan() -> bool:
        assert main(["status", "web", *common]) == 0
        out = capsys.readouterr().out
        return "plan: running, phase 0 of 3" in out and "verdict" in out

    assert wait_until(shows_plan, timeout=10)
    assert main(["status", *common]) == 0
    assert "web: guard verdict" in capsys.readouterr().out  # one line per guarded release
    assert main(["maintenance", "on", "web", "--retry-after", "60", *common]) == 0
    assert "maintenance on for web" in capsys.readouterr().out
    assert main(["maintenance", "off", *common]) == 0
    assert "maintenance off for everything" in capsys.readouterr().out


def test_webhook_settings_are_checked() -> None:
    """webhook_urls need http(s) URLs and a webhook_secret (every delivery is signed); the
    error names the setting."""
    from pydantic import ValidationError

    from stores.settings import Settings

    with pytest.raises(ValidationError, match="webhook_secret is required"):
        Settings(webhook_urls=["https://hooks.example/turnout"])
    with pytest.raises(ValidationError, match="webhook_urls"):
        Settings(webhook_urls=["ftp://hooks.example"], webhook_secret="s")
    ok = Settings(webhook_urls=["https://hooks.example/turnout"], webhook_secret="s")
    notifier = Notifier.from_settings(ok)
    assert notifier is not None and notifier.secret == b"s"
    assert Notifier.from_settings(Settings()) is None
