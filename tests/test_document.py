"""flags/document.py: whole-document validation (every failure a ConfigError naming the exact
field), round trip through JSON, immutability, and Hypothesis-generated valid releases."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flags.document import (
    DEFAULT_STAGES,
    Release,
    effective_percent,
    load_document,
)
from flags.errors import ConfigError
from flags.evaluate import REASON_TARGETING_MATCH, compile_snapshot
from flags.hashing import normalize_unit_id
from tests.routing import route

PROPERTIES = settings(max_examples=200, deadline=None, database=None)


def release(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "stable": ["http://stable.internal:8080"],
        "canary": ["https://canary.internal"],
    }
    base.update(overrides)
    return base


def document(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "releases": {"web": release()},
        "routes": [{"host": "*", "path_prefix": "/", "release": "web"}],
    }
    base.update(overrides)
    return base


def full_document() -> dict[str, Any]:
    """Every part of the schema in use."""
    return {
        "version": 7,
        "stages": {**DEFAULT_STAGES, "canary-1": 1.0},
        "cohorts": {"beta-users": {"salt": "beta-2024", "description": "the beta people"}},
        "releases": {
            "web": release(stage="beta", cohort="beta-users"),
            "checkout": release(
                stage="custom",
                percent=12.345,
                salt="checkout-v3",
                internal={"unit_ids": ["alice", "bob"], "email_domains": ["example.com"]},
                description="new checkout",
            ),
            "search": release(
                stage="off",
                rollback={"reason": "5xx spike", "from_stage": "open", "from_percent": None},
            ),
            "api": release(stage="canary-1"),
        },
        "routes": [
            {"host": "shop.example.com", "path_prefix": "/checkout", "release": "checkout"},
            {"host": "*", "path_prefix": "/search", "release": "search"},
            {"host": "*", "path_prefix": "/api/", "release": "api"},
            {"host": "*", "path_prefix": "/", "release": "web"},
        ],
    }


def assert_config_error(raw: Any, field: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_document(raw)
    assert info.value.field == field, str(info.value)
    return info.value


# -- valid documents ------------------------------------------------------------------------------


def test_empty_document_loads_with_default_stages() -> None:
    """`{}` is a valid document: no routes, no releases, the default stage table."""
    doc = load_document({})
    assert doc.version == 0
    assert doc.stages == DEFAULT_STAGES
    assert doc.releases == {} and doc.routes == ()


def test_full_document_loads() -> None:
    """A document using every field loads, and stages resolve to their percentages."""
    doc = load_document(full_document())
    assert doc.version == 7
    assert effective_percent(doc, doc.releases["web"]) == 10.0
    assert effective_percent(doc, doc.releases["checkout"]) == 12.345
    assert effective_percent(doc, doc.releases["api"]) == 1.0
    assert doc.releases["search"].rollback is not None
    assert doc.releases["checkout"].internal.unit_ids == ("alice", "bob")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(lambda d: d, id="mapping"),
        pytest.param(lambda d: load_document(d).to_json(), id="bytes"),
        pytest.param(lambda d: load_document(d).to_json().decode(), id="str"),
    ],
)
def test_document_loads_from_mapping_bytes_and_str(raw: Any) -> None:
    """load_document accepts a mapping, JSON bytes and JSON text alike."""
    assert load_document(raw(full_document())) == load_document(full_document())


@pytest.mark.parametrize(
    "url",
    [
        "http://a",
        "https://a.b.example:8443",
        "http://10.0.0.1:80",
        "http://[::1]:8080",
        "http://upstream/",
    ],
)
def test_valid_upstream_urls_load(url: str) -> None:
    """http(s) upstreams with a host, an optional port and at most a bare / are accepted."""
    load_document(document(releases={"web": release(stable=[url])}))


@pytest.mark.parametrize("percent", [0, 0.0, 0.001, 12.5, 33.333, 99.999, 100, 100.0])
def test_boundary_percents_load(percent: float) -> None:
    """Percentages in [0, 100] in 0.001 steps are accepted (ints included)."""
    doc = load_document(document(releases={"web": release(stage="custom", percent=percent)}))
    assert doc.releases["web"].percent == float(percent)


def test_round_trip_through_json() -> None:
    """to_json() then load_document gives an equal document (and identical bytes again)."""
    doc = load_document(full_document())
    again = load_document(doc.to_json())
    assert again == doc
    assert again.to_json() == doc.to_json()


def test_content_drops_only_the_version() -> None:
    """content() is the document without its version (what a restore copies)."""
    doc = load_document(full_document())
    content = doc.content()
    assert "version" not in content
    assert load_document(content) == doc.model_copy(update={"version": 0})


def test_loading_does_not_mutate_the_input() -> None:
    """load_document reads its input mapping and leaves it as it was."""
    raw = full_document()
    before = copy.deepcopy(raw)
    load_document(raw)
    assert raw == before


# -- immutability ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "attribute", "value"),
    [
        (lambda d: d, "version", 99),
        (lambda d: d, "routes", ()),
        (lambda d: d.releases["checkout"], "stage", "ga"),
        (lambda d: d.releases["checkout"], "percent", 50.0),
        (lambda d: d.releases["checkout"].internal, "unit_ids", ("mallory",)),
        (lambda d: d.routes[0], "release", "web"),
        (lambda d: d.cohorts["beta-users"], "salt", "other"),
        (lambda d: d.releases["search"].rollback, "reason", "none"),
    ],
    ids=["version", "routes", "stage", "percent", "internal", "route", "cohort", "rollback"],
)
def test_models_are_frozen(target: Any, attribute: str, value: Any) -> None:
    """Assigning to any model attribute raises: a change is a new document."""
    doc = load_document(full_document())
    obj = target(doc)
    with pytest.raises(ValidationError):
        setattr(obj, attribute, value)
    assert getattr(obj, attribute) != value


def test_sequences_are_tuples() -> None:
    """Lists in the JSON become tuples, so routes and upstream lists cannot be appended to."""
    doc = load_document(full_document())
    assert isinstance(doc.routes, tuple)
    assert isinstance(doc.releases["web"].stable, tuple)
    assert isinstance(doc.releases["checkout"].internal.email_domains, tuple)


# -- invalid documents: each names its field ------------------------------------------------------


def custom(percent: Any) -> dict[str, Any]:
    return document(releases={"web": release(stage="custom", percent=percent)})


def upstream(url: str, arm: str = "stable") -> dict[str, Any]:
    return document(releases={"web": release(**{arm: [url]})})


INVALID: list[Any] = [
    # percentages
    pytest.param(custom(150), "releases.web.percent", id="percent-150"),
    pytest.param(custom(-1), "releases.web.percent", id="percent-negative"),
    pytest.param(custom(100.001), "releases.web.percent", id="percent-just-over"),
    pytest.param(custom(12.0001), "releases.web.percent", id="percent-not-0.001-step"),
    pytest.param(custom(0.0005), "releases.web.percent", id="percent-half-step"),
    pytest.param(custom(math.nan), "releases.web.percent", id="percent-nan"),
    pytest.param(custom(math.inf), "releases.web.percent", id="percent-inf"),
    pytest.param(custom(-math.inf), "releases.web.percent", id="percent-minus-inf"),
    pytest.param(custom("10"), "releases.web.percent", id="percent-string"),
    pytest.param(custom(True), "releases.web.percent", id="percent-bool"),
    pytest.param(custom(None), "releases.web.percent", id="custom-without-percent"),
    pytest.param(
        document(releases={"web": release(stage="custom")}),
        "releases.web.percent",
        id="custom-percent-missing",
    ),
    pytest.param(
        document(releases={"web": release(stage="beta", percent=10)}),
        "releases.web.percent",
        id="percent-without-custom",
    ),
    pytest.param(
        document(releases={"web": release(percent=5)}),
        "releases.web.percent",
        id="percent-with-default-stage",
    ),
    # stages
    pytest.param(
        document(releases={"web": release(stage="gamma")}), "releases.web.stage", id="unknown-stage"
    ),
    pytest.param(
        document(releases={"web": release(stage="BETA")}),
        "releases.web.stage",
        id="stage-case-matters",
    ),
    pytest.param(document(stages={"beta": 10.0}), "stages.off", id="stage-table-without-off"),
    pytest.param(document(stages={"off": 5.0}), "stages.off", id="stage-off-not-zero"),
    pytest.param(
        document(stages={"off": 0.0, "late": 101.0}), "stages.late", id="stage-percent-out-of-range"
    ),
    pytest.param(
        document(stages={"off": 0.0, "custom": 5.0}), "stages.custom", id="stage-named-custom"
    ),
    pytest.param(document(stages={"off": 0.0, "Beta": 10.0}), "stages.Beta", id="stage-bad-name"),
    pytest.param(document(stages={"off": 0, "beta": "10"}), "stages.beta", id="stage-string"),
    pytest.param(document(stages=["off"]), "stages", id="stages-list"),
    # cohorts and salts
    pytest.param(
        document(releases={"web": release(cohort="nobody")}),
        "releases.web.cohort",
        id="unknown-cohort",
    ),
    pytest.param(
        document(
            cohorts={"beta-users": {"salt": "s"}},
            releases={"web": release(salt="x", cohort="beta-users")},
        ),
        "releases.web.cohort",
        id="salt-and-cohort",
    ),
    pytest.param(document(cohorts={"Beta": {"salt": "s"}}), "cohorts.Beta", id="cohort-bad-name"),
    pytest.param(
        document(cohorts={"beta": {"salt": ""}}), "cohorts.beta.salt", id="cohort-empty-salt"
    ),
    pytest.param(
        document(cohorts={"beta": {"salt": "s", "x": 1}}), "cohorts.beta.x", id="cohort-unknown"
    ),
    # upstreams
    pytest.param(upstream("ftp://files.example"), "releases.web.stable.0", id="ftp"),
    pytest.param(upstream("file:///etc/passwd"), "releases.web.stable.0", id="file"),
    pytest.param(upstream("javascript:alert(1)"), "releases.web.stable.0", id="javascript"),
    pytest.param(upstream("http://"), "releases.web.stable.0", id="no-host"),
    pytest.param(upstream("upstream:8080"), "releases.web.stable.0", id="no-scheme"),
    pytest.param(upstream("http://a/api"), "releases.web.stable.0", id="with-path"),
    pytest.param(upstream("http://a?x=1"), "releases.web.stable.0", id="with-query"),
    pytest.param(upstream("http://a#frag"), "releases.web.stable.0", id="with-fragment"),
    pytest.param(upstream("http://u:p@a"), "releases.web.stable.0", id="with-credentials"),
    pytest.param(upstream("http://u@a"), "releases.web.stable.0", id="with-user"),
    pytest.param(upstream("http://@a"), "releases.web.stable.0", id="with-empty-userinfo"),
    pytest.param(upstream("http://:@a"), "releases.web.stable.0", id="with-empty-user-pass"),
    pytest.param(upstream("http://a:0"), "releases.web.stable.0", id="port-0"),
    pytest.param(upstream("http://a:65536"), "releases.web.stable.0", id="port-too-big"),
    pytest.param(upstream("http://a:http"), "releases.web.stable.0", id="port-not-number"),
    pytest.param(upstream("ftp://x", arm="canary"), "releases.web.canary.0", id="canary-arm"),
    pytest.param(
        document(releases={"web": release(stable=["http://ok", "gopher://x"])}),
        "releases.web.stable.1",
        id="second-upstream",
    ),
    pytest.param(
        document(releases={"web": release(stable=[])}), "releases.web.stable", id="no-upstreams"
    ),
    # routes
    pytest.param(
        document(routes=[{"release": "nope"}]), "routes.0.release", id="route-unknown-release"
    ),
    pytest.param(
        document(
            routes=[
                {"host": "a.example", "path_prefix": "/x", "release": "web"},
                {"host": "a.example", "path_prefix": "/x", "release": "web"},
            ]
        ),
        "routes.1",
        id="duplicate-route",
    ),
    pytest.param(
        document(routes=[{"release": "web"}, {"host": "*", "path_prefix": "/", "release": "web"}]),
        "routes.1",
        id="duplicate-default-route",
    ),
    pytest.param(
        document(routes=[{"host": "Example.com", "release": "web"}]),
        "routes.0.host",
        id="host-upper-case",
    ),
    pytest.param(
        document(routes=[{"host": "example.com:8080", "release": "web"}]),
        "routes.0.host",
        id="host-with-port",
    ),
    pytest.param(
        document(routes=[{"host": "*.example.com", "release": "web"}]),
        "routes.0.host",
        id="host-partial-wildcard",
    ),
    pytest.param(
        document(routes=[{"host": "", "release": "web"}]), "routes.0.host", id="host-empty"
    ),
    pytest.param(
        document(routes=[{"host": "a_b.example", "release": "web"}]),
        "routes.0.host",
        id="host-underscore",
    ),
    pytest.param(
        document(routes=[{"path_prefix": "api", "release": "web"}]),
        "routes.0.path_prefix",
        id="prefix-without-slash",
    ),
    pytest.param(
        document(routes=[{"path_prefix": "", "release": "web"}]),
        "routes.0.path_prefix",
        id="prefix-empty",
    ),
    pytest.param(
        document(routes=[{"path_prefix": "/a/../b", "release": "web"}]),
        "routes.0.path_prefix",
        id="prefix-dot-dot",
    ),
    pytest.param(
        document(routes=[{"path_prefix": "/a b", "release": "web"}]),
        "routes.0.path_prefix",
        id="prefix-space",
    ),
    pytest.param(document(routes=[{"host": "*"}]), "routes.0.release", id="route-no-release"),
    # release names and internal lists
    pytest.param(
        document(releases={"Web": release()}, routes=[]), "releases.Web", id="release-upper"
    ),
    pytest.param(
        document(releases={"-web": release()}, routes=[]), "releases.-web", id="release-dash"
    ),
    pytest.param(
        document(releases={"w" * 65: release()}, routes=[]),
        "releases." + "w" * 65,
        id="release-too-long",
    ),
    pytest.param(
        document(releases={"web": release(internal={"email_domains": ["not a domain"]})}),
        "releases.web.internal.email_domains.0",
        id="internal-bad-domain",
    ),
    pytest.param(
        document(releases={"web": release(internal={"email_domains": ["Example.COM"]})}),
        "releases.web.internal.email_domains.0",
        id="internal-upper-domain",
    ),
    pytest.param(
        document(releases={"web": release(internal={"unit_ids": [" alice"]})}),
        "releases.web.internal.unit_ids.0",
        id="internal-untrimmed-id",
    ),
    pytest.param(
        document(releases={"web": release(internal={"unit_ids": ["ok", ""]})}),
        "releases.web.internal.unit_ids.1",
        id="internal-empty-id",
    ),
    # unknown fields, anywhere
    pytest.param(document(enviroment="prod"), "enviroment", id="unknown-top-level"),
    pytest.param(
        document(releases={"web": release(stagee="beta")}),
        "releases.web.stagee",
        id="unknown-release",
    ),
    pytest.param(
        document(routes=[{"release": "web", "methods": ["GET"]}]),
        "routes.0.methods",
        id="unknown-route",
    ),
    pytest.param(
        document(releases={"web": release(internal={"unit_ids": [], "headers": ["x"]})}),
        "releases.web.internal.headers",
        id="unknown-internal",
    ),
    pytest.param(
        document(
            releases={
                "web": release(stage="off", rollback={"reason": "r", "from_stage": "beta", "x": 1})
            }
        ),
        "releases.web.rollback.x",
        id="unknown-rollback",
    ),
    # wrong types
    pytest.param(
        document(releases={"web": release(stable="http://a")}),
        "releases.web.stable",
        id="string-for-list",
    ),
    pytest.param(document(routes="web"), "routes", id="string-for-routes"),
    pytest.param(
        document(releases={"web": release(internal={"unit_ids": "alice"})}),
        "releases.web.internal.unit_ids",
        id="string-for-internal-list",
    ),
    pytest.param(document(version="3"), "version", id="string-for-version"),
    pytest.param(document(version=-1), "version", id="negative-version"),
    pytest.param(document(version=1.5), "version", id="float-version"),
    pytest.param(document(releases=["web"]), "releases", id="list-for-releases"),
    pytest.param(document(releases={"web": "x"}), "releases.web", id="string-for-release"),
    pytest.param(
        document(releases={"web": release(stage=10)}), "releases.web.stage", id="number-for-stage"
    ),
    pytest.param(
        document(releases={"web": release(salt=5)}), "releases.web.salt", id="number-for-salt"
    ),
]


@pytest.mark.parametrize(("raw", "field"), INVALID)
def test_invalid_document_names_the_field(raw: dict[str, Any], field: str) -> None:
    """Each class of invalid input is one ConfigError whose .field is the exact dotted path."""
    error = assert_config_error(raw, field)
    assert error.message
    assert str(error).startswith(field)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"doc"', b"null", '{"version": NaN}', b"\xff\xfe"],
    ids=["empty", "truncated", "array", "string", "null", "nan-literal", "not-utf8"],
)
def test_unparseable_input_is_a_document_error(raw: bytes | str) -> None:
    """Input that is not a JSON object is a ConfigError on `document`."""
    assert_config_error(raw, "document")


def test_oversized_document_is_refused() -> None:
    """A document over the size cap is refused before parsing."""
    assert_config_error(b" " * (4 * 1024 * 1024 + 1), "document")


def test_first_error_is_reported_without_partial_application() -> None:
    """A document with one bad route is refused whole: the error names that route."""
    raw = full_document()
    raw["routes"].append({"host": "*", "path_prefix": "/new", "release": "missing"})
    assert_config_error(raw, "routes.4.release")


# -- generated valid releases ---------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True)
hosts = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
urls = st.builds(
    lambda scheme, host, port: f"{scheme}://{host}" + (f":{port}" if port else ""),
    st.sampled_from(["http", "https"]),
    hosts,
    st.one_of(st.none(), st.integers(1, 65535)),
)
domains = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\.[a-z]{2,6}", fullmatch=True)
# Allow-list ids are stored in the canonical form the edge compares with (NFC, printable).
unit_ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=30,
).filter(lambda u: normalize_unit_id(u) == u)


@st.composite
def releases(draw: st.DrawFn) -> dict[str, Any]:
    rel: dict[str, Any] = {
        "stable": draw(st.lists(urls, min_size=1, max_size=3)),
        "canary": draw(st.lists(urls, min_size=1, max_size=3)),
    }
    stage = draw(st.sampled_from([*DEFAULT_STAGES, "custom"]))
    rel["stage"] = stage
    if stage == "custom":
        rel["percent"] = round(draw(st.integers(0, 100_000)) * 0.001, 3)
    rel["internal"] = {
        "unit_ids": draw(st.lists(unit_ids, max_size=3)),
        "email_domains": draw(st.lists(domains, max_size=3)),
    }
    if draw(st.booleans()):
        rel["salt"] = draw(st.text(max_size=20))
    return rel


@PROPERTIES
@given(st.dictionaries(names, releases(), min_size=1, max_size=4), st.booleans())
def test_generated_valid_releases_load(rels: dict[str, dict[str, Any]], cohort: bool) -> None:
    """Generated valid releases (0.001-step percents in [0, 100]) load and round-trip."""
    raw: dict[str, Any] = {"releases": rels}
    if cohort:
        raw["cohorts"] = {"shared": {"salt": "shared-salt"}}
        for rel in rels.values():
            rel.pop("salt", None)
            rel["cohort"] = "shared"
    raw["routes"] = [{"path_prefix": f"/{name}", "release": name} for name in rels]
    doc = load_document(raw)
    for name, rel in rels.items():
        loaded = doc.releases[name]
        assert isinstance(loaded, Release)
        if rel["stage"] == "custom":
            assert effective_percent(doc, loaded) == rel["percent"]
    assert load_document(doc.to_json()) == doc


# -- regressions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_percent_with_named_stage_is_refused(value: float) -> None:
    """A NaN or infinite percent next to a named stage is refused, not silently dropped."""
    assert_config_error(
        document(releases={"web": release(stage="beta", percent=value)}), "releases.web.percent"
    )


def test_nfd_allow_list_entry_is_refused_or_matches() -> None:
    """An allow-list id spelled in NFD either is refused or matches the (NFC) unit it names."""
    raw = document(
        releases={"web": release(stage="internal", internal={"unit_ids": ["Jose\u0301"]})}
    )
    try:
        doc = load_document(raw)
    except ConfigError as exc:
        assert exc.field == "releases.web.internal.unit_ids.0"
        return
    decision = route(compile_snapshot(doc), unit_id="Jos\u00e9")
    assert decision.reason == REASON_TARGETING_MATCH
