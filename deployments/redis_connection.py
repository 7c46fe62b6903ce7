"""How the app reaches Redis: one URL names a single server or a primary that Sentinels watch.

URL forms (every place that takes a Redis URL takes both: AppArgs.redis_url, REDIS_URL, the CLI):
  redis://[[user]:password@]host:port/<db>[?...]      redis-py's own (also rediss:// and unix://)
  redis+sentinel://[[user]:password@]host1:26379,host2:26379,.../<service>[/<db>][?options]

In a Sentinel URL the password (and user) are the data nodes'; the Sentinels are asked
for the current primary of `<service>` (`SENTINEL get-master-addr-by-name`), and a client
connection that breaks asks them again, so after a failover the next connection goes to
the promoted replica. While no primary is known every call fails at once, which the
callers turn into the fast 503 `billing_unavailable`.

Options of a Sentinel URL:
  sentinel_password, sentinel_username   the Sentinels' own credentials (default: none)
  socket_timeout, socket_connect_timeout seconds; default: the caller's Redis timeout
  wait_replicas                          replicas that must confirm a key or credit write
                                         (WAIT) before the admin API answers; default 1, 0: off
  wait_timeout_ms                        how long that confirmation may take; default half the
                                         socket timeout (it must be shorter than it)

Redis must not evict: a Redis that evicts under memory pressure silently drops keys and
balances. `check_eviction_policy` reads the policy once at start and warns loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.retry import Retry
from redis.sentinel import Sentinel

logger = logging.getLogger("tokenmart.redis")

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
HEALTH_CHECK_INTERVAL_S = 15
SAFE_EVICTION_POLICY = "noeviction"
_SENTINEL_OPTIONS = (
    "sentinel_password",
    "sentinel_username",
    "socket_timeout",
    "socket_connect_timeout",
    "wait_replicas",
    "wait_timeout_ms",
)


class RedisURLError(ValueError):
    """A Redis URL the app cannot use; the message names the part that is wrong."""


@dataclass(frozen=True)
class ReplicaAck:
    """Writes that must reach this many replicas (WAIT) before they are answered."""

    replicas: int
    timeout_ms: int


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = None
    wait_replicas: int = 1
    wait_timeout_ms: int | None = None

    def timeouts(self, default_s: float) -> tuple[float, float]:
        """(read, connect) timeouts in seconds: the URL's, else the caller's."""
        read = self.socket_timeout if self.socket_timeout is not None else default_s
        return read, self.socket_connect_timeout if self.socket_connect_timeout is not None else read

    def replica_ack(self, default_s: float) -> ReplicaAck | None:
        if self.wait_replicas == 0:
            return None
        read_s, _ = self.timeouts(default_s)
        timeout_ms = self.wait_timeout_ms if self.wait_timeout_ms is not None else int(read_s * 500)
        if timeout_ms >= read_s * 1000:
            raise RedisURLError(
                f"wait_timeout_ms={timeout_ms} must be shorter than the socket timeout ({read_s:g} s): "
                "a WAIT that outlasts it would fail as a timeout"
            )
        return ReplicaAck(self.wait_replicas, max(timeout_ms, 1))


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise RedisURLError(f"Sentinel address {item!r} has no host")
    try:
        port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise RedisURLError(f"Sentinel address {item!r} has a port that is not a number") from None
    return host, port


def _number(name: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise RedisURLError(f"{name}={text!r} is not a number") from None
    if value < 0:
        raise RedisURLError(f"{name}={text!r} must not be negative")
    return value


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[[user]:password@]host:port[,host:port...]/<service>[/<db>][?options]`."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise RedisURLError(f"not a {SENTINEL_SCHEME}:// URL")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = tuple(_host_port(item) for item in hosts.split(",") if item.strip())
    if not sentinels:
        raise RedisURLError(f"{SENTINEL_SCHEME}:// URL names no Sentinel (host:port[,host:port...])")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise RedisURLError(f"{SENTINEL_SCHEME}:// URL path must be /<service_name>[/<db>], not {parts.path!r}")
    db = _number("db", path[1], int) if len(path) == 2 else 0
    options: dict[str, Any] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in _SENTINEL_OPTIONS:
            raise RedisURLError(f"unknown option {name!r} in the Sentinel URL; known: {', '.join(_SENTINEL_OPTIONS)}")
        value = values[-1]
        if name in ("sentinel_password", "sentinel_username"):
            options[name] = value or None
        elif name in ("wait_replicas", "wait_timeout_ms"):
            options[name] = _number(name, value, int)
        else:
            options[name] = _number(name, value, float) or None
    return SentinelTarget(sentinels, path[0], db, username, password, **options)


def redacted(url: str) -> str:
    """The URL with its passwords replaced, for logs and status output."""
    parts = urlsplit(url)
    credentials, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    query = "&".join(
        f"{name}=***" if name.endswith("password") else f"{name}={value}"
        for name, value in (item.partition("=")[::2] for item in parts.query.split("&") if item)
    )
    return parts._replace(netloc=f"{credentials}{at}{hosts}", query=query).geturl()


def _client_options(timeout_s: float, retry: Any) -> dict[str, Any]:
    return {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": retry,
    }


def _sentinel_options(target: SentinelTarget, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options of the data-node connections, options of the Sentinel connections)."""
    read_s, connect_s = target.timeouts(timeout_s)
    sentinel_kwargs = {"socket_timeout": read_s, "socket_connect_timeout": connect_s}
    if target.sentinel_password is not None:
        sentinel_kwargs |= {"username": target.sentinel_username, "password": target.sentinel_password}
    node = {"db": target.db, "username": target.username, "password": target.password}
    return node | {"socket_timeout": read_s, "socket_connect_timeout": connect_s}, sentinel_kwargs


def connect(url: str, *, timeout_s: float = 1.0) -> aioredis.Redis:
    """A pooled asyncio client whose calls fail fast, so a dead Redis turns into a 503, not a hang.

    A connection error is retried once on a fresh connection: after Redis restarts (or a
    Sentinel failover), every pooled connection is dead, and without the retry each would
    fail one request first. Timeouts are not retried (a slow Redis must answer 503 quickly).
    """
    retry = AsyncRetry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **_client_options(timeout_s, retry))
    target = parse_sentinel_url(url)
    node, sentinel_kwargs = _sentinel_options(target, timeout_s)
    sentinel = AsyncSentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(target.service_name, **(_client_options(timeout_s, retry) | node))


def connect_sync(url: str, *, timeout_s: float = 1.0) -> redis.Redis:
    """The blocking client for the CLI and the launcher, with the same URL forms."""
    retry = Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **_client_options(timeout_s, retry))
    target = parse_sentinel_url(url)
    node, sentinel_kwargs = _sentinel_options(target, timeout_s)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(target.service_name, **(_client_options(timeout_s, retry) | node))


def replica_ack(url: str, *, timeout_s: float = 1.0) -> ReplicaAck | None:
    """The WAIT that key and credit writes take for this URL: Sentinel URLs only (a plain
    server may have no replica, and WAIT would then hold every admin write for its timeout)."""
    return parse_sentinel_url(url).replica_ack(timeout_s) if is_sentinel_url(url) else None


def describe_failure(exc: RedisError) -> str:
    """How a failed call is logged: an out-of-memory refusal says what to do about it."""
    if isinstance(exc, OutOfMemoryError):
        return f"Redis is out of memory and refuses writes (maxmemory reached, noeviction): {exc}"
    return f"{type(exc).__name__}: {exc}"


async def check_eviction_policy(client: aioredis.Redis) -> str | None:
    """Read `maxmemory-policy` once and warn loudly unless it is noeviction. Returns the policy,
    or None when it could not be read (managed Redis services often refuse CONFIG)."""
    try:
        config = await client.config_get("maxmemory*")
    except ResponseError as exc:
        logger.info("cannot read Redis's maxmemory-policy (%s); make sure it is %s", exc, SAFE_EVICTION_POLICY)
        return None
    except RedisError as exc:
        logger.warning("cannot reach Redis to read its maxmemory-policy: %r", exc)
        return None
    policy = config.get("maxmemory-policy")
    if policy != SAFE_EVICTION_POLICY:
        logger.error(
            "Redis maxmemory-policy is %r: under memory pressure Redis will EVICT API keys, balances and "
            "ledger entries. Set maxmemory-policy %s (writes are then refused with 503 instead).",
            policy,
            SAFE_EVICTION_POLICY,
        )
    elif config.get("maxmemory") in ("0", None):
        logger.info("Redis has no maxmemory: it grows until the machine runs out of memory")
    return policy
