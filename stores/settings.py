"""Settings, built once at start-up and passed down (DESIGN.md §1 rule 3).

Sources, strongest first: explicit arguments, `TURNOUT_*` environment variables, the YAML
file given to `turnout serve --config FILE`, then these defaults. No other module reads the
environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class Settings(BaseSettings):
    """Every knob of a Turnout process."""

    model_config = SettingsConfigDict(env_prefix="TURNOUT_", extra="forbid", yaml_file=None)

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

    log_level: str = "info"

    @field_validator("unit_header", "email_header", "unit_cookie")
    @classmethod
    def _token(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c in value for c in ' \t\r\n:;,="') or not value.isascii():
            raise ValueError("must be a header/cookie name token")
        return value

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
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @property
    def uses_redis(self) -> bool:
        return self.store.startswith(("redis://", "rediss://", "redis+sentinel://"))

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


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build the settings from the environment and an optional YAML file."""
    if config_file is None:
        return Settings(**overrides)

    class FileSettings(Settings):
        model_config = SettingsConfigDict(
            env_prefix="TURNOUT_", extra="forbid", yaml_file=config_file
        )

    return FileSettings(**overrides)
