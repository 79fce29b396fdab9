"""The configuration document: one versioned, validated, immutable JSON object.

Rules of this file:
* A document is validated *as a whole* (`load_document`): schema first (pydantic, unknown
  fields refused), then the cross-references (routes -> releases, releases -> cohorts,
  stages). Every failure is a `ConfigError` naming the dotted field; nothing is applied.
* Models are frozen. A change is a new document (`model_copy(update=...)` then validate).
* Versions only go up; the store assigns them (DESIGN.md §4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flags.errors import ConfigError
from flags.flagmodel import ApiKey, Flag, Segment, check_flags
from flags.hashing import normalize_unit_id
from flags.ratelimits import RateLimit, check_rate_limits
from flags.rollout import (
    GuardCriteria,
    Maintenance,
    Plan,
    check_guard,
    check_maintenance,
    check_plan,
)
from flags.wording import describe_error

STAGE_OFF = "off"
STAGE_INTERNAL = "internal"
STAGE_CUSTOM = "custom"
DEFAULT_STAGES: dict[str, float] = {
    "off": 0.0,
    "internal": 0.0,
    "beta": 10.0,
    "open": 50.0,
    "ga": 100.0,
}
PERCENT_STEP = 0.001
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
HOST_RE = re.compile(
    r"^(\*|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$"
)
DOMAIN_RE = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)
PATH_PREFIX_RE = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")

M = TypeVar("M", bound="BaseModel")

_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True)


class Internal(BaseModel):
    """The internal allow-list: always in the canary once the release is past `off`."""

    model_config = _MODEL
    unit_ids: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()


class Rollback(BaseModel):
    """Why the release was last rolled back (kept until the stage is moved again)."""

    model_config = _MODEL
    reason: str = Field(max_length=500)
    from_stage: str
    from_percent: float | None = None
    # The guard's figures when it rolled back by itself (issue #10: shown by `explain`).
    evidence: dict[str, str | float | int] | None = None


class Release(BaseModel):
    """A release: where stable and canary traffic go, and how much goes to the canary."""

    model_config = _MODEL
    stable: tuple[str, ...] = Field(min_length=1, max_length=64)
    canary: tuple[str, ...] = Field(min_length=1, max_length=64)
    stage: str = STAGE_OFF
    percent: float | None = None
    salt: str | None = Field(default=None, max_length=128)
    cohort: str | None = None
    internal: Internal = Internal()
    rollback: Rollback | None = None
    description: str = Field(default="", max_length=500)
    guard: GuardCriteria | None = None  # flags/rollout.py (issue #10)
    plan: Plan | None = None
    maintenance: Maintenance | None = None


class Cohort(BaseModel):
    """A named cohort: a salt shared by releases (and later flags), so 'the beta 10 %' is the
    same people everywhere."""

    model_config = _MODEL
    salt: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=500)


class Route(BaseModel):
    """Host + path prefix -> release. Host `*` matches any host."""

    model_config = _MODEL
    host: str = "*"
    path_prefix: str = "/"
    release: str
    # Flags this route's backend asks for: evaluated for the request's unit and sent upstream
    # in one header (edge/flagheader.py, issue #11), with those whose `upstream:` names the
    # release.
    flags: tuple[str, ...] = ()


class Document(BaseModel):
    """The whole configuration of one environment."""

    model_config = _MODEL
    version: int = Field(default=0, ge=0)
    stages: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_STAGES))
    cohorts: dict[str, Cohort] = Field(default_factory=dict)
    releases: dict[str, Release] = Field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    # Feature flags (issue #11; models and checks in flags/flagmodel.py).
    flags: dict[str, Flag] = Field(default_factory=dict)
    segments: dict[str, Segment] = Field(default_factory=dict)
    flags_killed: bool = False  # the global flag kill switch: every flag serves its off variant
    api_keys: dict[str, ApiKey] = Field(default_factory=dict)
    maintenance: Maintenance | None = None  # every route (issue #10)
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)  # flags/ratelimits.py

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def content(self) -> dict[str, Any]:
        """The document without its version: what 'restore version N' copies."""
        data = self.model_dump(mode="json")
        data.pop("version", None)
        return data


def effective_percent(doc: Document, release: Release) -> float:
    """The canary percentage a release's stage stands for."""
    if release.stage == STAGE_CUSTOM:
        return release.percent if release.percent is not None else 0.0
    return doc.stages.get(release.stage, 0.0)


def _schema_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    field, message = describe_error(exc.errors(include_url=False)[0], prefix)
    return ConfigError(field or "document", message)


def parse_json(data: bytes | str) -> Any:
    """Parse JSON with a size cap; a `ConfigError` on bad input."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError("document", f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError("document", f"invalid JSON: {exc}") from None


def _reject_non_finite(raw: Any, path: str = "") -> None:
    """orjson writes NaN/Infinity as null: a non-finite number must fail, not vanish."""
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(path or "document", "must be a finite number")
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            _reject_non_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(raw, (list, tuple)):
        for i, value in enumerate(raw):
            _reject_non_finite(value, f"{path}.{i}" if path else str(i))


def load_document(data: bytes | str | Mapping[str, Any]) -> Document:
    """Parse and validate a whole document, or raise `ConfigError` naming the field."""
    raw = parse_json(data) if isinstance(data, (bytes, str)) else data
    if not isinstance(raw, Mapping):
        raise ConfigError("document", "must be a JSON object")
    _reject_non_finite(raw)
    try:
        doc = Document.model_validate_json(orjson.dumps(dict(raw)))
    except ValidationError as exc:
        raise _schema_error(exc) from None
    check_document(doc)
    return doc


def load_model(model: type[M], raw: Any, prefix: str = "") -> M:
    """Validate one part (a release, a route) with the document's field naming."""
    _reject_non_finite(raw, prefix)
    try:
        return model.model_validate_json(orjson.dumps(raw))
    except ValidationError as exc:
        raise _schema_error(exc, prefix) from None
    except TypeError:
        raise ConfigError(prefix or "body", "not JSON-serialisable") from None


def _check_percent(field: str, value: float) -> None:
    if not math.isfinite(value) or value < 0 or value > 100:
        raise ConfigError(field, f"must be between 0 and 100, got {value}")
    steps = value / PERCENT_STEP
    if abs(steps - round(steps)) > 1e-6:
        raise ConfigError(field, f"must be a multiple of {PERCENT_STEP} %, got {value}")


def check_upstream_url(field: str, url: str) -> None:
    """Upstreams are `http(s)://host[:port]` with nothing else: no path, query, credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(field, f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(field, f"upstream must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigError(field, f"upstream URL has no host: {url!r}")
    if "@" in parts.netloc:  # also "http://@host" (empty userinfo)
        raise ConfigError(field, "upstream URL must not carry credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(field, f"upstream URL must not have a path or query: {url!r}")
    if port == 0:
        raise ConfigError(field, "upstream port must be 1-65535")


def _check_stages(doc: Document) -> None:
    if STAGE_OFF not in doc.stages or doc.stages[STAGE_OFF] != 0:
        raise ConfigError("stages.off", "the stage table must define 'off' as 0")
    for name, value in doc.stages.items():
        if name == STAGE_CUSTOM or not NAME_RE.match(name):
            raise ConfigError(f"stages.{name}", "invalid stage name")
        _check_percent(f"stages.{name}", value)


def _check_release(doc: Document, name: str, rel: Release) -> None:
    where = f"releases.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(where, "release names are 1-64 of a-z 0-9 _ . - (lower case)")
    for arm in ("stable", "canary"):
        for i, url in enumerate(getattr(rel, arm)):
            check_upstream_url(f"{where}.{arm}.{i}", url)
    if rel.stage == STAGE_CUSTOM:
        if rel.percent is None:
            raise ConfigError(f"{where}.percent", "required when stage is 'custom'")
        _check_percent(f"{where}.percent", rel.percent)
    else:
        if rel.stage not in doc.stages:
            known = ", ".join([*doc.stages, STAGE_CUSTOM])
            raise ConfigError(f"{where}.stage", f"unknown stage {rel.stage!r} (known: {known})")
        if rel.percent is not None:
            raise ConfigError(f"{where}.percent", "only allowed with stage 'custom'")
    if rel.salt is not None and rel.cohort is not None:
        raise ConfigError(f"{where}.cohort", "set either salt or cohort, not both")
    if rel.cohort is not None and rel.cohort not in doc.cohorts:
        raise ConfigError(f"{where}.cohort", f"unknown cohort {rel.cohort!r}")
    for i, domain in enumerate(rel.internal.email_domains):
        if not DOMAIN_RE.match(domain):
            raise ConfigError(f"{where}.internal.email_domains.{i}", f"invalid domain {domain!r}")
    for i, uid in enumerate(rel.internal.unit_ids):
        if normalize_unit_id(uid) != uid:
            raise ConfigError(
                f"{where}.internal.unit_ids.{i}",
                "invalid unit id (must be trimmed, NFC-normalised, printable, at most 256 bytes)",
            )
    if rel.guard is not None:
        check_guard(f"{where}.guard", rel.guard)
    if rel.plan is not None:
        check_plan(f"{where}.plan", rel.plan, doc.stages)
    if rel.maintenance is not None:
        check_maintenance(f"{where}.maintenance", rel.maintenance)


def check_document(doc: Document) -> None:
    """Cross-field validation of a parsed document."""
    _check_stages(doc)
    if doc.maintenance is not None:
        check_maintenance("maintenance", doc.maintenance)
    for name in doc.cohorts:
        if not NAME_RE.match(name):
            raise ConfigError(f"cohorts.{name}", "invalid cohort name")
    for name, rel in doc.releases.items():
        _check_release(doc, name, rel)
    seen: dict[tuple[str, str], int] = {}
    for i, route in enumerate(doc.routes):
        where = f"routes.{i}"
        if route.host != route.host.lower() or not HOST_RE.match(route.host):
            raise ConfigError(f"{where}.host", f"invalid host {route.host!r} (lower case, no port)")
        if not PATH_PREFIX_RE.match(route.path_prefix) or "/../" in route.path_prefix + "/":
            raise ConfigError(f"{where}.path_prefix", "must start with / and be a plain path")
        if route.release not in doc.releases:
            raise ConfigError(f"{where}.release", f"unknown release {route.release!r}")
        for j, flag in enumerate(route.flags):
            if flag not in doc.flags:
                raise ConfigError(f"{where}.flags.{j}", f"unknown flag {flag!r}")
        if len(set(route.flags)) != len(route.flags):
            raise ConfigError(f"{where}.flags", "a flag is listed twice")
        key = (route.host, route.path_prefix)
        if key in seen:
            raise ConfigError(
                f"{where}",
                f"duplicate route {route.host} {route.path_prefix} (also routes.{seen[key]})",
            )
        seen[key] = i
    check_flags(doc)
    check_rate_limits(doc.rate_limits, doc.releases, NAME_RE)
