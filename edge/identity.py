"""Who is this request? A unit id from a header, else a signed cookie, else a new one.

Precedence (documented, HARDENING.md table (a) row 40): the configured unit header (set by a
trusted auth hop), then Turnout's own signed cookie, then a fresh random id that Turnout signs
and sets. The signature (HMAC-SHA256, truncated to 128 bits) means an anonymous client cannot
pick an id, and so cannot pick its arm. Never bucket on a fresh random number without keeping
it: the cookie is what makes an anonymous user sticky (DESIGN.md §2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from flags.hashing import normalize_unit_id

SIGNATURE_BYTES = 16
_VERIFIED_CACHE_MAX = 65_536


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class CookieSigner:
    """Signs and verifies `<id>.<signature>` cookie values."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("cookie secret must be at least 16 bytes")
        self._secret = secret
        # Verifying is an HMAC (~1 µs); a returning user's cookie is verified once.
        self._verified: dict[bytes, str] = {}

    def _signature(self, unit_id: str) -> str:
        mac = hmac.new(self._secret, unit_id.encode("utf-8"), hashlib.sha256).digest()
        return _b64(mac[:SIGNATURE_BYTES])

    def sign(self, unit_id: str) -> str:
        return f"{unit_id}.{self._signature(unit_id)}"

    def verify(self, value: bytes) -> str | None:
        """The unit id in a cookie value, or None when it is not ours or was tampered with."""
        hit = self._verified.get(value)
        if hit is not None:
            return hit
        unit_raw, dot, sig = value.rpartition(b".")
        if not dot or not unit_raw or len(value) > 512:
            return None
        try:
            unit_id = unit_raw.decode("ascii")
            expected = self._signature(unit_id).encode("ascii")
        except UnicodeDecodeError:
            return None
        if not hmac.compare_digest(expected, sig):
            return None
        if len(self._verified) >= _VERIFIED_CACHE_MAX:
            self._verified.clear()
        self._verified[value] = unit_id
        return unit_id


def new_unit_id() -> str:
    """A fresh anonymous id: 96 random bits, cookie-safe characters."""
    return secrets.token_urlsafe(12)


def cookie_value(cookie_header: bytes, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header (RFC 6265 §5.4: `a=b; c=d`)."""
    start = 0
    prefix = name + b"="
    while True:
        idx = cookie_header.find(prefix, start)
        if idx < 0:
            return None
        if idx == 0 or cookie_header[idx - 1] in b" ;":
            end = cookie_header.find(b";", idx)
            raw = cookie_header[idx + len(prefix) : end if end >= 0 else None]
            return raw.strip().strip(b'"')
        start = idx + 1


class Identity:
    """Resolves the unit id of a request; built once from settings."""

    def __init__(
        self,
        signer: CookieSigner,
        *,
        cookie_name: str,
        max_age_s: int,
        secure: bool,
    ) -> None:
        self.signer = signer
        self.cookie_name = cookie_name.encode("ascii")
        attrs = f"; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Lax"
        if secure:
            attrs += "; Secure"
        self._cookie_attrs = attrs.encode("ascii")

    def resolve(
        self, header_value: bytes | None, cookie_header: bytes | None
    ) -> tuple[str, bytes | None]:
        """(unit id, Set-Cookie value to send or None)."""
        if header_value is not None:
            unit = normalize_unit_id(header_value)
            if unit is not None:
                return unit, None
        if cookie_header is not None:
            raw = cookie_value(cookie_header, self.cookie_name)
            if raw:
                unit = self.signer.verify(raw)
                if unit is not None:
                    return unit, None
        unit = new_unit_id()
        set_cookie = (
            self.cookie_name + b"=" + self.signer.sign(unit).encode("ascii") + self._cookie_attrs
        )
        return unit, set_cookie
