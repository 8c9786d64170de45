"""API keys: created once, shown once, stored only as a hash.

A key is ``ck-`` plus 32 random bytes (url-safe base64).  It is stored as its
SHA-256: a slow password hash (bcrypt, argon2) protects *low-entropy* secrets
against guessing, but a 256-bit random key cannot be guessed, and a fast hash
keeps authentication off the hot path's critical time.  Lookups are by hash,
so the plaintext never needs to exist anywhere after creation.

Backends follow the ledger's: SQLite next to it by default, the PostgreSQL
database when the ledger is there, so every replica sees the same keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from conclave.errors import BackendUnavailable, ConclaveError, InvalidRequest

KEY_PREFIX = "ck-"


class ApiKeyNotFound(ConclaveError):
    code = "api_key_not_found"
    http_status = 404


class ApiKey(BaseModel):
    """A key's record; never holds the key itself."""

    id: str
    name: str = ""
    scope: Literal["admin", "user"] = "user"
    user: str | None = None
    team: str | None = None
    #: first characters of the key, to tell keys apart in listings
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None
    requests_per_minute: int | None = Field(None, ge=0)
    tokens_per_minute: int | None = Field(None, ge=0)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class NewKey(BaseModel):
    """What ``create`` returns: the record and the secret, which is never shown again."""

    key: ApiKey
    secret: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore(Protocol):
    async def create(self, *, name: str = "", scope: str = "user", user: str | None = None,
                     team: str | None = None, requests_per_minute: int | None = None,
                     tokens_per_minute: int | None = None) -> NewKey: ...
    async def lookup(self, secret: str) -> ApiKey | None: ...
    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]: ...
    async def revoke(self, key_id: str) -> ApiKey: ...
    async def count_active(self) -> int: ...
    async def aclose(self) -> None: ...


_COLUMNS = ("id", "name", "scope", "user_id", "team", "prefix", "created_at", "revoked_at",
            "requests_per_minute", "tokens_per_minute")


def _row_to_key(row: Any) -> ApiKey:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["user"] = d.pop("user_id")
    for f in ("created_at", "revoked_at"):
        if isinstance(d[f], str):
            d[f] = datetime.fromisoformat(d[f])
    return ApiKey(**d)


def _new(name: str, scope: str, user: str | None, team: str | None, rpm: int | None,
         tpm: int | None) -> tuple[NewKey, str]:
    if scope not in ("admin", "user"):
        raise InvalidRequest(f"key scope must be admin or user, got {scope!r}")
    secret = new_secret()
    key = ApiKey(id="key_" + uuid.uuid4().hex[:12], name=name, scope=scope,  # type: ignore[arg-type]
                 user=user, team=team, prefix=secret[:10], created_at=datetime.now(UTC),
                 requests_per_minute=rpm, tokens_per_minute=tpm)
    return NewKey(key=key, secret=secret), hash_key(secret)


class _Cache:
    """Recent lookups by hash, so authentication costs no I/O on the hot path.

    A revoked key stops working within ``ttl_s`` on other replicas (at once here).
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl = ttl_s
        self._d: dict[str, tuple[float, ApiKey | None]] = {}

    def get(self, h: str) -> tuple[bool, ApiKey | None]:
        hit = self._d.get(h)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, h: str, key: ApiKey | None) -> None:
        if len(self._d) > 10_000:
            self._d.clear()
        self._d[h] = (time.monotonic() + self.ttl, key)

    def clear(self) -> None:
        self._d.clear()


class SqliteKeyStore:
    def __init__(self, path: Path, cache_ttl_s: float = 5.0) -> None:
        from conclave.accounting.backends._sqlite import SqliteRunner

        self._db = SqliteRunner(path, what="keys")
        self._cache = _Cache(cache_ttl_s)

    async def open(self) -> SqliteKeyStore:
        def setup(conn: sqlite3.Connection) -> None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, name TEXT, "
                "scope TEXT NOT NULL, user_id TEXT, team TEXT, prefix TEXT NOT NULL, "
                "created_at TEXT NOT NULL, revoked_at TEXT, requests_per_minute INTEGER, "
                "tokens_per_minute INTEGER, key_hash TEXT NOT NULL UNIQUE)")

        await self._db.open(setup)
        return self

    async def create(self, *, name: str = "", scope: str = "user", user: str | None = None,
                     team: str | None = None, requests_per_minute: int | None = None,
                     tokens_per_minute: int | None = None) -> NewKey:
        new, h = _new(name, scope, user, team, requests_per_minute, tokens_per_minute)
        k = new.key

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO api_keys ({', '.join(_COLUMNS)}, key_hash) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (k.id, k.name, k.scope, k.user, k.team, k.prefix, k.created_at.isoformat(),
                 None, k.requests_per_minute, k.tokens_per_minute, h))

        await self._db.run(insert)
        return new

    async def lookup(self, secret: str) -> ApiKey | None:
        h = hash_key(secret)
        hit, key = self._cache.get(h)
        if hit:
            return key

        def find(conn: sqlite3.Connection) -> Any:
            return conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE key_hash=?",
                                (h,)).fetchone()

        row = await self._db.run(find)
        key = _row_to_key(row) if row else None
        key = key if key is not None and key.active else None
        self._cache.put(h, key)
        return key

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"

        def rows(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM api_keys{where} "
                                "ORDER BY created_at").fetchall()

        return [_row_to_key(r) for r in await self._db.run(rows)]

    async def revoke(self, key_id: str) -> ApiKey:
        now = datetime.now(UTC).isoformat()

        def upd(conn: sqlite3.Connection) -> Any:
            conn.execute("UPDATE api_keys SET revoked_at=COALESCE(revoked_at, ?) WHERE id=?",
                         (now, key_id))
            return conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM api_keys WHERE id=?",
                                (key_id,)).fetchone()

        row = await self._db.run(upd)
        if row is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}", hint="`conclave keys list` shows ids")
        self._cache.clear()
        return _row_to_key(row)

    async def count_active(self) -> int:
        def count(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0])

        return await self._db.run(count)

    async def aclose(self) -> None:
        await self._db.close()


class PostgresKeyStore:
    """Keys in the ledger's PostgreSQL database (schema shared with the ledger)."""

    def __init__(self, url: str, schema: str, cache_ttl_s: float = 5.0) -> None:
        self._url, self._schema = url, schema
        self._cache = _Cache(cache_ttl_s)
        self._pool: Any = None

    async def open(self) -> PostgresKeyStore:
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(self._url, min_size=1, max_size=4, open=False,
                                         kwargs={"autocommit": True})
        try:
            await asyncio.wait_for(self._pool.open(wait=True), 10)
            async with self._pool.connection() as conn:
                # Advisory lock: replicas starting together must not race the DDL.
                await conn.execute("SELECT pg_advisory_lock(727401)")
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                    await conn.execute(
                        f'CREATE TABLE IF NOT EXISTS "{self._schema}".api_keys ('
                        "id TEXT PRIMARY KEY, name TEXT, scope TEXT NOT NULL, user_id TEXT, "
                        "team TEXT, prefix TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
                        "revoked_at TIMESTAMPTZ, requests_per_minute INTEGER, "
                        "tokens_per_minute INTEGER, key_hash TEXT NOT NULL UNIQUE)")
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(727401)")
        except Exception as exc:
            raise BackendUnavailable(
                f"PostgreSQL is unavailable for API keys: {type(exc).__name__}",
                backend="postgresql",
                hint="check that PostgreSQL is running and CONCLAVE_ACCOUNTING__LEDGER_URL",
            ) from None
        return self

    async def _q(self, sql: str, args: tuple[Any, ...] = (), *, many: bool = False) -> Any:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, args)
                if cur.description is None:
                    return None
                return await (cur.fetchall() if many else cur.fetchone())
        except Exception as exc:
            if isinstance(exc, ConclaveError):
                raise
            raise BackendUnavailable(
                f"PostgreSQL is unavailable for API keys: {type(exc).__name__}",
                backend="postgresql", hint="check that PostgreSQL is running") from None

    async def create(self, *, name: str = "", scope: str = "user", user: str | None = None,
                     team: str | None = None, requests_per_minute: int | None = None,
                     tokens_per_minute: int | None = None) -> NewKey:
        new, h = _new(name, scope, user, team, requests_per_minute, tokens_per_minute)
        k = new.key
        await self._q(
            f'INSERT INTO "{self._schema}".api_keys ({", ".join(_COLUMNS)}, key_hash) '
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (k.id, k.name, k.scope, k.user, k.team, k.prefix, k.created_at, None,
             k.requests_per_minute, k.tokens_per_minute, h))
        return new

    async def lookup(self, secret: str) -> ApiKey | None:
        h = hash_key(secret)
        hit, key = self._cache.get(h)
        if hit:
            return key
        row = await self._q(f'SELECT {", ".join(_COLUMNS)} FROM "{self._schema}".api_keys '
                            "WHERE key_hash=%s", (h,))
        key = _row_to_key(row) if row else None
        key = key if key is not None and key.active else None
        self._cache.put(h, key)
        return key

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = await self._q(f'SELECT {", ".join(_COLUMNS)} FROM "{self._schema}".api_keys'
                             f"{where} ORDER BY created_at", many=True)
        return [_row_to_key(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        row = await self._q(
            f'UPDATE "{self._schema}".api_keys SET revoked_at=COALESCE(revoked_at, now()) '
            f'WHERE id=%s RETURNING {", ".join(_COLUMNS)}', (key_id,))
        if row is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}", hint="`conclave keys list` shows ids")
        self._cache.clear()
        return _row_to_key(row)

    async def count_active(self) -> int:
        row = await self._q(f'SELECT count(*) FROM "{self._schema}".api_keys '
                            "WHERE revoked_at IS NULL")
        return int(row[0])

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()


async def open_key_store(settings: Any) -> KeyStore:
    """The key store beside the ledger: PostgreSQL when the ledger is there, else SQLite."""
    acc = settings.accounting
    ttl = settings.api.key_cache_ttl_s
    url = acc.ledger_url or ""
    if url.startswith(("postgresql://", "postgres://")):
        return await PostgresKeyStore(url, acc.ledger_schema, cache_ttl_s=ttl).open()
    return await SqliteKeyStore(settings.data_dir / "accounting" / "keys.db",
                                cache_ttl_s=ttl).open()
