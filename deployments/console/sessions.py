"""Console sign-in sessions, kept in Redis (no other database).

Signing in exchanges an API key (or the admin token) for a random session token, sent back
as an HttpOnly, SameSite=Strict cookie. The key itself is never stored in the browser, in the
session or in a page: a customer session names its key by id, and every page checks the key
again (a revoked or expired key ends its sessions at the next page). Redis holds the session
under the SHA-256 of its token, so its contents cannot be replayed from a Redis dump, with a
TTL: a session ends `SESSION_TTL_S` after sign-in, or at sign-out.

Every session has its own CSRF token, which each form carries in a hidden field and each
htmx request in the `X-CSRF-Token` header; a POST without the session's token is refused.
The sign-in forms (before any session) use a double-submit token: a random cookie whose
value the form must repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Literal

import redis.asyncio as aioredis

COOKIE = "tm_console"
LOGIN_CSRF_COOKIE = "tm_console_login"
SESSION_TTL_S = 8 * 3600
SESSION_PREFIX = "tm:console:session:"

Kind = Literal["customer", "admin"]


@dataclass(frozen=True)
class Session:
    kind: Kind
    csrf: str
    created_at: int
    expires_at: int
    key_id: str = ""  # customer sessions: the key signed in with (by id, never the secret)
    org_id: str = ""
    admin_mark: str = ""  # admin sessions: `admin_mark` of the token signed in with


def admin_mark(token: str) -> str:
    """What an admin session keeps of the admin token: a new token ends the old sessions."""
    return hashlib.sha256(b"tokenmart console admin\0" + token.encode()).hexdigest()


def _stored_as(token: str) -> str:
    return SESSION_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def same_token(given: str | None, expected: str) -> bool:
    """A constant-time comparison of a submitted CSRF token with the expected one."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())  # type: ignore[union-attr]


class ConsoleSessions:
    def __init__(self, redis: aioredis.Redis, ttl_s: int = SESSION_TTL_S) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def start(
        self, kind: Kind, *, key_id: str = "", org_id: str = "", admin_token: str = ""
    ) -> tuple[str, Session]:
        """A new session; returns its token (for the cookie only) and the session."""
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        mark = admin_mark(admin_token) if admin_token else ""
        session = Session(kind, secrets.token_urlsafe(32), now, now + self.ttl_s, key_id, org_id, mark)
        await self.redis.set(_stored_as(token), json.dumps(asdict(session)), ex=self.ttl_s)
        return token, session

    async def find(self, token: str | None) -> Session | None:
        if not token or len(token) > 128:
            return None
        raw = await self.redis.get(_stored_as(token))
        return Session(**json.loads(raw)) if raw else None

    async def end(self, token: str | None) -> None:
        if token and len(token) <= 128:
            await self.redis.delete(_stored_as(token))
