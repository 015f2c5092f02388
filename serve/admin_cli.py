"""`cinevivid users ...` and `cinevivid keys ...`: user and API-key administration straight
against the configured database (`CINEVIVID_DATABASE_URL`, else the SQLite file in
`CINEVIVID_DATA_DIR`; `--database-url` / `--data-dir` override)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets
import sys

from sqlalchemy import select

from serve.auth import Authenticator
from serve.db import Database, api_keys, users
from serve.ingress_config import IngressConfig


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


# ---- argparse ----
def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=None, help="default: $CINEVIVID_DATABASE_URL or the data dir's SQLite")
    p.add_argument("--data-dir", default=None, help="default: $CINEVIVID_DATA_DIR")


def _cmd_users_add(args) -> int:
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
    try:
        user = asyncio.run(add_user(args.name, password, admin=args.admin, database_url=args.database_url,
                                    data_dir=args.data_dir))
    except Exception as exc:  # noqa: BLE001
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(f"created {user['role']} {user['username']} ({user['id']})")
    if generated:
        print(f"password: {password}")
    return 0


def _cmd_users_list(args) -> int:
    for u in asyncio.run(list_users(database_url=args.database_url, data_dir=args.data_dir)):
        print(f"{u['id']}  {u['username']}  {u['role']}")
    return 0


def _cmd_keys_create(args) -> int:
    try:
        key = asyncio.run(create_key(args.name, args.key_name or "", database_url=args.database_url,
                                     data_dir=args.data_dir))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"key id: {key['id']}", file=sys.stderr)
    print(key["key"])
    return 0


def _cmd_keys_revoke(args) -> int:
    if not asyncio.run(revoke_key(args.key_id, database_url=args.database_url, data_dir=args.data_dir)):
        print(f"error: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _cmd_keys_list(args) -> int:
    for k in asyncio.run(list_keys(args.name, database_url=args.database_url, data_dir=args.data_dir)):
        state = "revoked" if k["revoked_at"] else "active"
        print(f"{k['id']}  {k['prefix']}...  {k['name']}  {state}")
    return 0


def register(subparsers) -> None:
    users_p = subparsers.add_parser("users", help="manage users (against the database)")
    users_sub = users_p.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user; the password is read from stdin or generated")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="give the admin role")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--generate", action="store_true", help="generate a password and print it")
    _db_args(add)
    add.set_defaults(func=_cmd_users_add)
    ls = users_sub.add_parser("list", help="list users")
    _db_args(ls)
    ls.set_defaults(func=_cmd_users_list)

    keys_p = subparsers.add_parser("keys", help="manage API keys (against the database)")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key for user NAME and print it (once)")
    create.add_argument("name", help="the user")
    create.add_argument("--key-name", default="", help="a label for the key")
    _db_args(create)
    create.set_defaults(func=_cmd_keys_create)
    revoke = keys_sub.add_parser("revoke", help="revoke an API key by id")
    revoke.add_argument("key_id")
    _db_args(revoke)
    revoke.set_defaults(func=_cmd_keys_revoke)
    kl = keys_sub.add_parser("list", help="list a user's API keys")
    kl.add_argument("name")
    _db_args(kl)
    kl.set_defaults(func=_cmd_keys_list)
