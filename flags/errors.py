"""One exception tree for the core (modelled on httpx's): callers catch `TurnoutError`."""

from __future__ import annotations


class TurnoutError(Exception):
    """Base of every error Turnout raises on purpose."""


class ConfigError(TurnoutError):
    """A configuration document (or a change to one) is invalid.

    `field` is a dotted path into the document (``releases.web.percent``) so that an API
    client, a CLI user or a log reader knows exactly what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class StoreError(TurnoutError):
    """The configuration store failed; the store modules map their backend's errors to this."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now (connection refused, timeout, failover)."""


class VersionConflict(StoreError):
    """A compare-and-set write lost: the store is not at the version the writer expected."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"expected version {expected}, store is at version {actual}")
        self.expected = expected
        self.actual = actual


class VersionNotFound(StoreError):
    """The requested version is not in the store's history."""

    def __init__(self, version: int) -> None:
        super().__init__(f"version {version} not found")
        self.version = version
