"""`turnout flag ...` and `turnout import ...`: flags for product managers on the command line.

    turnout flag list | show KEY | on KEY | off KEY | kill KEY --reason R | kill --all
    turnout flag percent KEY 25 [--variant V] [--rest V] | weights KEY a=50 b=50
    turnout flag target KEY VARIANT UNIT... [--remove] | rule KEY RULE_JSON [--index N]
    turnout flag explain KEY UNIT [--attr email=a@b.c ...]
    turnout import flagd|unleash FILE [--dry-run]

Registered from turnout/cli.py with `cli_flags.register(client_command)`; the exit codes and
the admin client are cli.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from flags.migration import from_flagd, from_unleash, merge_flags

AdminClient = Any  # turnout.cli.AdminClient (imported lazily: cli.py imports this module)
ClientCommand = Callable[[Any, argparse.Namespace], int]
Register = Callable[..., argparse.ArgumentParser]
EXIT_OK = 0
EXIT_USAGE = 2


def _q(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _done(data: Any) -> int:
    print(f"version {data.get('version')}: {data.get('summary', '')}")
    return EXIT_OK


def _rollout(flag: dict[str, Any]) -> str:
    rollout = flag.get("rollout")
    if not rollout:
        return "-"
    return ", ".join(f"{s['variant']} {s['weight']:g}%" for s in rollout)


def cmd_list(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get("/api/v1/flags")
    if data.get("flags_killed"):
        print("GLOBAL FLAG KILL SWITCH IS ON: every flag serves its off variant")
    rows = [["FLAG", "TYPE", "STATE", "DEFAULT", "ROLLOUT", "RULES", "COHORT"]]
    for flag in data["flags"]:
        state = "killed" if flag["killed"] else ("on" if flag["enabled"] else "off")
        rows.append(
            [
                flag["key"],
                flag["type"],
                state,
                flag["default"],
                _rollout(flag),
                str(len(flag["rules"])),
                flag.get("cohort") or "-",
            ]
        )
    if len(rows) == 1:
        print("no flags")
        return EXIT_OK
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_show(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get(f"/api/v1/flags/{_q(args.key)}")
    print(json.dumps(data["flag"], indent=2, sort_keys=True))
    return EXIT_OK


def _post(client: AdminClient, args: argparse.Namespace, path: str, body: dict[str, Any]) -> int:
    return _done(client.write("POST", path, body, getattr(args, "if_match", None)))


def cmd_on(client: AdminClient, args: argparse.Namespace) -> int:
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/toggle", {"enabled": True})


def cmd_off(client: AdminClient, args: argparse.Namespace) -> int:
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/toggle", {"enabled": False})


def cmd_kill(client: AdminClient, args: argparse.Namespace) -> int:
    from turnout.cli import UsageError

    if args.all == (args.key is not None):
        raise UsageError("name one flag, or give --all for the global kill switch")
    body: dict[str, Any] = {"killed": not args.undo}
    if args.reason:
        body["reason"] = args.reason
    if args.all:
        return _post(client, args, "/api/v1/flags-kill", body)
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/kill", body)


def cmd_percent(client: AdminClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"percent": args.percent}
    if args.variant:
        body["variant"] = args.variant
    if args.rest:
        body["rest"] = args.rest
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/percent", body)


def cmd_weights(client: AdminClient, args: argparse.Namespace) -> int:
    from turnout.cli import UsageError

    weights: dict[str, float] = {}
    for item in args.weights:
        name, eq, value = item.partition("=")
        try:
            weights[name] = float(value.rstrip("%"))
        except ValueError:
            raise UsageError(f"not VARIANT=PERCENT: {item!r}") from None
        if not eq or not name:
            raise UsageError(f"not VARIANT=PERCENT: {item!r}")
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/weights", {"weights": weights})


def cmd_target(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"variant": None if args.remove else args.variant, "unit_ids": args.units}
    if args.remove:
        body["unit_ids"] = [args.variant, *args.units]  # `target KEY --remove UNIT...`
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/targets", body)


def cmd_rule(client: AdminClient, args: argparse.Namespace) -> int:
    from turnout.cli import UsageError

    try:
        rule = json.loads(args.rule)
    except ValueError as exc:
        raise UsageError(f"the rule is not JSON: {exc}") from None
    body: dict[str, Any] = {"rule": rule}
    if args.index is not None:
        body["index"] = args.index
    return _post(client, args, f"/api/v1/flags/{_q(args.key)}/rules", body)


def cmd_explain(client: AdminClient, args: argparse.Namespace) -> int:
    from turnout.cli import UsageError

    params = {"unit_id": args.unit}
    for item in args.attr or ():
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError(f"not NAME=VALUE: {item!r}")
        params[name] = value
    data = client.get(f"/api/v1/flags/{_q(args.key)}/explain", params=params)
    print(f"flag {data['flag']} for unit {data['unit_id']} (version {data['version']})")
    print(f"  variant   {data['variant']} = {json.dumps(data['value'])}")
    print(f"  reason    {data['reason']}")
    if data.get("position") is not None:
        print(f"  position  {data['position']} of 100000 (salt {data['salt']!r})")
    print(f"  cohort    {data.get('cohort') or '-'}")
    if "rule" in data:
        print(f"  rule      {data['rule']}")
    print(f"  why       {data['explanation']}")
    return EXIT_OK


def cmd_import(client: AdminClient, args: argparse.Namespace) -> int:
    from turnout.cli import read_document_file

    raw = read_document_file(args.file)
    converted = from_flagd(raw) if args.source == "flagd" else from_unleash(raw)
    for key, problems in sorted(converted.report.items()):
        for problem in problems:
            print(f"{key}: not mapped: {problem}", file=sys.stderr)
    current = client.get("/api/v1/config")
    document = merge_flags(current.get("document") or {}, converted)
    version = current.get("version")
    if args.dry_run:
        from flags.document import load_document
        from flags.errors import ConfigError

        try:
            load_document(document)
        except ConfigError as exc:
            print(f"the imported document would be refused: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"flags": document["flags"], "segments": document["segments"]}, indent=2))
        print(f"dry run: {len(converted.flags)} flag(s) valid; nothing written", file=sys.stderr)
        return EXIT_OK
    if_match = args.if_match if args.if_match is not None else version
    return _done(client.write("PUT", "/api/v1/config", document, if_match))


def register(client_command: Register) -> None:
    """Add `flag` and `import` to the CLI (`client_command` is cli.py's subcommand maker)."""
    flag = client_command(
        "flag",
        "feature flags: list, show, toggle, kill, roll out",
        cmd_list,
        (
            "turnout flag list",
            "turnout flag percent checkout 10 --variant on",
            "turnout flag kill checkout --reason 'payment errors'",
            "turnout flag ACTION --help              # each action's options",
        ),
    )
    verbs = flag.add_subparsers(
        dest="flag_command", metavar="ACTION", help="what to do (turnout flag ACTION --help)"
    )
    key_help = "the flag's key (as in the document's flags)"

    def verb(
        name: str, help_text: str, func: ClientCommand, example: str, writes: bool = True
    ) -> Any:
        sub = verbs.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"examples:\n  {example}",
        )
        if writes:
            sub.add_argument("--if-match", type=int, metavar="N", help="only at version N")
        sub.set_defaults(client_run=func)
        return sub

    verb("list", "every flag with its state and rollout", cmd_list, "turnout flag list", False)
    verb(
        "show", "one flag's definition", cmd_show, "turnout flag show checkout", False
    ).add_argument("key", help=key_help)
    verb("on", "turn a flag on", cmd_on, "turnout flag on checkout").add_argument(
        "key", help=key_help
    )
    verb(
        "off",
        "turn a flag off (its off variant for everyone)",
        cmd_off,
        "turnout flag off checkout",
    ).add_argument("key", help=key_help)
    kill = verb(
        "kill",
        "kill switch: the off variant over every rule and target",
        cmd_kill,
        "turnout flag kill checkout --reason 'payment errors'",
    )
    kill.add_argument("key", nargs="?", help=key_help + "; none with --all")
    kill.add_argument("--all", action="store_true", help="the global kill switch (all flags)")
    kill.add_argument("--reason", help="why (required to kill one flag)")
    kill.add_argument("--undo", action="store_true", help="turn the kill switch off")
    percent = verb(
        "percent",
        "roll a variant out to a percentage of units",
        cmd_percent,
        "turnout flag percent checkout 10 --variant on",
    )
    percent.add_argument("key", help=key_help)
    percent.add_argument("percent", type=float, help="0 to 100")
    percent.add_argument("--variant", help="the variant rolled out (boolean flags: the true one)")
    percent.add_argument("--rest", help="the variant everyone else gets (default: the default)")
    weights = verb(
        "weights",
        "variant weights in order, e.g. a=50 b=50",
        cmd_weights,
        "turnout flag weights banner blue=50 green=50",
    )
    weights.add_argument("key", help=key_help)
    weights.add_argument(
        "weights", nargs="+", metavar="VARIANT=PERCENT", help="each variant's share, in order"
    )
    target = verb(
        "target",
        "these units get this variant (QA, support)",
        cmd_target,
        "turnout flag target checkout on alice bob",
    )
    target.add_argument("key", help=key_help)
    target.add_argument("variant", help="the variant (with --remove: the first unit)")
    target.add_argument("units", nargs="*", metavar="UNIT", help="unit ids")
    target.add_argument("--remove", action="store_true", help="untarget the units instead")
    rule = verb(
        "rule",
        "add a targeting rule (JSON)",
        cmd_rule,
        """turnout flag rule checkout '{"conditions": [...], "variant": "on"}'""",
    )
    rule.add_argument("key", help=key_help)
    rule.add_argument("rule", help='e.g. \'{"conditions": [...], "variant": "on"}\'')
    rule.add_argument("--index", type=int, help="position among the rules (default: last)")
    explain = verb(
        "explain",
        "which rule, position, cohort and variant, and why",
        cmd_explain,
        "turnout flag explain checkout alice --attr plan=pro",
    )
    explain.add_argument("key", help=key_help)
    explain.add_argument("unit", help="the unit id")
    explain.add_argument("--attr", action="append", metavar="NAME=VALUE", help="a context value")

    imp = client_command(
        "import",
        "import flags from flagd or an Unleash export",
        cmd_import,
        (
            "turnout import flagd flags.json --dry-run   # the per-flag report, nothing written",
            "turnout import unleash export.json",
        ),
        writes=True,
    )
    imp.add_argument("source", choices=["flagd", "unleash"], help="the file's format")
    imp.add_argument("file", metavar="FILE", help="the flagd or Unleash export file")
    imp.add_argument("--dry-run", action="store_true", help="validate and print; write nothing")
