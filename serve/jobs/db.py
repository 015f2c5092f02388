"""Database schema and engine. SQLite + aiosqlite is the embedded default (WAL, busy_timeout,
every write in a short `BEGIN IMMEDIATE` transaction); PostgreSQL (asyncpg) by URL.

Tables are SQLAlchemy Core; the schema is created and upgraded by the Alembic migrations in
`serve/migrations` (`Database.migrate`), never by `create_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, false,
                        Text, event, text)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

metadata = MetaData()

users = Table(
    "users", metadata,
    Column("id", String(64), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(256), nullable=False),
    Column("role", String(16), nullable=False, server_default="user"),
    Column("disabled", Boolean, nullable=False, server_default=false()),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(128), nullable=False, server_default=""),
    Column("prefix", String(32), nullable=False),
    Column("key_hash", String(128), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

jobs = Table(
    "jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("model", String(128), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("spec", Text, nullable=False),  # the ResolvedSpec as JSON
    Column("status", String(16), nullable=False),  # queued | in_progress | completed | failed
    Column("progress", Integer, nullable=False, server_default=text("0")),
    Column("stage", String(64), nullable=True),
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("error_param", String(128), nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("remixed_from", String(64), nullable=True),
    Column("video_path", Text, nullable=True),
    Column("thumbnail_path", Text, nullable=True),
    Column("has_audio", Boolean, nullable=False, server_default=false()),
    Column("duration_s", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Index("ix_jobs_user_seq", "user_id", "seq"),
    Index("ix_jobs_status_seq", "status", "seq"),
)

# Webhooks: a user's endpoints, one delivery per (event, endpoint) written with the job's final
# status, and one row per attempt to send it. Deleting an endpoint deletes its pending deliveries.
webhook_endpoints = Table(
    "webhook_endpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event types
    Column("description", String(512), nullable=False, server_default=""),
    Column("secret", String(128), nullable=False),  # whsec_...; needed to sign, so not hashed
    Column("created_at", Float, nullable=False),
    Index("ix_webhook_endpoints_user_seq", "user_id", "seq"),
)

webhook_deliveries = Table(
    "webhook_deliveries", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),  # the `webhook-id` header, same on every retry
    Column("endpoint_id", String(64), ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("job_id", String(64), nullable=False),  # no foreign key: the payload outlives a deleted video
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),  # the exact JSON body that is signed and sent
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("delivered_at", Float, nullable=True),
    Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_endpoint_seq", "endpoint_id", "seq"),
)

webhook_attempts = Table(
    "webhook_attempts", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(64), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False,
           index=True),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),  # None: no HTTP answer (see error)
    Column("error", Text, nullable=True),
    Column("started_at", Float, nullable=False),
    Column("duration_ms", Float, nullable=False),
)


# Failed sign-ins (serve.api.throttle), one row per throttled subject: "user:<name>" or
# "addr:<ip>" for logins, "cred:<ip>" for bad API keys / tokens. Written only on failures.
auth_failures = Table(
    "auth_failures", metadata,
    Column("key", String(200), primary_key=True),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("lockouts", Integer, nullable=False, server_default=text("0")),
    Column("last_failure_at", Float, nullable=False),
    Column("locked_until", Float, nullable=False, server_default=text("0")),
    Index("ix_auth_failures_last_failure_at", "last_failure_at"),
)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


class _Shielded:
    """An AsyncConnection whose statements run to completion even when the task awaiting them is
    cancelled (the task still gets its CancelledError at once). A cancellation that lands while
    aiosqlite runs a statement in its thread would otherwise leave SQLAlchemy's connection
    half-way: the rollback then does nothing, and the transaction - with SQLite's write lock -
    stays open for as long as the process lives."""

    _SHIELDED = frozenset({"execute", "scalar", "scalars", "exec_driver_sql", "run_sync"})

    def __init__(self, conn: AsyncConnection):
        self._conn = conn

    def __getattr__(self, name: str):
        attr = getattr(self._conn, name)
        if name not in self._SHIELDED:
            return attr

        async def shielded(*args, **kwargs):
            return await asyncio.shield(attr(*args, **kwargs))

        return shielded


async def _close(conn: AsyncConnection) -> None:
    """Close a connection; one that cannot be closed cleanly is invalidated (its DBAPI connection
    closed, so SQLite's locks go with it)."""
    try:
        await conn.close()
    except BaseException:  # noqa: BLE001
        with contextlib.suppress(BaseException):
            await conn.invalidate()


async def _end(conn: AsyncConnection, trans, commit: bool) -> None:
    """Commit or roll back, then give the connection back; a failed commit still raises."""
    try:
        if commit:
            await trans.commit()
        else:
            await trans.rollback()
    except BaseException:
        with contextlib.suppress(BaseException):
            await conn.invalidate()
        if commit:
            raise
    finally:
        await _close(conn)


class Database:
    """Two views of one database: `read()` (deferred transactions) and `write()` (on SQLite,
    `BEGIN IMMEDIATE`, so a writer takes the lock up front and waits `busy_timeout` for it
    instead of failing mid-transaction). Keep write transactions short: never await model work
    or file I/O inside one."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000):
        self.url = url
        self.sqlite = is_sqlite(url)
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its writers' lock
        if self.sqlite:
            db_path = make_url(url).database
            if db_path and db_path != ":memory:":
                Path(db_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.read_engine = self._sqlite_engine(url, "BEGIN", busy_timeout_ms)
            self.write_engine = self._sqlite_engine(url, "BEGIN IMMEDIATE", busy_timeout_ms)
        else:
            self.read_engine = self.write_engine = create_async_engine(
                url, pool_pre_ping=True, pool_size=5, max_overflow=10)

    def _sqlite_path(self) -> Path | None:
        db_path = make_url(self.url).database if self.sqlite else None
        return Path(db_path).expanduser() if db_path and db_path != ":memory:" else None

    def local_folders(self) -> list[Path]:
        """Where the database writes on this machine (a SQLite file's folder: its journal goes there)."""
        path = self._sqlite_path()
        return [path.parent] if path is not None else []

    def restrict_file_modes(self) -> None:
        """A SQLite file (and its WAL and shared-memory files) readable by this user only (600)."""
        path = self._sqlite_path()
        if path is None:
            return
        for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                if f.stat().st_uid == os.geteuid() and f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
            except FileNotFoundError:
                pass

    @staticmethod
    def _sqlite_engine(url: str, begin: str, busy_timeout_ms: int) -> AsyncEngine:
        engine = create_async_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")  # first: the WAL switch may have to wait
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn):
            conn.exec_driver_sql(begin)

        return engine

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.read_engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        if self.sqlite:
            # SQLite has one writer at a time; its busy handler polls for the lock (sleeping up to
            # 100 ms between tries), so under a steady stream of writes from this process (progress,
            # heartbeats, claims) a waiting writer could lose every race past the busy timeout. The
            # writers of this process queue here instead, first come first served; only other
            # processes' writers meet the busy timeout.
            async with self._writer_lock():
                async with self._transaction() as conn:
                    yield conn
            return
        async with self._transaction() as conn:
            yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction whose end (commit, or rollback on any error) cannot be cut short by a
        cancellation: a request cancelled mid-write (its client went away) would otherwise leave the
        connection checked out with its transaction open - on SQLite, holding the database's one
        write lock until the garbage collector found the connection, every other writer of every
        process failing with "database is locked" meanwhile."""
        conn = await self.write_engine.connect()
        try:
            trans = await conn.begin()
        except BaseException:
            await asyncio.shield(_close(conn))
            raise
        try:
            yield _Shielded(conn)
        except BaseException:
            await asyncio.shield(_end(conn, trans, commit=False))
            raise
        await asyncio.shield(_end(conn, trans, commit=True))

    def _writer_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:  # an asyncio lock belongs to one event loop: one per loop that writes
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def migrate(self) -> None:
        """Upgrade the schema to the newest Alembic revision (idempotent; safe to race). A database
        already at the newest revision is found so by a read: no write lock is taken (every admin
        command and replica start calls this; Alembic reading its scripts inside `BEGIN IMMEDIATE`
        held SQLite's one write lock for seconds on a busy host)."""
        if await self.revision() == head_revision():
            return
        async with self.write() as conn:
            if self.write_engine.dialect.name == "postgresql":
                # replicas starting together: one migrates, the others wait, then find it done
                await conn.execute(text("SELECT pg_advisory_xact_lock(7203151)"))
            await conn.run_sync(_alembic_upgrade)

    async def revision(self) -> str | None:
        """The schema's Alembic revision, or None for a database not migrated yet."""
        try:
            async with self.read() as conn:
                return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except OperationalError:  # no such table (SQLite) ...
            return None
        except ProgrammingError:  # ... or PostgreSQL's UndefinedTable
            return None

    async def ping(self, timeout_s: float = 5.0) -> None:
        async def _ping():
            async with self.read() as conn:
                await conn.execute(text("SELECT 1"))
        await asyncio.wait_for(_ping(), timeout_s)

    async def dispose(self) -> None:
        await self.read_engine.dispose()
        if self.write_engine is not self.read_engine:
            await self.write_engine.dispose()


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest revision of the migration scripts (read once per process)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def _alembic_upgrade(connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")
