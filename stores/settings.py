"""Settings, built once at start-up and passed down (DESIGN.md §1 rule 3).

Sources, strongest first: explicit arguments, `TURNOUT_*` environment variables, the YAML
file given to `turnout serve --config FILE`, then these defaults. No other module reads the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flags.errors import ConfigError
from flags.wording import describe_error
from stores.yamlfile import YamlError, read_mapping_file

ENV_PREFIX = "TURNOUT_"
STORE_SCHEMES = ("file", "redis", "rediss", "unix", "redis+sentinel")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_WORKERS = 256  # far above any core count we run on; a typo like 4000 is refused

EDGE_SERVER_REMOVED = (
    "edge_server was removed: the edge always runs its own HTTP server; "
    "use workers: N for more cores"
)


class SettingsError(ConfigError):
    """A setting that cannot be used: `field` is the setting's name, the message says why
    and where to change it (the settings file key or the `TURNOUT_*` variable)."""


class YamlFileSource(PydanticBaseSettingsSource):
    """The settings file, read by Turnout's one YAML loader (YAML 1.2, duplicate keys
    refused with their line) instead of pydantic-settings' PyYAML source."""

    def __init__(self, settings_cls: type[BaseSettings], path: str) -> None:
        super().__init__(settings_cls)
        self.data = read_mapping_file(path, "the settings")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


class Settings(BaseSettings):
    """Every knob of a Turnout process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # Listeners
    edge_host: str = "127.0.0.1"
    edge_port: int = Field(default=8080, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8081, ge=0, le=65535)
    admin_token: SecretStr | None = None
    # Removed (issue #9): kept only so that setting it fails at start-up with a message
    # naming the replacement instead of being ignored (environment) or refused unexplained.
    edge_server: str | None = Field(default=None, exclude=True)
    # Client-side deadlines of the edge (HARDENING §2.7): an idle keep-alive connection is
    # closed; a request head must be complete this long after its first byte (else 408); a
    # request body or a full send buffer may stall this long (else 408 / abort).
    client_keepalive_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    client_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    client_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Client connections one edge process holds at once (nginx's `worker_connections`,
    # uvicorn's `--limit-concurrency`); a connection beyond it gets 503 + Retry-After and is
    # closed (edge/frontend.py). And the listen queue's length (the kernel caps it at
    # net.core.somaxconn).
    max_client_connections: int = Field(default=16384, ge=1, le=1_000_000)
    listen_backlog: int = Field(default=4096, ge=1, le=65535)
    # Edge processes sharing the edge port (SO_REUSEPORT), as nginx's `worker_processes`:
    # a number, or "auto" for one per core. 1 runs the edge inside the main process.
    workers: int | Literal["auto"] = 1

    # Where this instance keeps its own files: the embedded store (unless `store` says
    # otherwise), the bootstrap copy, and generated secrets (admin token, cookie secret).
    state_dir: str = "./turnout-data"
    # Store: empty = embedded file store in <state_dir>/store; a directory path or file://PATH;
    # redis://host:port/db; redis+sentinel://host:port,host:port/master-name
    store: str = ""
    bootstrap_path: str | None = None  # default <state_dir>/bootstrap.json
    poll_interval_s: float = Field(default=2.0, gt=0, le=60)
    # Redis: an admin write is reported done only once this many replicas have it (WAIT), so
    # a failover cannot drop a write that was answered 200. Default: 1 with Sentinel, else 0.
    store_wait_replicas: int | None = Field(default=None, ge=0, le=10)
    store_wait_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    # Initial document (YAML or JSON file) written as version 1 when the store is empty.
    seed_file: str | None = None
    # The same, inline in the YAML settings file.
    seed: dict[str, Any] | None = None

    # Identity
    unit_header: str = "x-user-id"
    unit_cookie: str = "turnout_uid"
    email_header: str = "x-user-email"
    cookie_secret: SecretStr | None = None
    cookie_max_age_s: int = Field(default=365 * 24 * 3600, ge=60)
    cookie_secure: bool = False

    # Forwarding
    trusted_hops: int = Field(default=0, ge=0, le=10)
    expose_decision_headers: bool = False
    via_name: str = "turnout"
    # `Via` on requests to the upstream (RFC 9110 §7.6.3). Off by default, as in nginx, Envoy
    # and HAProxy: an nginx upstream with its default `gzip_proxied off` does not compress a
    # response to any request carrying `Via`, so turning this on can multiply the bytes sent
    # (issue #12: 2 MB instead of 398 KB). Responses to clients always carry Turnout's `Via`.
    via_upstream: bool = False
    # `Location` / `Content-Location` pointing at the answering upstream are made relative
    # (client-facing), as nginx's `proxy_redirect default` (edge/redirects.py).
    rewrite_upstream_redirects: bool = True
    upstream_connect_timeout_s: float = Field(default=2.0, gt=0)
    upstream_read_timeout_s: float = Field(default=30.0, gt=0)
    upstream_write_timeout_s: float = Field(default=30.0, gt=0)
    upstream_pool_timeout_s: float = Field(default=5.0, gt=0)
    upstream_keepalive_s: float = Field(default=4.0, gt=0)
    upstream_max_connections: int = Field(default=512, ge=1)
    max_request_body_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    # Request buffering (issue #12, nginx's `proxy_request_buffering on`): a body up to this
    # size is read whole, within `client_body_timeout_s` of its first bytes, before an
    # upstream connection is taken; a larger one streams once this much has arrived, and
    # must then keep up `client_body_min_rate_bps` over every `client_body_rate_window_s`.
    client_body_buffer_bytes: int = Field(default=1024 * 1024, ge=0, le=1024 * 1024 * 1024)
    client_body_timeout_s: float = Field(default=60.0, gt=0, le=86400)
    client_body_min_rate_bps: int = Field(default=1024, ge=0)
    client_body_rate_window_s: float = Field(default=10.0, gt=0, le=3600)
    # OFREP is served under <ofrep_path_prefix>/ofrep/v1/ on the edge (docs/flags.md): a
    # prefix such as "/tools/ff" for clients configured with a base URL that has a path.
    ofrep_path_prefix: str = Field(default="", pattern=r"^(/[A-Za-z0-9._~-]+)*$", max_length=128)

    # Guarded delivery (issue #10): the guard judges every `guard_interval_s`; webhooks get a
    # JSON POST per rollback, phase advance, hold and approval request, signed with
    # HMAC-SHA256 of `webhook_secret` (header X-Turnout-Signature: sha256=<hex>).
    guard_enabled: bool = True
    guard_interval_s: float = Field(default=1.0, ge=0.1, le=60)
    instance_id: str | None = Field(default=None, max_length=64)
    webhook_urls: list[str] = Field(default_factory=list, max_length=20)
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(default=2.0, gt=0, le=30)
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_deadline_s: float = Field(default=60.0, gt=0, le=3600)
    # After a rollback, the release's open canary WebSocket tunnels are closed with 1012
    # ("service restart": reconnect) after this grace; their new upgrades go to stable.
    websocket_rollback_grace_s: float = Field(default=5.0, ge=0, le=3600)

    # Logs: "human" lines (time, level, logger, message) or one JSON object per line.
    log_level: str = "info"
    log_format: Literal["human", "json"] = "human"
    # The edge's access log (edge/accesslog.py): one line per exchange, formatted and written
    # off the request path in batches. "stdout", "stderr", a file path, or "off".
    access_log: str = "stdout"
    access_log_format: Literal["json", "human"] = "json"
    # The unit id in access log lines: "hash" (a short keyed digest: the same user gives the
    # same value, which cannot be turned back into the id) or "omit".
    access_log_unit_id: Literal["hash", "omit"] = "hash"
    # GET /metrics without the admin token. Off: it needs the token like every other read
    # when the admin listener is not on loopback.
    metrics_open: bool = True

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | str:
        # One line naming the setting, whatever the source (YAML, TURNOUT_WORKERS, --workers).
        if isinstance(value, str):
            value = value.strip().lower()
            if value == "auto":
                return "auto"
            if not value.isdigit():
                raise ValueError(f'must be a whole number from 1 to {MAX_WORKERS} or "auto"')
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            raise ValueError(f'must be a whole number from 1 to {MAX_WORKERS} or "auto"')
        return int(value)

    @property
    def worker_count(self) -> int:
        """`workers` resolved: "auto" is the number of cores this process may run on."""
        if self.workers == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        return self.workers

    @field_validator("edge_server")
    @classmethod
    def _removed_edge_server(cls, value: str | None) -> None:
        if value is not None:
            # ConfigError, not ValueError: pydantic passes it through unwrapped, so the
            # operator reads one line instead of a validation report.
            raise ConfigError("", EDGE_SERVER_REMOVED)
        return None

    @field_validator("unit_header", "email_header", "unit_cookie")
    @classmethod
    def _token(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c in value for c in ' \t\r\n:;,="') or not value.isascii():
            raise ValueError("must be a header/cookie name token")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of: {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        value = value.strip()
        scheme, sep, _ = value.partition("://")
        if sep and scheme.lower() not in STORE_SCHEMES:
            known = ", ".join(f"{name}://" for name in STORE_SCHEMES)
            raise ValueError(f"must be a directory path or a URL starting with {known}")
        return value

    @field_validator("access_log")
    @classmethod
    def _access_log(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('must be "stdout", "stderr", a file path, or "off"')
        return value.strip()

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")) or len(url) > 2048:
                raise ValueError(f"webhook URLs must be http:// or https:// URLs, got {url!r}")
        return urls

    @model_validator(mode="after")
    def _webhook_secret(self) -> Settings:
        # Receivers must be able to tell our events from forgeries (issue #10: signed).
        if self.webhook_urls and (
            self.webhook_secret is None or not self.webhook_secret.get_secret_value()
        ):
            raise ValueError("webhook_secret is required when webhook_urls are set")
        return self

    @field_validator("unit_header", "email_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()  # the front-end lower-cases header names (edge/frontend.py)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        settings_file: str | None = getattr(settings_cls, "settings_file", None)
        if settings_file is not None:
            sources.append(YamlFileSource(settings_cls, settings_file))
        return tuple(sources)

    @property
    def uses_redis(self) -> bool:
        return self.store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://"))

    @property
    def wait_replicas(self) -> int:
        if self.store_wait_replicas is not None:
            return self.store_wait_replicas
        return 1 if self.store.startswith("redis+sentinel://") else 0

    @property
    def store_dir(self) -> Path | None:
        """The embedded store's directory, or None for Redis."""
        if self.uses_redis:
            return None
        if not self.store:
            return Path(self.state_dir) / "store"
        return Path(self.store.removeprefix("file://"))

    @property
    def bootstrap_file(self) -> Path:
        return Path(self.bootstrap_path or Path(self.state_dir) / "bootstrap.json")


def setting_names(field: str) -> str:
    """Where a setting is set: its settings-file key and its environment variable."""
    key = field.split(".", 1)[0]
    return f"settings key {key!r} or {ENV_PREFIX}{key.upper()}"


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment and an optional YAML file.

    Any failure is one `SettingsError` naming the setting, where to change it and the value
    given (never pydantic's wording): a bad file, an unknown key, a value out of range."""
    try:
        if config_file is None:
            return Settings(**overrides)

        class FileSettings(Settings):
            # pydantic-settings asks the class for its sources (settings_customise_sources).
            settings_file: ClassVar[str | None] = config_file

        return FileSettings(**overrides)
    except YamlError as exc:
        raise SettingsError("config", str(exc)) from None
    except ValidationError as exc:
        field, message = describe_error(exc.errors(include_url=False)[0])
        if message == "unknown field":
            message = "unknown setting (see the settings table in the README)"
        if not field:  # a check across settings (webhook_secret with webhook_urls)
            where = f" (in {config_file})" if config_file else ""
        elif config_file:
            where = f" (in {config_file} or {ENV_PREFIX}{field.upper()})"
        else:
            where = f" ({ENV_PREFIX}{field.upper()})"
        raise SettingsError(field or "settings", message + where) from None


# Settings a running instance takes on SIGHUP (turnout/server.py, turnout/workers.py); a change
# to any other needs a restart, and SIGHUP says so for each one.
LIVE_SETTINGS = frozenset(
    {
        "log_level",
        "log_format",
        "client_keepalive_timeout_s",
        "client_header_timeout_s",
        "client_idle_timeout_s",
        "max_client_connections",
        "max_request_body_bytes",
        "client_body_buffer_bytes",
        "client_body_timeout_s",
        "client_body_min_rate_bps",
        "client_body_rate_window_s",
    }
)


def settings_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """The settings that differ between `old` and `new`: (taken live, needing a restart)."""
    before, after = old.model_dump(), new.model_dump()
    changed = sorted(name for name in after if before.get(name) != after[name])
    live = [name for name in changed if name in LIVE_SETTINGS]
    return live, [name for name in changed if name not in LIVE_SETTINGS]
