"""Auth: logins, JWTs, API keys; 401/403/404 in the error envelope."""

from __future__ import annotations

import time

import httpx
import jwt

from serve.api.auth import load_jwt_secret
from serve.config import IngressConfig
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import wait_for_status


def _err(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def _login(url, user) -> str:
    r = httpx.post(f"{url}/auth/login", json={"username": user.username, "password": user.password})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] > 0
    return body["access_token"]


def test_login_token_works_and_is_pinned_hs256(http_env, alice):
    token = _login(http_env.url, alice)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "exp" in claims
    r = httpx.get(f"{http_env.url}/v1/videos", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["object"] == "list"


def test_bad_login(http_env, alice):
    _err(httpx.post(f"{http_env.url}/auth/login", json={"username": alice.username, "password": "wrong"}),
         401, "invalid_credentials")
    _err(httpx.post(f"{http_env.url}/auth/login", json={"username": "nobody-here", "password": "x"}),
         401, "invalid_credentials")
    assert _err(httpx.post(f"{http_env.url}/auth/login", json={"username": alice.username}),
                422, "validation_error")["param"] == "password"


def test_401s(http_env, alice):
    url = f"{http_env.url}/v1/videos"
    _err(httpx.get(url), 401, "missing_credentials")
    _err(httpx.get(url, headers={"Authorization": "Bearer not.a.jwt"}), 401, "invalid_token")
    _err(httpx.get(url, headers={"Authorization": "Basic abc"}), 401, "invalid_token")
    _err(httpx.get(url, headers={"Authorization": "Bearer cv-made-up-key"}), 401, "invalid_api_key")
    token = _login(http_env.url, alice)
    head, payload, sig = token.split(".")
    tampered = f"{head}.{payload[:-2]}{'AA' if payload[-2:] != 'AA' else 'BB'}.{sig}"
    _err(httpx.get(url, headers={"Authorization": f"Bearer {tampered}"}), 401, "invalid_token")
    # an alg=none token and a token signed with another key are refused
    claims = jwt.decode(token, options={"verify_signature": False})
    none_token = jwt.encode(claims, key=None, algorithm="none")
    _err(httpx.get(url, headers={"Authorization": f"Bearer {none_token}"}), 401, "invalid_token")
    other = jwt.encode(claims, "x" * 40, algorithm="HS256")
    _err(httpx.get(url, headers={"Authorization": f"Bearer {other}"}), 401, "invalid_token")
    # expired: signed with the service's real secret, but past `exp`
    secret = load_jwt_secret(IngressConfig(data_dir=str(http_env.data_dir)))
    expired = jwt.encode({**claims, "iat": int(time.time()) - 100, "exp": int(time.time()) - 10}, secret,
                         algorithm="HS256")
    _err(httpx.get(url, headers={"Authorization": f"Bearer {expired}"}), 401, "token_expired")
    no_exp = {k: v for k, v in claims.items() if k != "exp"}
    _err(httpx.get(url, headers={"Authorization": f"Bearer {jwt.encode(no_exp, secret, algorithm='HS256')}"}),
         401, "invalid_token")


def test_api_keys_create_list_revoke(http_env, alice):
    url = http_env.url
    r = httpx.post(f"{url}/v1/api-keys", json={"name": "ci"}, headers=alice.headers)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["key"].startswith("cv-") and new["name"] == "ci"
    new_headers = {"Authorization": f"Bearer {new['key']}"}
    assert httpx.get(f"{url}/v1/videos", headers=new_headers).status_code == 200
    listed = httpx.get(f"{url}/v1/api-keys", headers=alice.headers).json()["data"]
    assert {k["id"] for k in listed} >= {new["id"], alice.key_id}
    assert all("key" not in k for k in listed)  # shown once only
    r = httpx.delete(f"{url}/v1/api-keys/{new['id']}", headers=alice.headers)
    assert r.status_code == 200 and r.json()["revoked"] is True
    _err(httpx.get(f"{url}/v1/videos", headers=new_headers), 401, "api_key_revoked")
    # the key is stored hashed: the secret is nowhere in the database file
    db_bytes = b"".join(p.read_bytes() for p in http_env.data_dir.glob("cinevivid.db*"))
    assert new["key"].encode() not in db_bytes


def test_cli_revoked_key_is_refused(http_env, bob):
    from serve.ops.admin import revoke_key
    from tests.http_fixtures import run_sync

    assert httpx.get(f"{http_env.url}/v1/videos", headers=bob.headers).status_code == 200
    assert run_sync(revoke_key(bob.key_id, database_url=http_env.database_url))
    _err(httpx.get(f"{http_env.url}/v1/videos", headers=bob.headers), 401, "api_key_revoked")


def test_admin_routes(http_env, alice, admin_user):
    for path in ("/admin/stats", "/models/cache/stats"):
        _err(httpx.get(f"{http_env.url}{path}", headers=alice.headers), 403, "permission_denied")
        _err(httpx.get(f"{http_env.url}{path}"), 401)
    stats = httpx.get(f"{http_env.url}/admin/stats", headers=admin_user.headers)
    assert stats.status_code == 200, stats.text
    body = stats.json()
    assert set(body["jobs_by_status"]) == {"queued", "in_progress", "completed", "failed"}
    assert body["total_videos"] == body["jobs_by_status"]["completed"]
    cache = httpx.get(f"{http_env.url}/models/cache/stats", headers=admin_user.headers)
    assert cache.status_code == 200 and cache.json()["model"]["name"] == "cinevivid-tiny"


def test_other_users_video_is_404_everywhere(http_env, alice, bob):
    url = http_env.url
    r = httpx.post(f"{url}/v1/videos", json={"prompt": "alice's", "num_inference_steps": 1}, headers=alice.headers)
    vid = r.json()["id"]
    wait_for_status(url, alice.headers, vid, {"completed"})
    calls = [("GET", f"/v1/videos/{vid}", None), ("GET", f"/v1/videos/{vid}/content", None),
             ("GET", f"/v1/videos/{vid}/content?variant=thumbnail", None),
             ("GET", f"/v1/videos/{vid}/events", None), ("POST", f"/v1/videos/{vid}/remix", {"prompt": "mine"}),
             ("POST", f"/v1/videos/{vid}/cancel", None), ("DELETE", f"/v1/videos/{vid}", None),
             ("GET", f"/tasks/{vid}", None)]
    for method, path, body in calls:
        r = httpx.request(method, f"{url}{path}", json=body, headers=bob.headers)
        _err(r, 404, "not_found")
    assert vid not in [v["id"] for v in httpx.get(f"{url}/v1/videos", headers=bob.headers).json()["data"]]
    # still there, untouched, for alice
    assert httpx.get(f"{url}/v1/videos/{vid}", headers=alice.headers).json()["status"] == "completed"


def test_unknown_route_and_method(http_env, alice):
    _err(httpx.get(f"{http_env.url}/no/such/route", headers=alice.headers), 404, "not_found")
    _err(httpx.put(f"{http_env.url}/v1/videos", headers=alice.headers), 405, "method_not_allowed")


def test_every_route_enforces_its_declared_auth(http_env, alice):
    """Walk API_ROUTES: every route that is not public refuses a request without credentials
    (401 in the envelope), and every admin route refuses a plain user (403)."""
    import re

    from serve.api.routes import API_ROUTES

    checked = 0
    for route in API_ROUTES:
        if route.auth is None:
            continue
        path = re.sub(r"{(\w+)(:\w+)?}", "does-not-exist", route.path)
        for method in route.methods:
            r = httpx.request(method, f"{http_env.url}{path}")
            _err(r, 401, "missing_credentials")
            checked += 1
            if route.auth == "admin":
                _err(httpx.request(method, f"{http_env.url}{path}", headers=alice.headers), 403,
                     "permission_denied")
    assert checked >= 20
    assert {r.auth for r in API_ROUTES} == {None, "user", "admin"}
