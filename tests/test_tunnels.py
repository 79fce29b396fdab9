"""WebSocket tunnels and guarded delivery, through a real Turnout: open tunnels are counted
per release and arm, an upstream's error close counts against the arm in the guard's
windows, and a rollback closes canary tunnels with 1012 so clients reconnect to stable."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from edge.tunnel import _FrameEdges, close_frame
from tests.harness import LOOPBACK, TurnoutInstance, backends, release_doc, wait_until


def open_tunnels(inst: TurnoutInstance, arm: str) -> float:
    text = httpx.get(f"{inst.admin_url}/metrics").text
    for line in text.splitlines():
        if line.startswith("turnout_websocket_tunnels_open{") and f'arm="{arm}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_rollback_closes_canary_tunnels_with_1012(tmp_path: Path) -> None:
    """At ga every tunnel is a canary tunnel (counted open); an upstream's close with 4001
    counts as a canary error in the guard's windows; after a manual rollback the open canary
    tunnel is closed with 1012 and a reconnect lands on stable."""
    with backends("stable", "canary") as up:
        doc = release_doc(up["stable"].url, up["canary"].url, stage="ga")
        inst = TurnoutInstance(tmp_path, seed=doc, websocket_rollback_grace_s=0.0).start()
        try:
            url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
            headers = {"x-user-id": "u1"}
            with ws_connect(url, additional_headers=headers, open_timeout=5) as ws:
                assert ws.recv(timeout=5).startswith("hello from canary")
                ws.send("close-4001")
                with pytest.raises(Exception):  # noqa: B017 - ConnectionClosed subclasses
                    ws.recv(timeout=5)
            arms = inst.context["edge"].metrics.arms

            def canary_errors() -> int:
                series = arms.series.get(("web", "canary"))  # created by the tunnel's end
                return 0 if series is None else series.current.errors + series.last(60).errors

            assert wait_until(lambda: canary_errors() == 1)
            with ws_connect(url, additional_headers=headers, open_timeout=5) as ws:
                assert ws.recv(timeout=5).startswith("hello from canary")
                assert wait_until(lambda: open_tunnels(inst, "canary") == 1.0)
                resp = httpx.post(
                    f"{inst.admin_url}/api/v1/releases/web/rollback",
                    json={"reason": "test"},
                    headers=inst.auth,
                )
                assert resp.status_code == 200
                with pytest.raises(Exception):  # noqa: B017 - ConnectionClosed subclasses
                    while True:
                        ws.recv(timeout=10)
                assert ws.close_code == 1012
            assert wait_until(lambda: open_tunnels(inst, "canary") == 0.0)
            with ws_connect(url, additional_headers=headers, open_timeout=5) as ws:
                assert ws.recv(timeout=5).startswith("hello from stable")
        finally:
            inst.stop()


def test_maintenance_refuses_upgrades_but_not_the_internal_cohort(tmp_path: Path) -> None:
    """With maintenance on, a WebSocket upgrade is refused with 503; an internal user's
    upgrade still reaches the upstream."""
    with backends("stable", "canary") as up:
        doc = release_doc(
            up["stable"].url,
            up["canary"].url,
            stage="beta",
            internal={"unit_ids": ["staff-1"]},
            maintenance={"enabled": True},
        )
        inst = TurnoutInstance(tmp_path, seed=doc).start()
        try:
            url = f"ws://{LOOPBACK}:{inst.edge_port}/ws"
            with pytest.raises(Exception) as info:
                with ws_connect(url, additional_headers={"x-user-id": "u1"}, open_timeout=5):
                    pass
            assert "503" in str(info.value)
            staff = {"x-user-id": "staff-1"}
            with ws_connect(url, additional_headers=staff, open_timeout=5) as ws:
                assert ws.recv(timeout=5).startswith("hello from canary")
        finally:
            inst.stop()


@pytest.mark.parametrize("split", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_frame_edges_read_the_close_code_however_the_bytes_are_split(
    split: int, masked: bool
) -> None:
    """The upstream's close code is read from the close frame's first two payload bytes
    (unmasked or masked, §5.3), after a data frame, whatever the read boundaries; a close
    frame without a payload is 1005."""
    data = b"\x81\x05hello" + close_frame(4001, "bad", masked=masked)
    edges = _FrameEdges()
    for i in range(0, len(data), split):
        edges.feed(data[i : i + split])
    assert edges.close_code == 4001 and edges.at_boundary
    empty = _FrameEdges()
    empty.feed(b"\x88\x00")
    assert empty.close_code == 1005
