"""CLI commands for guarded delivery (issue #10), registered from `turnout/cli.py`.

turnout plan RELEASE start|pause|resume|approve|abort [--reason TEXT]
turnout status [RELEASE]        RELEASE: phase, time in phase, samples per arm, each
                                criterion's value against its threshold, the verdict
turnout maintenance on|off [RELEASE] [--retry-after S] [--message TEXT]
"""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
PLAN_ACTIONS = ("start", "pause", "resume", "approve", "abort")

ClientCommand = Callable[[Any, argparse.Namespace], int]
Register = Callable[..., argparse.ArgumentParser]


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _written(data: Any) -> None:
    print(f"version {data.get('version')}: {data.get('summary', '')}")


def _value(criterion: str, value: Any, *, threshold: bool = False) -> str:
    """A criterion's figure: rates in %, latencies in ms, the p99 ratio's threshold as a
    factor (its canary and stable figures are their p99s, in ms)."""
    if not isinstance(value, (int, float)):
        return "-"
    if criterion in ("error_rate", "error_rate_increase"):
        return f"{value:.2%}"
    if criterion == "p99_ratio" and threshold:
        return f"{value:g}x"
    return f"{value:g} ms"


def cmd_plan(client: Any, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.reason:
        body["reason"] = args.reason
    if args.action == "abort" and not args.reason:
        body["reason"] = "aborted from the CLI"
    path = f"/api/v1/releases/{_quote(args.release)}/plan/{args.action}"
    _written(client.write("POST", path, body, args.if_match))
    return EXIT_OK


def cmd_maintenance(client: Any, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"enabled": args.state == "on"}
    if args.retry_after is not None:
        body["retry_after_s"] = args.retry_after
    if args.message is not None:
        body["message"] = args.message
    if args.release:
        path = f"/api/v1/releases/{_quote(args.release)}/maintenance"
    else:
        path = "/api/v1/maintenance"
    _written(client.write("POST", path, body, args.if_match))
    return EXIT_OK


def print_health(view: dict[str, Any]) -> None:
    """The guard's view of one release, as `turnout status RELEASE` prints it."""
    print(
        f"release {view.get('release')}: stage {view.get('stage')}, config version "
        f"{view.get('version')}, verdict {str(view.get('verdict')).upper()} "
        f"({'guarded' if view.get('guarded') else 'not guarded'}, judged on "
        f"{view.get('scope')} traffic)"
    )
    plan = view.get("plan")
    if isinstance(plan, dict):
        spec = plan.get("phase_spec", {})
        where = spec.get("stage") or f"{spec.get('percent')} %"
        in_phase = plan.get("time_in_phase_s")
        samples = plan.get("samples", {})
        print(
            f"plan: {plan.get('status')}, phase {plan.get('phase')} of {plan.get('phases')} "
            f"({where}, advance {spec.get('advance')}), "
            f"time in phase {in_phase if in_phase is not None else '-'} s "
            f"(min {spec.get('min_duration_s')} s), samples canary {samples.get('canary')} / "
            f"stable {samples.get('stable')} (min {spec.get('min_samples')} each)"
        )
        if plan.get("note"):
            print(f"  {plan.get('note')}")
    windows = view.get("windows", {})
    if windows:
        print("window  arm     requests  errors   p95 ms   p99 ms")
        for h in sorted(windows, key=int):
            for arm in ("canary", "stable"):
                f = windows[h][arm]
                print(
                    f"{h + ' s':<7} {arm:<7} {f['requests']:>8}  {f['error_rate']:>6.2%}  "
                    f"{f['p95_ms']:>7g}  {f['p99_ms']:>7g}"
                )
    criteria = view.get("criteria", [])
    if criteria:
        print(
            "criterion            verdict       canary      stable      threshold  window  samples"
        )
        for c in criteria:
            name = str(c.get("criterion"))
            print(
                f"{name:<20} {str(c.get('status')):<13} {_value(name, c.get('canary_value')):>10}  "
                f"{_value(name, c.get('stable_value')):>10}  "
                f"{_value(name, c.get('threshold'), threshold=True):>10}  "
                f"{c.get('window_s'):>4} s  {c.get('canary_samples')}"
            )
    rollback = view.get("rollback")
    if isinstance(rollback, dict):
        print(f"rolled back from {rollback.get('from_stage')}: {rollback.get('reason')}")


def print_guard_lines(status: dict[str, Any]) -> None:
    """One line per guarded release or running plan under `turnout status`."""
    for view in status.get("releases", []):
        plan = view.get("plan")
        if not view.get("guarded") and not isinstance(plan, dict):
            continue
        line = f"{view.get('release')}: guard verdict {str(view.get('verdict')).upper()}"
        if isinstance(plan, dict):
            samples = plan.get("samples", {})
            line += (
                f"; plan {plan.get('status')} phase {plan.get('phase')}/{plan.get('phases')}, "
                f"{plan.get('time_in_phase_s')} s in phase, samples canary "
                f"{samples.get('canary')} / stable {samples.get('stable')}"
            )
        print(line)


def register(commands: Any, client_command: Register) -> None:
    """Add `plan` and `maintenance`, and teach `status` an optional RELEASE."""
    plan = client_command("plan", "run a release's phase plan", cmd_plan, writes=True)
    plan.add_argument("release")
    plan.add_argument("action", choices=PLAN_ACTIONS)
    plan.add_argument("--reason", help="recorded with the change (abort: why)")

    maintenance = client_command(
        "maintenance",
        "503 + Retry-After for all but the internal cohort",
        cmd_maintenance,
        writes=True,
    )
    maintenance.add_argument("state", choices=["on", "off"])
    maintenance.add_argument("release", nargs="?", help="one release (default: every route)")
    maintenance.add_argument("--retry-after", type=int, metavar="S", help="Retry-After seconds")
    maintenance.add_argument("--message", help="the text users see")

    status = commands.choices["status"]
    listing: ClientCommand = status.get_default("client_run")
    status.add_argument("release", nargs="?", help="one release's guard and plan")

    def cmd_status(client: Any, args: argparse.Namespace) -> int:
        if args.release is None:
            code = listing(client, args)
            if code == EXIT_OK:
                # 503/404: an admin API without a guard (or an older server): nothing to add.
                status, data = client.send("GET", "/api/v1/status", ok_statuses=(200, 404, 503))
                if status == 200 and isinstance(data, dict):
                    print_guard_lines(data)
            return code
        print_health(client.get(f"/api/v1/releases/{_quote(args.release)}/health"))
        return EXIT_OK

    status.set_defaults(client_run=cmd_status)
