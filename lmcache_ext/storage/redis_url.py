"""``remote_url`` -> a typed ``RedisTarget``: where the shared store is and how to reach it.

Forms (``config.REMOTE_SCHEMES``): ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS),
``valkey://`` / ``valkeys://`` (the same protocol), ``redis+cluster://host:port`` and
``rediss+cluster://`` (Redis Cluster; the host is any one node, the rest are discovered).
Query options for TLS: ``ssl_ca_certs=PATH`` (a private CA, e.g. a test certificate) and
``ssl_cert_reqs=required|optional|none``. The password from the env var named by
``remote_password_env`` replaces one in the URL, so it never has to sit in a config file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from lmcache_ext.config import REMOTE_SCHEMES

DEFAULT_PORT = 6379
CERT_REQS = ("required", "optional", "none")
QUERY_KEYS = ("ssl_ca_certs", "ssl_cert_reqs")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``remote_url``. ``password`` is a secret: log ``display()``, never the object."""

    host: str
    port: int
    db: int = 0
    tls: bool = False
    cluster: bool = False
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"

    def display(self) -> str:
        """The URL with the password masked, for logs."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        user = self.username or ""
        auth = f"{user}:***@" if self.password else (f"{user}@" if user else "")
        db = f"/{self.db}" if self.db else ""
        return f"{scheme}://{auth}{self.host}:{self.port}{db}"

    def with_password(self, password: str | None) -> RedisTarget:
        return self if password is None else replace(self, password=password)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``url``; raises ``ValueError`` saying what is wrong (the caller names the key)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    base = scheme.split("+", 1)[0]
    if not parts.hostname:
        raise ValueError("no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:  # urlsplit raises on a non-numeric or out-of-range port
        raise ValueError(f"bad port: {exc}") from exc
    cluster = scheme.endswith("+cluster")
    db = _db(parts.path)
    if cluster and db:
        raise ValueError("Redis Cluster has only database 0")
    query = _query(parts.query)
    return RedisTarget(
        host=parts.hostname, port=port, db=db, tls=base in ("rediss", "valkeys"), cluster=cluster,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ssl_ca_certs=query.get("ssl_ca_certs"),
        ssl_cert_reqs=query.get("ssl_cert_reqs", "required"))


def _db(path: str) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"database must be a number, got {text!r}")
    return int(text)


def _query(text: str) -> dict[str, str]:
    values = {name: items[-1] for name, items in parse_qs(text).items()}
    unknown = sorted(set(values) - set(QUERY_KEYS))
    if unknown:
        raise ValueError(f"unknown URL option(s) {unknown}; known: {list(QUERY_KEYS)}")
    if values.get("ssl_cert_reqs", "required") not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {CERT_REQS}")
    return values
