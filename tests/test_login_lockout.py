"""A login lockout that cannot be turned into a denial of service (issue 23, item 6), as a user
sees it on POST /auth/login: failures lock the (username, address) pair with exponential backoff;
attempts during a lock, right or wrong, never extend it; the username's bound (guesses from many
addresses) and the address's bound (one address spraying many names) let a correct password from an
address the user has signed in from before through. In-process app, no Ray; the throttle's clock is
moved by the test instead of waited for."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.ingress_app import ingress_only

LIMITS = {"failed_auth": {"login_failures_per_pair": 3, "login_failures_per_username": 6,
                          "login_failures_per_address": 5, "credential_failures_per_address": 100,
                          "lockout_s": 10, "max_lockout_s": 40}}


class _Clock:
    def __init__(self):
        self.now = float(int(time.time()))

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from serve.api import throttle

    c = _Clock()
    monkeypatch.setattr(throttle, "time", c)
    return c


async def _user(service) -> tuple[str, str]:
    from serve.api.auth import Authenticator

    name = f"u{uuid.uuid4().hex[:8]}"
    await Authenticator(service.db, secret="-").create_user(name, "right-" + name)
    return name, "right-" + name


def _login(c, name: str, password: str, address: str):
    return c.post("/auth/login", json={"username": name, "password": password},
                  headers={"X-Forwarded-For": address})


def _locked(r) -> int:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "too_many_failed_attempts", r.json()
    return int(r.headers["retry-after"])


def _status(r) -> int:
    assert r.headers["content-type"] == "application/json" and "error" in r.json() or r.status_code == 200, r.text
    return r.status_code


@pytest.mark.fast
async def test_the_pair_locks_with_backoff_and_nothing_during_a_lock_extends_it(tmp_path, clock):
    limits = {"failed_auth": {**LIMITS["failed_auth"], "login_failures_per_username": 100,
                              "login_failures_per_address": 100}}
    async with ingress_only(tmp_path, limits=limits, trusted_proxies=["127.0.0.1/32"]) as (service, c):
        name, pw = await _user(service)
        attacker, home = "203.0.113.7", "198.51.100.20"
        for _ in range(3):
            assert _status(await _login(c, name, "guess", attacker)) == 401
        # the attacker's pair is locked; right or wrong, attempts during the lock change nothing
        assert [_locked(await _login(c, name, p, attacker)) for p in ("guess", pw, pw, "guess")] == [10] * 4
        clock.now += 9
        assert _locked(await _login(c, name, pw, attacker)) == 1  # the same lock, running out
        # the user, from their own address, signs in all along
        assert _status(await _login(c, name, pw, home)) == 200
        # after the lock: one more failure locks the pair again, for twice as long (10 -> 20 -> 40, capped)
        clock.now += 1
        waits = []
        for _ in range(3):
            assert _status(await _login(c, name, "guess", attacker)) == 401
            waits.append(_locked(await _login(c, name, pw, attacker)))
            clock.now += waits[-1]
        assert waits == [20, 40, 40], waits
        # the lock ended: the right password from there signs in, and clears the pair's count
        assert _status(await _login(c, name, pw, attacker)) == 200
        for _ in range(2):
            assert _status(await _login(c, name, "guess", attacker)) == 401
        assert _status(await _login(c, name, pw, attacker)) == 200


@pytest.mark.fast
async def test_a_username_under_attack_still_signs_in_from_a_known_address(tmp_path, clock):
    async with ingress_only(tmp_path, limits=LIMITS, trusted_proxies=["127.0.0.1/32"]) as (service, c):
        name, pw = await _user(service)
        home = "198.51.100.20"
        assert _status(await _login(c, name, pw, home)) == 200  # home is a known address from now on
        # guesses from six addresses (below each pair's bound) lock the username's bound
        for i in range(6):
            assert _status(await _login(c, name, "guess", f"203.0.113.{i}")) == 401
        # an unknown address is refused, even with the right password, which is not checked there
        assert _locked(await _login(c, name, pw, "192.0.2.50")) == 10
        # from home the right password passes the username's lock; a wrong one counts for home's pair
        assert _status(await _login(c, name, pw, home)) == 200
        assert _locked(await _login(c, name, "guess", home)) == 10
        assert _status(await _login(c, name, pw, home)) == 200
        # and the username's lock was not extended by any of it
        clock.now += 10
        assert _status(await _login(c, name, pw, "192.0.2.50")) == 200


@pytest.mark.fast
async def test_an_address_spraying_names_does_not_lock_out_its_known_users(tmp_path, clock):
    async with ingress_only(tmp_path, limits=LIMITS, trusted_proxies=["127.0.0.1/32"]) as (service, c):
        office = "198.51.100.99"  # an attacker and a user behind one NAT
        name, pw = await _user(service)
        newcomer, new_pw = await _user(service)
        assert _status(await _login(c, name, pw, office)) == 200
        for i in range(5):  # one guess at each of five names
            assert _status(await _login(c, f"victim{i}", "Summer2026", office)) == 401
        assert _locked(await _login(c, f"victim9", "Summer2026", office)) == 10
        assert _status(await _login(c, name, pw, office)) == 200  # known there: passes
        assert _locked(await _login(c, newcomer, new_pw, office)) == 10  # never signed in from there
        assert _status(await _login(c, newcomer, new_pw, "192.0.2.1")) == 200  # elsewhere: fine
