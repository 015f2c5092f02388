"""`cinevivid users ...` and `cinevivid keys ...`: user and API-key administration straight
against the configured database (`CINEVIVID_DATABASE_URL`, else the SQLite file in
`CINEVIVID_DATA_DIR`; `--database-url` / `--data-dir` override)."""

from __future__ import annotations

import asyncio
import getpass
import secrets
import sys

from sqlalchemy import select

from serve.api.auth import Authenticator
from serve.jobs.db import Database, api_keys, users
from serve.config import IngressConfig


def _database(database_url: str | None = None, data_dir: str | None = None) -> Database:
    cfg = IngressConfig(database_url=database_url, data_dir=data_dir)
    return Database(cfg.resolved_database_url(), busy_timeout_ms=cfg.sqlite_busy_timeout_ms)


async def add_user(username: str, password: str, *, admin: bool = False, database_url: str | None = None,
                   data_dir: str | None = None) -> dict:
    db = _database(database_url, data_dir)
    try:
        await db.migrate()
        # The JWT secret is not needed to manage users and keys.
        return await Authenticator(db, secret="-").create_user(username, password, "admin" if admin else "user")
    finally:
        await db.dispose()


async def create_key(username: str, name: str = "", *, database_url: str | None = None,
                     data_dir: str | None = None) -> dict:
    db = _database(database_url, data_dir)
    try:
        await db.migrate()
        auth = Authenticator(db, secret="-")
        user = await auth.get_user_by_name(username)
        if user is None:
            raise LookupError(f"no user named {username!r}")
        return await auth.create_api_key(user["id"], name)
    finally:
        await db.dispose()


async def revoke_key(key_id: str, *, database_url: str | None = None, data_dir: str | None = None) -> bool:
    db = _database(database_url, data_dir)
    try:
        await db.migrate()
        return await Authenticator(db, secret="-").revoke_api_key(key_id)
    finally:
        await db.dispose()


async def list_users(*, database_url: str | None = None, data_dir: str | None = None) -> list[dict]:
    db = _database(database_url, data_dir)
    try:
        await db.migrate()
        async with db.read() as conn:
            rows = (await conn.execute(select(users.c.id, users.c.username, users.c.role, users.c.created_at)
                                       .order_by(users.c.created_at))).mappings().all()
            return [dict(r) for r in rows]
    finally:
        await db.dispose()


async def list_keys(username: str, *, database_url: str | None = None, data_dir: str | None = None) -> list[dict]:
    db = _database(database_url, data_dir)
    try:
        await db.migrate()
        async with db.read() as conn:
            rows = (await conn.execute(select(api_keys.c.id, api_keys.c.name, api_keys.c.prefix,
                                              api_keys.c.revoked_at).join(users, users.c.id == api_keys.c.user_id)
                                       .where(users.c.username == username))).mappings().all()
            return [dict(r) for r in rows]
    finally:
        await db.dispose()


# ---- command handlers (their parsers are in serve.ops.cli) ----
def cmd_users_add(args) -> int:
    """Password: generated with --generate; else read from stdin (a pipe, or --password-stdin);
    else asked interactively. An empty password means: generate one (printed once)."""
    if args.generate:
        password = ""
    elif args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name} (empty: generate one): ")
    generated = not password
    password = password or secrets.token_urlsafe(16)
    user = asyncio.run(add_user(args.name, password, admin=args.admin, database_url=args.database_url,
                                data_dir=args.data_dir))  # an error: one line, by serve.ops.cli.main
    print(f"created {user['role']} {user['username']} ({user['id']})")
    if generated:
        print(f"password: {password}")
    return 0


def cmd_users_list(args) -> int:
    for u in asyncio.run(list_users(database_url=args.database_url, data_dir=args.data_dir)):
        print(f"{u['id']}  {u['username']}  {u['role']}")
    return 0


def cmd_keys_create(args) -> int:
    key = asyncio.run(create_key(args.name, args.key_name or "", database_url=args.database_url,
                                 data_dir=args.data_dir))  # no such user: LookupError, one line
    print(f"key id: {key['id']}", file=sys.stderr)
    print(key["key"])
    return 0


def cmd_keys_revoke(args) -> int:
    if not asyncio.run(revoke_key(args.key_id, database_url=args.database_url, data_dir=args.data_dir)):
        print(f"error: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def cmd_keys_list(args) -> int:
    for k in asyncio.run(list_keys(args.name, database_url=args.database_url, data_dir=args.data_dir)):
        state = "revoked" if k["revoked_at"] else "active"
        print(f"{k['id']}  {k['prefix']}...  {k['name']}  {state}")
    return 0
