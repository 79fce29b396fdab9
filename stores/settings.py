"""Settings, built once at start-up and passed down (DESIGN.md §1 rule 3).

Sources, strongest first: explicit arguments, `TURNOUT_*` environment variables, the YAML
file given to `turnout serve --config FILE`, then these defaults. No other module reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flags.errors import ConfigError
from flags.wording import describe_error
from stores.yamlfile import YamlError, read_mapping_file

ENV_PREFIX = "TURNOUT_"
STORE_SCHEMES = ("file", "redis", "rediss", "unix", "redis+sentinel")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


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
    # The edge's HTTP/1.1 server: "turnout" (edge/frontend.py, no ASGI) or "uvicorn" (the
    # same pipeline behind the ASGI adapter, uvicorn's httptools protocol).
    edge_server: Literal["turnout", "uvicorn"] = "turnout"
    # Client-side deadlines of the edge (HARDENING §2.7): an idle keep-alive connection is
    # closed; a request head must be complete this long after its first byte (else 408); a
    # request body or a full send buffer may stall this long (else 408 / abort).
    client_keepalive_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    client_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    client_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)

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
    upstream_connect_timeout_s: float = Field(default=2.0, gt=0)
    upstream_read_timeout_s: float = Field(default=30.0, gt=0)
    upstream_write_timeout_s: float = Field(default=30.0, gt=0)
    upstream_pool_timeout_s: float = Field(default=5.0, gt=0)
    upstream_keepalive_s: float = Field(default=4.0, gt=0)
    upstream_max_connections: int = Field(default=512, ge=1)
    max_request_body_bytes: int = Field(default=100 * 1024 * 1024, ge=0)

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

    @field_validator("unit_header", "email_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()  # ASGI header names arrive lower-cased

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
        where = (
            f" (in {config_file} or {ENV_PREFIX}{field.upper()})"
            if config_file
            else (f" ({ENV_PREFIX}{field.upper()})")
        )
        raise SettingsError(field or "settings", message + where) from None
