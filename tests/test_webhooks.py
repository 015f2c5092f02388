"""Webhooks: users register endpoints (validated, capped, their own only); a finished job's
`video.completed` / `video.failed` event reaches its owner's endpoints, signed the Standard Webhooks
way, at least once: retried with backoff, recorded per attempt, sent after an ingress restart, and
never to another user's endpoint nor to one deleted before delivery.

A real receiver on 127.0.0.1 (tests/webhook_receiver.py) verifies every signature with the
`standardwebhooks` package. The HTTP app runs in-process (`local_service`) against the deployed
Generator; the delivery claim is also checked on its own, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from serve.config import WebhooksConfig
from serve.jobs.db import Database
from serve.jobs.store import JobStore
from serve.jobs.webhook_store import WebhookStore
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import wait_local
from tests.http_fixtures import LOOPBACK_NETWORKS, local_service, make_local_user
from tests.webhook_receiver import WebhookReceiver

from pg_server import new_database

FAST = {"prompt": "a quick one", "num_inference_steps": 1, "num_frames": 5}
HEAVY = {"prompt": "a long one", "size": "256x256", "num_frames": 65, "num_inference_steps": 100}
HOOKS = {"poll_interval_s": 0.05, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 5.0,
         "lease_seconds": 10.0, "max_attempts": 3}


def _err(r, status, code=None, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert code is None or e["code"] == code, e
    assert param is None or e["param"] == param, e
    return e


async def _register(c, h, receiver: WebhookReceiver, path: str, **body) -> dict:
    r = await c.post("/v1/webhooks", json={"url": receiver.url + path, **body}, headers=h)
    assert r.status_code == 201, r.text
    endpoint = r.json()
    receiver.secrets[path] = endpoint["secret"]
    return endpoint




async def _deliveries(c, h, endpoint_id) -> list[dict]:
    r = await c.get(f"/v1/webhooks/{endpoint_id}/deliveries", headers=h)
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def _settled(c, h, endpoint_id, count: int, timeout_s: float = 60.0) -> list[dict]:
    """The endpoint's deliveries once `count` of them are no longer pending (the sender records an
    attempt just after the receiver has answered it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = await _deliveries(c, h, endpoint_id)
        if len([d for d in data if d["status"] != "pending"]) >= count:
            return data
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} deliveries to {endpoint_id} never settled: {data}")


async def test_register_list_and_delete_endpoints_with_clear_errors(http_env, tmp_path):
    async with local_service(tmp_path, webhooks={**HOOKS, "max_endpoints_per_user": 2,
                                                 "max_url_length": 64}) as (service, c):
        alice, bob = await make_local_user(service), await make_local_user(service)
        admin = await make_local_user(service, admin=True)
        r = await c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hooks", "description": "mine"},
                         headers=alice)
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["object"] == "webhook_endpoint" and created["id"].startswith("whep_")
        assert created["secret"].startswith("whsec_")
        assert created["events"] == ["video.completed", "video.failed"] and created["description"] == "mine"

        # bad input: a 4xx naming the field, and nothing registered
        _err(await c.post("/v1/webhooks", json={"url": "ftp://example.com/x"}, headers=alice),
             400, "invalid_request", "url")
        _err(await c.post("/v1/webhooks", json={"url": "https://example.com/" + "x" * 64}, headers=alice),
             400, "invalid_request", "url")
        _err(await c.post("/v1/webhooks", json={"url": "not a url"}, headers=alice), 400, "invalid_request", "url")
        _err(await c.post("/v1/webhooks", json={"url": "https:///no-host"}, headers=alice),
             400, "invalid_request", "url")
        # the test stacks deliver only to this machine (webhooks.allowed_networks): elsewhere is refused
        e = _err(await c.post("/v1/webhooks", json={"url": "http://192.0.2.10/hook"}, headers=alice),
                 400, "invalid_request", "url")
        assert "192.0.2.10" in e["message"] and "outside the networks" in e["message"], e
        e = _err(await c.post("/v1/webhooks", json={"url": "http://a..b/hook"}, headers=alice),
                 400, "invalid_request", "url")  # a name that cannot even be looked up
        assert "does not resolve" in e["message"], e
        _err(await c.post("/v1/webhooks", json={"url": "https://example.com", "events": ["video.nope"]},
                          headers=alice), 422, "validation_error", "events.0")
        _err(await c.post("/v1/webhooks", json={"url": "https://example.com", "events": []}, headers=alice),
             422, "validation_error", "events")
        _err(await c.post("/v1/webhooks", json={"url": "https://example.com", "secret": "mine"}, headers=alice),
             422, "validation_error", "secret")
        _err(await c.post("/v1/webhooks", json={"events": ["video.failed"]}, headers=alice),
             422, "validation_error", "url")
        _err(await c.post("/v1/webhooks", json={"url": "https://example.com"}), 401)

        # the per-user cap (bob is not affected by alice's)
        second = await c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/2", "events": ["video.failed"]},
                              headers=alice)
        assert second.status_code == 201 and second.json()["events"] == ["video.failed"]
        _err(await c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/3"}, headers=alice),
             409, "too_many_webhooks", "url")
        bobs = (await c.post("/v1/webhooks", json={"url": "http://localhost:9/b"}, headers=bob)).json()

        # each user lists their own, without the secret; an admin lists everyone's, with the owner
        mine = (await c.get("/v1/webhooks", headers=alice)).json()["data"]
        assert [e["id"] for e in mine] == [created["id"], second.json()["id"]]
        assert all("secret" not in e for e in mine) and len({e["owner"] for e in mine}) == 1
        assert [e["id"] for e in (await c.get("/v1/webhooks", headers=bob)).json()["data"]] == [bobs["id"]]
        everyone = (await c.get("/v1/webhooks", headers=admin)).json()["data"]
        assert {e["id"]: e["owner"] for e in everyone} == {
            created["id"]: mine[0]["owner"], second.json()["id"]: mine[0]["owner"], bobs["id"]: bobs["owner"]}
        assert bobs["owner"] != mine[0]["owner"]

        # another user's endpoint is a 404, for deleting and for its deliveries; it stays
        _err(await c.delete(f"/v1/webhooks/{created['id']}", headers=bob), 404, "not_found", "webhook_id")
        _err(await c.get(f"/v1/webhooks/{created['id']}/deliveries", headers=bob), 404, "not_found", "webhook_id")
        r = await c.delete(f"/v1/webhooks/{created['id']}", headers=alice)
        assert r.status_code == 200 and r.json() == {"id": created["id"], "object": "webhook_endpoint.deleted",
                                                     "deleted": True}
        _err(await c.delete(f"/v1/webhooks/{created['id']}", headers=alice), 404)
        assert [e["id"] for e in (await c.get("/v1/webhooks", headers=alice)).json()["data"]] == [second.json()["id"]]
        # a freed slot can be used again
        assert (await c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/3"}, headers=alice)).status_code == 201
        schema = (await c.get("/openapi.json")).json()
        assert {"post", "get"} <= set(schema["paths"]["/v1/webhooks"])


async def test_completed_event_is_retried_signed_recorded_and_sent_only_to_the_owner(http_env, tmp_path):
    with WebhookReceiver(script={"/alice": [500]}) as receiver:
        async with local_service(tmp_path, webhooks=HOOKS) as (service, c):
            alice, bob = await make_local_user(service), await make_local_user(service)
            a_ep = await _register(c, alice, receiver, "/alice")
            b_ep = await _register(c, bob, receiver, "/bob", events=["video.completed"])
            a_vid = (await c.post("/v1/videos", json=FAST, headers=alice)).json()["id"]
            b_vid = (await c.post("/v1/videos", json={**FAST, "prompt": "bob's"}, headers=bob)).json()["id"]

            # the first answer is a 500: the same message comes again, and is answered 200
            first, second = await receiver.wait_for("/alice", 2)
            assert [first.answered, second.answered] == [500, 200]
            assert first.verified and second.verified, (first.error, second.error)
            assert first.headers["webhook-id"] == second.headers["webhook-id"]
            assert second.headers["webhook-signature"].startswith("v1,")
            assert first.body == second.body
            event = second.payload
            assert event["type"] == "video.completed" and event["timestamp"].endswith("Z")
            video = (await c.get(f"/v1/videos/{a_vid}", headers=alice)).json()
            assert event["data"] == video and video["status"] == "completed" and video["progress"] == 100

            # the attempts are recorded, as the user sees them
            [delivery] = await _settled(c, alice, a_ep["id"], 1)
            assert delivery["id"] == first.headers["webhook-id"] and delivery["video_id"] == a_vid
            assert delivery["status"] == "delivered" and delivery["attempts"] == 2
            assert delivery["next_attempt_at"] is None and delivery["last_status_code"] == 200
            log = delivery["attempt_log"]
            assert [(a["attempt"], a["status_code"]) for a in log] == [(1, 500), (2, 200)]
            assert log[0]["error"] == "HTTP 500" and log[1]["error"] is None  # the status, never the body
            # the retry waited for the backoff
            assert log[1]["started_at"] - log[0]["started_at"] >= HOOKS["backoff_initial_s"]

            # bob's endpoint got bob's video and nothing of alice's (her deliveries were written
            # with her job's status, so this is final)
            [b_msg] = await receiver.wait_for("/bob", 1)
            assert b_msg.verified and b_msg.payload["data"]["id"] == b_vid
            assert [d["video_id"] for d in await _settled(c, bob, b_ep["id"], 1)] == [b_vid]
            assert all(r.payload["data"]["id"] == a_vid for r in receiver.at("/alice"))
            assert not [r for r in receiver.received if not r.verified]
            attempts = {s.labels["status"]: s.value
                        for f in text_string_to_metric_families((await c.get("/metrics")).text)
                        for s in f.samples if s.name == "cinevivid_webhook_attempts_total"}
            assert attempts["delivered"] >= 1 and attempts["pending"] == 1, attempts


async def test_cancelled_videos_send_video_failed(http_env, tmp_path):
    with WebhookReceiver() as receiver:
        async with local_service(tmp_path, webhooks=HOOKS, dispatcher={"max_concurrent_jobs": 1}) as (service, c):
            h = await make_local_user(service)
            ep = await _register(c, h, receiver, "/failed", events=["video.failed"])
            running = (await c.post("/v1/videos", json=HEAVY, headers=h)).json()["id"]
            queued = (await c.post("/v1/videos", json=FAST, headers=h)).json()["id"]
            await wait_local(c, h, running, {"in_progress"})
            for vid in (queued, running):  # cancelled while queued, then while running
                r = await c.post(f"/v1/videos/{vid}/cancel", headers=h)
                assert r.status_code == 200 and r.json()["status"] == "failed", r.text
            got = await receiver.wait_for("/failed", 2)
            assert all(r.verified for r in got)
            by_video = {r.payload["data"]["id"]: r.payload for r in got}
            assert set(by_video) == {queued, running}
            for vid, event in by_video.items():
                assert event["type"] == "video.failed"
                assert event["data"]["status"] == "failed" and event["data"]["error"]["code"] == "cancelled"
                assert event["data"] == (await c.get(f"/v1/videos/{vid}", headers=h)).json()
            assert {d["status"] for d in await _settled(c, h, ep["id"], 2)} == {"delivered"}


async def test_endpoint_deleted_before_delivery_gets_nothing(http_env, tmp_path):
    with WebhookReceiver() as receiver:
        # no delivery worker on this replica: the deliveries wait in the database
        async with local_service(tmp_path, webhooks={**HOOKS, "enabled": False}) as (service, c):
            h = await make_local_user(service)
            keep = await _register(c, h, receiver, "/keep")
            gone = await _register(c, h, receiver, "/gone")
            vid = (await c.post("/v1/videos", json=FAST, headers=h)).json()["id"]
            await wait_local(c, h, vid, {"completed"})
            for ep in (keep, gone):
                [d] = await _deliveries(c, h, ep["id"])
                assert d["status"] == "pending" and d["attempts"] == 0 and d["video_id"] == vid
            assert (await c.delete(f"/v1/webhooks/{gone['id']}", headers=h)).status_code == 200
            assert await service.webhook_store.list_deliveries(gone["id"]) == []
        async with local_service(tmp_path, webhooks=HOOKS) as (service2, c2):
            [msg] = await receiver.wait_for("/keep", 1)
            assert msg.verified and msg.payload["data"]["id"] == vid
            await _settled(c2, h, keep["id"], 1)
            # both were due together; the deleted endpoint's delivery no longer exists
            assert (await service2.webhook_store.counts_by_status()) == {"pending": 0, "delivered": 1, "failed": 0}
            assert receiver.at("/gone") == []


async def test_delivery_in_flight_at_shutdown_is_sent_after_restart(http_env, tmp_path):
    hold = threading.Event()
    with WebhookReceiver(held={"/slow": hold}) as receiver:
        async with local_service(tmp_path, webhooks=HOOKS) as (service, c):
            h = await make_local_user(service)
            ep = await _register(c, h, receiver, "/slow")
            vid = (await c.post("/v1/videos", json=FAST, headers=h)).json()["id"]
            await receiver.wait_for("/slow", 1, answered=False)  # the POST is in flight, unanswered
        # the ingress stopped mid-send: the delivery is still pending, its lease given back
        stopped = WebhookStore(Database(service.db.url), WebhooksConfig())
        [d] = await stopped.list_deliveries(ep["id"])
        await stopped.db.dispose()
        assert (d["status"], d["attempts"], d["lease_owner"], d["attempt_log"]) == ("pending", 0, None, [])
        del receiver.held["/slow"]
        hold.set()
        async with local_service(tmp_path, webhooks=HOOKS) as (service2, c2):
            [d] = await _settled(c2, h, ep["id"], 1)
            assert d["status"] == "delivered"
            first, again = await receiver.wait_for("/slow", 2, answered=False)
            assert again.answered == 200 and again.verified and again.payload["data"]["id"] == vid
            assert again.headers["webhook-id"] == first.headers["webhook-id"] == d["id"]
            assert again.body == first.body
            # the interrupted POST was never answered, so it is not an attempt; the resend is
            assert [(a["attempt"], a["status_code"]) for a in d["attempt_log"]] == [(1, 200)]


# ---- the delivery claim on its own (no Ray), on SQLite and PostgreSQL ----
@pytest.fixture(params=["sqlite", "postgresql"])
async def hook_db(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'hooks.db'}"
    else:
        url = await new_database(request.getfixturevalue("postgres_server"))
    db = Database(url)
    await db.migrate()
    async with db.write() as conn:
        await conn.execute(text("INSERT INTO users (id, username, password_hash, role, disabled, created_at) "
                                "VALUES ('u1', 'u1', 'x', 'user', false, 0), ('u2', 'u2', 'x', 'user', false, 0)"))
    yield db
    await db.dispose()


SPEC = ('{"prompt": "p", "width": 64, "height": 64, "num_frames": 9, "fps": 8, "seed": 1, '
        '"num_inference_steps": 2}')


async def test_claims_are_exclusive_and_failures_back_off_until_failed(hook_db):
    config = WebhooksConfig(max_attempts=2, backoff_initial_s=0.5, backoff_max_s=1.0, lease_seconds=30,
                            timeout_s=1, allowed_networks=LOOPBACK_NETWORKS)  # its dead receivers: loopback
    hooks = WebhookStore(hook_db, config)
    woken = []
    jobs = JobStore(hook_db, on_webhooks=lambda: woken.append(1))
    ep = await hooks.create_endpoint(user_id="u1", url="http://127.0.0.1:9/x", events=["video.completed"])
    await hooks.create_endpoint(user_id="u2", url="http://127.0.0.1:9/y", events=["video.completed"])
    await hooks.create_endpoint(user_id="u1", url="http://127.0.0.1:9/z", events=["video.failed"])
    job = await jobs.create(user_id="u1", model="m", prompt="p", spec_json=SPEC)
    assert await jobs.claim("me", 30)
    assert await jobs.complete(job["id"], "me", video_path="v", thumbnail_path="t", has_audio=False, duration_s=1)
    assert woken == [1]  # one delivery: u1's video.completed endpoint only
    assert (await hooks.counts_by_status())["pending"] == 1

    # two "replicas" (own engines) claim at once: exactly one gets it
    other = WebhookStore(Database(hook_db.url), config)
    got = await asyncio.gather(*[(hooks if i % 2 else other).claim_due(f"r{i}", 5) for i in range(6)])
    winners = [(i, d) for i, ds in enumerate(got) for d in ds]
    assert len(winners) == 1
    i, d = winners[0]
    assert d["endpoint_id"] == ep["id"] and d["url"] == ep["url"] and d["secret"] == ep["secret"]
    assert not await hooks.claim_due("late", 5)  # leased
    owner = f"r{i}"
    assert await hooks.record_attempt(d["id"], "not-the-owner", status_code=500, error="x", ok=False,
                                      started_at=time.time(), duration_ms=1) is None
    assert await hooks.record_attempt(d["id"], owner, status_code=500, error="HTTP 500", ok=False,
                                      started_at=time.time(), duration_ms=1) == "pending"
    assert not await hooks.claim_due(owner, 5)  # backing off
    deadline = time.monotonic() + 10
    retry: list = []
    while not retry and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        retry = await other.claim_due("r-next", 5)
    assert [r["id"] for r in retry] == [d["id"]] and retry[0]["attempts"] == 1
    assert await other.record_attempt(d["id"], "r-next", status_code=None, error="ConnectError", ok=False,
                                      started_at=time.time(), duration_ms=1) == "failed"
    [row] = await hooks.list_deliveries(ep["id"])
    assert row["status"] == "failed" and row["attempts"] == 2
    assert [(a["attempt"], a["status_code"]) for a in row["attempt_log"]] == [(1, 500), (2, None)]
    await other.db.dispose()
