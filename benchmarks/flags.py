"""Flag evaluation cost: Turnout's compiled flags beside the Python SDKs users would pick instead.

    .venv/bin/python benchmarks/flags.py            # full run
    .venv/bin/python benchmarks/flags.py --quick    # a short sanity run

Needs the `bench` extra (`pip install -e '.[bench]'`): growthbook, launchdarkly-server-sdk,
UnleashClient, openfeature-sdk. Everything runs offline and single-threaded: each SDK is fed
the same flag from a local definition (no network, no events, no metrics).

The flag (issue #11): `on` for e-mails ending in `@corp.com`, else a 10 % rollout by user id,
else `off`. "single" is µs per evaluation of that flag for one context (the context's
attributes handed over each time, as a server does per request); "bulk 50" is µs to evaluate
50 such flags (different keys, so different buckets) for one context, through the SDK's bulk
call where it has one. An SDK missing from the environment is reported and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flags.document import load_document
from flags.evaluate import compile_snapshot
from flags.flageval import unit_of
from flags.hashing import position

BULK_FLAGS = 50
CONTEXTS = 1000
CORP_EVERY = 20  # one context in 20 has a @corp.com e-mail
TARGET_SINGLE_US = 1.5
TARGET_BULK_US = 50.0

Bench = tuple[Callable[[dict[str, Any]], Any], Callable[[dict[str, Any]], Any]]


def contexts() -> list[dict[str, Any]]:
    out = []
    for i in range(CONTEXTS):
        domain = "corp.com" if i % CORP_EVERY == 0 else "example.com"
        out.append({"targetingKey": f"user-{i}", "email": f"person{i}@{domain}"})
    return out


def keys() -> list[str]:
    return ["checkout"] + [f"flag-{i:02d}" for i in range(1, BULK_FLAGS)]


def expected(key: str, ctx: dict[str, Any]) -> bool:
    """The reference answer (DESIGN.md §2 bucketing), to check every SDK agrees before timing."""
    if ctx["email"].endswith("@corp.com"):
        return True
    return position(key, ctx["targetingKey"]) < 10_000


# -- Turnout -------------------------------------------------------------------------------------


def turnout() -> Bench:
    doc = {
        "flags": {
            key: {
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
                "rollout": [{"variant": "on", "weight": 10}, {"variant": "off", "weight": 90}],
            }
            for key in keys()
        }
    }
    flagset = compile_snapshot(load_document(doc)).flags
    assert flagset is not None
    evaluate, evaluate_all = flagset.evaluate, flagset.evaluate_all

    def single(ctx: dict[str, Any]) -> Any:
        return evaluate("checkout", unit_of(ctx), ctx).value

    def bulk(ctx: dict[str, Any]) -> Any:
        return evaluate_all(unit_of(ctx), ctx)

    return single, bulk


# -- GrowthBook ----------------------------------------------------------------------------------


def growthbook() -> Bench:
    from growthbook import GrowthBook

    # GrowthBook has no "ends with" operator: a regex is its way (and its cost).
    features = {
        key: {
            "defaultValue": False,
            "rules": [
                {"condition": {"email": {"$regex": "@corp\\.com$"}}, "force": True},
                {"force": True, "coverage": 0.1, "hashAttribute": "id", "seed": key},
            ],
        }
        for key in keys()
    }
    gb = GrowthBook(features=features)
    all_keys = keys()

    def single(ctx: dict[str, Any]) -> Any:
        gb.set_attributes({"id": ctx["targetingKey"], "email": ctx["email"]})
        return gb.eval_feature("checkout").value

    def bulk(ctx: dict[str, Any]) -> Any:
        gb.set_attributes({"id": ctx["targetingKey"], "email": ctx["email"]})
        return [gb.eval_feature(key).value for key in all_keys]

    return single, bulk


# -- LaunchDarkly --------------------------------------------------------------------------------


def launchdarkly(tmp: Path) -> Bench:
    from ldclient import Context, LDClient
    from ldclient.config import Config
    from ldclient.integrations import Files

    flags = {
        key: {
            "key": key,
            "on": True,
            "version": 1,
            "salt": key,
            "variations": [True, False],
            "offVariation": 1,
            "prerequisites": [],
            "targets": [],
            "rules": [
                {
                    "id": "corp",
                    "variation": 0,
                    "clauses": [{"attribute": "email", "op": "endsWith", "values": ["@corp.com"]}],
                }
            ],
            "fallthrough": {
                "rollout": {
                    "variations": [
                        {"variation": 0, "weight": 10_000},
                        {"variation": 1, "weight": 90_000},
                    ]
                }
            },
        }
        for key in keys()
    }
    path = tmp / "ld-flags.json"
    path.write_text(json.dumps({"flags": flags}))
    config = Config(
        "bench-sdk-key",
        update_processor_class=Files.new_data_source(paths=[str(path)]),
        send_events=False,
        diagnostic_opt_out=True,
    )
    client = LDClient(config=config)

    def context(ctx: dict[str, Any]) -> Any:
        return Context.builder(ctx["targetingKey"]).set("email", ctx["email"]).build()

    def single(ctx: dict[str, Any]) -> Any:
        return client.variation("checkout", context(ctx), False)

    def bulk(ctx: dict[str, Any]) -> Any:
        return client.all_flags_state(context(ctx))

    return single, bulk


# -- Unleash -------------------------------------------------------------------------------------


def unleash(tmp: Path) -> Bench:
    from UnleashClient import UnleashClient
    from UnleashClient.cache import FileCache

    features = {
        "version": 1,
        "features": [
            {
                "name": key,
                "enabled": True,
                "strategies": [
                    {
                        "name": "flexibleRollout",
                        "parameters": {"rollout": "100", "stickiness": "userId", "groupId": key},
                        "constraints": [
                            {
                                "contextName": "email",
                                "operator": "STR_ENDS_WITH",
                                "values": ["@corp.com"],
                            }
                        ],
                    },
                    {
                        "name": "flexibleRollout",
                        "parameters": {"rollout": "10", "stickiness": "userId", "groupId": key},
                    },
                ],
            }
            for key in keys()
        ],
    }
    cache = FileCache("turnout-bench", directory=str(tmp))
    cache.bootstrap_from_dict(features)
    client = UnleashClient(
        url="http://127.0.0.1:9",
        app_name="turnout-bench",
        cache=cache,
        disable_metrics=True,
        disable_registration=True,
        refresh_interval=3600,
    )
    client.initialize_client(fetch_toggles=False)
    all_keys = keys()

    def single(ctx: dict[str, Any]) -> Any:
        return client.is_enabled(
            "checkout", {"userId": ctx["targetingKey"], "properties": {"email": ctx["email"]}}
        )

    def bulk(ctx: dict[str, Any]) -> Any:
        context = {"userId": ctx["targetingKey"], "properties": {"email": ctx["email"]}}
        return [client.is_enabled(key, context) for key in all_keys]

    bulk.close = client.destroy  # type: ignore[attr-defined]
    return single, bulk


# -- OpenFeature in-memory -----------------------------------------------------------------------


def openfeature() -> Bench:
    import mmh3
    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.flag_evaluation import FlagResolutionDetails, Reason
    from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider

    # The in-memory provider has no rule language: the rule is the app's own code.
    def evaluator(key: str) -> Callable[[Any, EvaluationContext], FlagResolutionDetails[bool]]:
        prefix = key + ":"

        def evaluate(flag: Any, ctx: EvaluationContext) -> FlagResolutionDetails[bool]:
            email = ctx.attributes.get("email")
            if isinstance(email, str) and email.endswith("@corp.com"):
                return FlagResolutionDetails(True, variant="on", reason=Reason.TARGETING_MATCH)
            unit = ctx.targeting_key or ""
            on = (mmh3.hash(prefix + unit, 0, False) * 100_000) >> 32 < 10_000
            return FlagResolutionDetails(on, variant="on" if on else "off", reason=Reason.SPLIT)

        return evaluate

    flags = {
        key: InMemoryFlag("off", {"on": True, "off": False}, context_evaluator=evaluator(key))
        for key in keys()
    }
    api.set_provider(InMemoryProvider(flags), "bench")
    client = api.get_client("bench")
    all_keys = keys()

    def single(ctx: dict[str, Any]) -> Any:
        context = EvaluationContext(ctx["targetingKey"], {"email": ctx["email"]})
        return client.get_boolean_value("checkout", False, context)

    def bulk(ctx: dict[str, Any]) -> Any:
        context = EvaluationContext(ctx["targetingKey"], {"email": ctx["email"]})
        return [client.get_boolean_value(key, False, context) for key in all_keys]

    return single, bulk


# -- harness -------------------------------------------------------------------------------------


def check(name: str, single: Callable[[dict[str, Any]], Any], ctxs: list[dict[str, Any]]) -> None:
    """Every SDK must evaluate the same flag before its time means anything: the e-mail rule
    exactly, and about 10 % of the rest on. Each SDK hashes units its own way, so only
    Turnout (and the in-memory provider, which is handed DESIGN §2's hash) must match the
    reference bucket by bucket."""
    exact = name in ("turnout", "openfeature-inmemory")
    rest = on = 0
    for ctx in ctxs:
        got = bool(single(ctx))
        if exact and got != expected("checkout", ctx):
            raise SystemExit(f"{name}: disagrees with the reference for {ctx}")
        if ctx["email"].endswith("@corp.com"):
            if not got:
                raise SystemExit(f"{name}: the e-mail rule did not match {ctx}")
        else:
            rest += 1
            on += got
    if not 0.06 <= on / rest <= 0.14:
        raise SystemExit(f"{name}: {on} of {rest} on, not about 10 %")


def measure(fn: Callable[[dict[str, Any]], Any], ctxs: list[dict[str, Any]], rounds: int) -> float:
    """Best of `rounds` passes over all contexts, in µs per call."""
    best = float("inf")
    gc.collect()
    for _ in range(rounds):
        started = time.perf_counter()
        for ctx in ctxs:
            fn(ctx)
        best = min(best, (time.perf_counter() - started) / len(ctxs) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short sanity run")
    parser.add_argument("--only", help="comma-separated: turnout,growthbook,launchdarkly,...")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # SDKs log about their offline data sources
    ctxs = contexts()
    single_rounds, bulk_rounds = (3, 1) if args.quick else (15, 5)
    bulk_ctxs = ctxs[:100] if args.quick else ctxs
    with tempfile.TemporaryDirectory() as tmp:
        factories: dict[str, Callable[[], Bench]] = {
            "turnout": turnout,
            "growthbook": growthbook,
            "launchdarkly": lambda: launchdarkly(Path(tmp)),
            "unleash": lambda: unleash(Path(tmp)),
            "openfeature-inmemory": openfeature,
        }
        wanted = args.only.split(",") if args.only else list(factories)
        print(f"python {sys.version.split()[0]}, pid {os.getpid()}, {len(ctxs)} contexts")
        print(f"{'sdk':<22}{'single µs':>12}{'bulk 50 µs':>14}")
        results: dict[str, tuple[float, float]] = {}
        for name in wanted:
            try:
                single, bulk = factories[name]()
            except ImportError as exc:
                print(f"{name:<22}{'skipped: ' + str(exc):>26}")
                continue
            try:
                check(name, single, ctxs)
                results[name] = (
                    measure(single, ctxs, single_rounds),
                    measure(bulk, bulk_ctxs, bulk_rounds),
                )
            finally:
                close = getattr(bulk, "close", None)
                if close is not None:
                    close()
            s, b = results[name]
            print(f"{name:<22}{s:>12.2f}{b:>14.1f}")
        if "turnout" in results:
            s, b = results["turnout"]
            verdict = "meets" if s <= TARGET_SINGLE_US and b <= TARGET_BULK_US else "MISSES"
            print(
                f"turnout {verdict} the issue #11 target (<= {TARGET_SINGLE_US} µs single, "
                f"<= {TARGET_BULK_US:g} µs for {BULK_FLAGS})"
            )
        if results:
            print(
                f"median single across SDKs: {statistics.median(r[0] for r in results.values()):.2f} µs"
            )


if __name__ == "__main__":
    main()
