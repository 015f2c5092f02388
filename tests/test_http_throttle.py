"""Brute force is throttled and limits hold across ingress replicas: failed logins per username
and per address, bad API keys per address (429 too_many_failed_attempts, Retry-After growing),
the cap on API keys, and one per-user request limit and one login throttle over two replicas."""

from __future__ import annotations

import contextlib
import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import HttpEnv, deploy_http_app, make_local_user, wait_healthy
from tests.ingress_app import ingress_only


def _err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.json()
    return r


def _retry_after(r) -> int:
    _err(r, 429, "too_many_failed_attempts")
    return int(r.headers["retry-after"])


async def _user_with_password(service, name=None):
    from serve.api.auth import Authenticator

    name = name or f"u{uuid.uuid4().hex[:10]}"
    user = await Authenticator(service.db, secret="-").create_user(name, "right-" + name)
    return user, "right-" + name


LOGIN_LOCK = {"failed_auth": {"login_failures_per_username": 3, "login_failures_per_pair": 100,
                              "login_failures_per_address": 100,
                              "credential_failures_per_address": 100, "lockout_s": 1, "max_lockout_s": 4}}


class _Clock:
    """The throttle's clock (`serve.api.throttle.time`), standing still until a test moves it (whole
    seconds from a whole second: the lock ends compare exactly)."""

    def __init__(self):
        self.now = float(int(time.time()))

    def time(self) -> float:
        return self.now


async def test_failed_logins_lock_the_username_and_nothing_during_the_lock_extends_it(tmp_path, monkeypatch):
    from serve.api import throttle

    clock = _Clock()
    monkeypatch.setattr(throttle, "time", clock)  # the lockouts end when the clock moves, not by waiting
    async with ingress_only(tmp_path, limits=LOGIN_LOCK) as (service, c):
        user, password = await _user_with_password(service)
        name = user["username"]
        for _ in range(3):
            _err(await c.post("/auth/login", json={"username": name, "password": "wrong"}), 401, "invalid_credentials")
        # locked: even the right password is refused, unchecked (this address is not known for the
        # name), and nothing during the lock extends it
        waits = [_retry_after(await c.post("/auth/login", json={"username": name, "password": password}))
                 for _ in range(3)]
        assert waits == [1, 1, 1], waits
        # the lock is the username's: another user from the same address signs in
        other, other_pw = await _user_with_password(service)
        assert (await c.post("/auth/login", json={"username": other["username"], "password": other_pw})
                ).status_code == 200
        # a name that does not exist is counted the same way (no hint which names exist)
        for _ in range(3):
            _err(await c.post("/auth/login", json={"username": "nobody-" + name, "password": "x"}),
                 401, "invalid_credentials")
        _retry_after(await c.post("/auth/login", json={"username": "nobody-" + name, "password": "x"}))

        # once the lock has passed the right password signs in
        clock.now += waits[-1]
        ok = await c.post("/auth/login", json={"username": name, "password": password})
        assert ok.status_code == 200, ok.text
        # the username's count is not the signing-in user's to clear: the next failure within the
        # window locks it again, for twice as long; from this (now known) address the right
        # password still passes that lock
        _err(await c.post("/auth/login", json={"username": name, "password": "wrong"}), 401, "invalid_credentials")
        assert (await c.post("/auth/login", json={"username": name, "password": password})).status_code == 200


async def test_password_spraying_locks_the_address_and_bad_keys_lock_it_for_keys(tmp_path):
    limits = {"failed_auth": {"login_failures_per_username": 100, "login_failures_per_pair": 100,
                              "login_failures_per_address": 3,
                              "credential_failures_per_address": 4, "lockout_s": 30, "max_lockout_s": 120}}
    async with ingress_only(tmp_path, limits=limits) as (service, c):
        h = await make_local_user(service)
        user, password = await _user_with_password(service)
        for i in range(3):  # one guess each at three names
            _err(await c.post("/auth/login", json={"username": f"victim{i}", "password": "Summer2026"}),
                 401, "invalid_credentials")
        assert _retry_after(await c.post("/auth/login", json={"username": user["username"], "password": password})) \
            == 30  # the address's lockout (the user never signed in from there), not extended by this attempt
        # bad API keys and bad tokens from one address: 401 up to the threshold, then 429
        bad = ["cv-" + "x" * 43, "cv-nope", "not-a-jwt", "cv-" + "y" * 43]
        for key in bad:
            r = await c.get("/v1/videos", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 401, r.text
        r = await c.get("/v1/videos", headers={"Authorization": "Bearer cv-" + "z" * 43})
        assert _retry_after(r) == 60  # the 4th failure locked for 30 s; this attempt doubled it
        r = await c.get("/v1/videos", headers={"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"})
        assert _retry_after(r) == 120
        # a valid key is never refused for its address's failures
        assert (await c.get("/v1/videos", headers=h)).status_code == 200
        # a missing header is no guess: still the plain 401
        _err(await c.get("/v1/videos"), 401, "missing_credentials")


def _request(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", v.encode()) for v in forwarded]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers, "client": (peer, 5000)})


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    from serve.api.throttle import client_address, parse_networks

    none, local = [], parse_networks(["127.0.0.1", "::1"])
    lb = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    # Ray's HAProxy adds no X-Forwarded-For: a client's own header is not believed by default
    assert client_address(_request("127.0.0.1", "6.6.6.6"), none) == "127.0.0.1"
    assert client_address(_request("203.0.113.9", "6.6.6.6"), local) == "203.0.113.9"  # untrusted peer
    # behind a trusted chain: the right-most hop that is not a trusted proxy; forged hops left of it ignored
    assert client_address(_request("127.0.0.1", "6.6.6.6, 198.51.100.7", "10.1.2.3"), lb) == "198.51.100.7"
    assert client_address(_request("127.0.0.1", "10.9.9.9"), lb) == "10.9.9.9"  # all trusted: the first
    assert client_address(_request("127.0.0.1"), lb) == "127.0.0.1"
    # one IPv6 host holds a /64
    assert client_address(_request("2001:db8::1:2"), none) == client_address(_request("2001:db8::ff"), none) \
        == "2001:db8::/64"


async def test_api_keys_per_user_are_capped(tmp_path):
    async with ingress_only(tmp_path, limits={"max_api_keys_per_user": 3}) as (service, c):
        h = await make_local_user(service)  # holds one key
        made = [await c.post("/v1/api-keys", json={"name": f"k{i}"}, headers=h) for i in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        r = _err(await c.post("/v1/api-keys", json={"name": "one too many"}, headers=h), 409, "api_key_limit_reached")
        assert "revoke" in r.json()["error"]["message"].lower()
        assert len((await c.get("/v1/api-keys", headers=h)).json()["data"]) == 3  # nothing half-made
        assert (await c.delete(f"/v1/api-keys/{made[0].json()['id']}", headers=h)).status_code == 200
        assert (await c.post("/v1/api-keys", json={"name": "after revoking"}, headers=h)).status_code == 201


# ---- two ingress replicas ----------------------------------------------------------------
TWO = "throttle2"
BURST = 6


def _by_replica(url: str) -> dict[str, dict[tuple, float]]:
    """One replica's request counters, {replica: {(route, method, status): count}}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "http_requests_total":
                out.setdefault(s.labels["replica"], {})[(s.labels["route"], s.labels["method"],
                                                         s.labels["status"])] = s.value
    return out


def _all_replicas(url: str, n: int = 2, timeout_s: float = 60.0) -> dict[str, dict[tuple, float]]:
    """Scrape until `n` replicas have answered (each scrape reaches whichever one HAProxy picks)."""
    seen: dict[str, dict[tuple, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < n and time.monotonic() < deadline:
        seen.update(_by_replica(url))
    assert len(seen) == n, f"only replicas {list(seen)} answered"
    return seen


def test_two_ingress_replicas_share_the_request_limit_and_the_login_throttle(ray_cluster, session_dir):
    import ray
    from ray import serve

    from serve.api.ratelimit import limiter_actor_name

    data_dir = session_dir / f"{TWO}-data"
    deploy_http_app(TWO, data_dir, ray_cluster["http_url"], ingress_deployment={"num_replicas": 2},
                    limits={"rate_limit_per_minute": 0.01, "rate_limit_burst": BURST,
                            "failed_auth": {"login_failures_per_username": 3, "lockout_s": 60}})
    try:
        url = f"{ray_cluster['http_url']}/{TWO}"
        wait_healthy(url)
        _all_replicas(url)  # HAProxy routes to both before the counted traffic starts
        env = HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
        alice = env.user()

        # one bucket of BURST for alice, whichever replica answers
        statuses = [httpx.get(f"{url}/v1/api-keys", headers=alice.headers, timeout=30).status_code
                    for _ in range(3 * BURST)]
        assert statuses.count(200) == BURST and statuses.count(429) == 2 * BURST, statuses
        # one failed-login count for alice's name, whichever replica answers
        for _ in range(3):
            _err(httpx.post(f"{url}/auth/login", json={"username": alice.username, "password": "wrong"}, timeout=30),
                 401, "invalid_credentials")
        for _ in range(3):
            _retry_after(httpx.post(f"{url}/auth/login",
                                    json={"username": alice.username, "password": alice.password}, timeout=30))

        counts = _all_replicas(url)
        keys = {r: sum(v for (route, _, _), v in c.items() if route == "/v1/api-keys") for r, c in counts.items()}
        logins = {r: sum(v for (route, _, _), v in c.items() if route == "/auth/login") for r, c in counts.items()}
        assert all(n > 0 for n in keys.values()), keys  # both replicas answered alice ...
        assert all(n > 0 for n in logins.values()), logins
        assert sum(c.get(("/v1/api-keys", "GET", "200"), 0) for c in counts.values()) == BURST  # ... one limit

        # the shared limiter dies: requests go on (never a 500) and it comes back
        name = limiter_actor_name(TWO)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        bob = env.user()
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(f"{url}/v1/api-keys", headers=bob.headers, timeout=30)
            assert r.status_code in (200, 429), r.text
            try:
                ray.get_actor(name, namespace="serve")
                break
            except ValueError:
                assert time.monotonic() < deadline, "the shared limiter was never recreated"
                time.sleep(0.5)
    finally:
        serve.delete(TWO)
        with contextlib.suppress(ValueError):  # the detached limiter outlives the app otherwise
            ray.kill(ray.get_actor(limiter_actor_name(TWO), namespace="serve"))
