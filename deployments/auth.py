"""API key format, hashing and admin-token checks.

Keys look like `sk-tm-<32 base62 chars><6 base62 checksum chars>`. The checksum lets the
ingress refuse typos and garbage without touching Redis. Redis only ever sees the key's
sha256; the secrets index maps it to the key's organization and id (keystore.py).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib

from .errors import AuthenticationFailed
from .scripts import Verdict

KEY_PREFIX = "sk-tm-"
_ALPHABET = string.digits + string.ascii_letters  # base62
_BODY_LEN = 32
_CHECKSUM_LEN = 6
KEY_LENGTH = len(KEY_PREFIX) + _BODY_LEN + _CHECKSUM_LEN
_ALPHABET_SET = frozenset(_ALPHABET)


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32((KEY_PREFIX + body).encode()), _CHECKSUM_LEN)


def generate_key() -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LEN))
    return KEY_PREFIX + body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Format and checksum only; no I/O."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:_BODY_LEN], rest[_BODY_LEN:]
    return hmac.compare_digest(_checksum(body), check)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def legacy_key_id(key_hash: str) -> str:
    """The id keys had before organizations (derived from the secret's hash); `tokenmart
    migrate` keeps it. New keys get random ids, which survive a rotation of their secret."""
    return "key_" + key_hash[:20]


def display_prefix(key: str) -> str:
    """What listings show: enough to recognise a key, useless to use it."""
    return f"{key[: len(KEY_PREFIX) + 4]}...{key[-4:]}"


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it as 'Authorization: Bearer sk-tm-...'.",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer <key>'.")
    return token.strip()


def parse_api_key(authorization: str | None) -> str:
    """Return the key's sha256 for a well-formed key, or raise 401 without any lookup."""
    key = bearer_token(authorization)
    if not is_well_formed(key):
        raise AuthenticationFailed("Incorrect API key provided. Keys look like sk-tm-... (check for typos).")
    return hash_key(key)


def hashes_match(stored_hash: str, presented_hash: str) -> bool:
    return hmac.compare_digest(stored_hash.encode(), presented_hash.encode())


def check_admin_token(authorization: str | None, admin_token: str | None) -> None:
    if not admin_token:
        raise AuthenticationFailed(
            "The admin API is disabled: set TOKENMART_ADMIN_TOKEN on the cluster.", code="admin_disabled"
        )
    token = bearer_token(authorization)
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise AuthenticationFailed("Incorrect admin token.", code="invalid_admin_token")


_KEY_REFUSALS = {
    Verdict.UNKNOWN_KEY: ("Incorrect API key provided.", "invalid_api_key"),
    Verdict.REVOKED_KEY: ("This API key has been revoked.", "revoked_api_key"),
    Verdict.EXPIRED_KEY: ("This API key has expired.", "expired_api_key"),
    Verdict.ROTATED_KEY: ("This API key's secret was rotated; use its new secret.", "rotated_api_key"),
}


def auth_refusal(verdict: int) -> AuthenticationFailed | None:
    """The 401 for a key the key check (lua/lib/key_check.lua) refused; None for other verdicts."""
    if verdict not in _KEY_REFUSALS:
        return None
    message, code = _KEY_REFUSALS[Verdict(verdict)]
    return AuthenticationFailed(message, code=code)
