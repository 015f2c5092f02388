"""Users, passwords (argon2id), bearer JWTs (HS256 pinned, `exp` required) and API keys
(`cv-...`, shown once, stored as a SHA-256 hash: they are 256-bit random, so a fast hash is safe).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
import uuid
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, insert, select, update

from serve.config import IngressConfig, Settings
from serve.errors import (
    ApiKeyLimitReached, ApiKeyRevoked, AuthError, ConfigurationError, ConflictError,
    InvalidCredentials, InvalidRequest, InvalidToken, MissingCredentials, TokenExpired,
)
from serve.jobs.db import Database, api_keys, users

JWT_ALGORITHM = "HS256"
API_KEY_PREFIX = "cv-"
ROLES = ("user", "admin")
MIN_JWT_SECRET_BYTES = 32

_hasher = PasswordHasher()  # argon2id with the library's current parameters


@dataclass(frozen=True)
class Principal:
    user_id: str
    username: str
    role: str
    via: str  # "jwt" | "api_key"
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    """User, key and token operations against the database."""

    def __init__(self, db: Database, secret: str, *, token_ttl_s: int = 3600, issuer: str = "cinevivid"):
        self.db = db
        self._secret = secret
        self.token_ttl_s = token_ttl_s
        self.issuer = issuer
        # A password check against this hash when the user does not exist keeps timing uniform.
        self._dummy_hash = hash_password(secrets.token_hex(8))

    # ---- users ----
    async def create_user(self, username: str, password: str, role: str = "user") -> dict:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if not username or len(username) > 128:
            raise InvalidRequest("username must be 1..128 characters", param="username")
        pw_hash = await asyncio.to_thread(hash_password, password)
        row = {"id": f"user_{uuid.uuid4().hex}", "username": username, "password_hash": pw_hash,
               "role": role, "disabled": False, "created_at": time.time()}
        async with self.db.write() as conn:
            exists = (await conn.execute(select(users.c.id).where(users.c.username == username))).first()
            if exists:
                raise ConflictError(f"user {username!r} already exists", param="username")
            await conn.execute(insert(users).values(**row))
        return {k: v for k, v in row.items() if k != "password_hash"}

    async def get_user_by_name(self, username: str) -> dict | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(users).where(users.c.username == username))).mappings().first()
        return dict(row) if row else None

    async def login(self, username: str, password: str) -> dict:
        user = await self.get_user_by_name(username)
        ok = await asyncio.to_thread(verify_password, user["password_hash"] if user else self._dummy_hash, password)
        if not user or not ok or user["disabled"]:
            raise InvalidCredentials("invalid username or password")
        return {"access_token": self.issue_token(user), "token_type": "bearer", "expires_in": self.token_ttl_s}

    # ---- tokens ----
    def issue_token(self, user: dict) -> str:
        now = int(time.time())
        claims = {"sub": user["id"], "name": user["username"], "role": user["role"], "iss": self.issuer,
                  "iat": now, "exp": now + self.token_ttl_s, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    def decode_token(self, token: str) -> dict:
        try:
            return jwt.decode(token, self._secret, algorithms=[JWT_ALGORITHM], issuer=self.issuer,
                              options={"require": ["exp", "iat", "sub"]})
        except jwt.ExpiredSignatureError:
            raise TokenExpired("the access token has expired") from None
        except jwt.PyJWTError:
            raise InvalidToken("the access token is invalid") from None

    # ---- API keys ----
    async def create_api_key(self, user_id: str, name: str = "", *, max_active: int | None = None) -> dict:
        """A new key (the only time its secret is returned). With `max_active`, a user who
        already holds that many unrevoked keys gets a 409 api_key_limit_reached instead."""
        key = new_api_key()
        row = {"id": f"key_{uuid.uuid4().hex[:24]}", "user_id": user_id, "name": name[:128],
               "prefix": key[:10], "key_hash": hash_api_key(key), "created_at": time.time()}
        async with self.db.write() as conn:
            if max_active is not None:
                # the user's row serialises concurrent creates (SQLite's BEGIN IMMEDIATE already does)
                await conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update())
                have = (await conn.execute(select(func.count()).select_from(api_keys).where(
                    api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None)))).scalar_one()
                if have >= max_active:
                    raise ApiKeyLimitReached(f"you have {have} active API keys; the limit is {max_active}. "
                                             "Revoke one (DELETE /v1/api-keys/{id}) first")
            await conn.execute(insert(api_keys).values(**row))
        return {**_key_view(row), "key": key}

    async def list_api_keys(self, user_id: str) -> list[dict]:
        async with self.db.read() as conn:
            rows = (await conn.execute(select(api_keys).where(api_keys.c.user_id == user_id)
                                       .order_by(api_keys.c.created_at))).mappings().all()
        return [_key_view(r) for r in rows]

    async def revoke_api_key(self, key_id: str, user_id: str | None = None) -> bool:
        """Revoke a key (of `user_id` when given). False when no such (unrevoked) key exists."""
        stmt = update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        if user_id is not None:
            stmt = stmt.where(api_keys.c.user_id == user_id)
        async with self.db.write() as conn:
            res = await conn.execute(stmt.values(revoked_at=time.time()))
        return res.rowcount > 0

    # ---- authentication ----
    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise MissingCredentials("missing credentials: send 'Authorization: Bearer <token or API key>'")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise InvalidToken("the Authorization header must be 'Bearer <token or API key>'")
        if credential.startswith(API_KEY_PREFIX):
            return await self._authenticate_key(credential)
        claims = self.decode_token(credential)
        async with self.db.read() as conn:
            user = (await conn.execute(select(users).where(users.c.id == claims["sub"]))).mappings().first()
        if not user or user["disabled"]:
            raise InvalidToken("the token's user does not exist or is disabled")
        return Principal(user["id"], user["username"], user["role"], via="jwt")

    async def _authenticate_key(self, key: str) -> Principal:
        async with self.db.read() as conn:
            row = (await conn.execute(
                select(api_keys.c.id, api_keys.c.revoked_at, users.c.id.label("user_id"), users.c.username,
                       users.c.role, users.c.disabled)
                .join(users, users.c.id == api_keys.c.user_id)
                .where(api_keys.c.key_hash == hash_api_key(key)))).mappings().first()
        if not row:
            raise AuthError("invalid API key")
        if row["revoked_at"] is not None:
            raise ApiKeyRevoked("this API key has been revoked")
        if row["disabled"]:
            raise AuthError("this API key's user is disabled")
        return Principal(row["user_id"], row["username"], row["role"], via="api_key", key_id=row["id"])


def _key_view(row) -> dict:
    return {"id": row["id"], "object": "api_key", "name": row["name"], "prefix": row["prefix"],
            "created_at": int(row["created_at"]),
            "revoked_at": int(row["revoked_at"]) if row.get("revoked_at") else None}


def load_jwt_secret(config: IngressConfig) -> str:
    """`CINEVIVID_JWT_SECRET`; required (>= 32 bytes) in production. In the embedded default a
    random secret is generated once and kept in the data dir, so every replica and restart
    agrees on it."""
    secret = Settings().jwt_secret
    if secret:
        if config.resolved_mode() == "production" and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigurationError(
                f"CINEVIVID_JWT_SECRET is shorter than {MIN_JWT_SECRET_BYTES} bytes; production mode refuses it")
        return secret
    if config.resolved_mode() == "production":
        raise ConfigurationError("CINEVIVID_JWT_SECRET is not set; production mode requires it")
    path = config.resolved_data_dir() / ".jwt_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)  # first writer wins; others read its secret
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()
