"""Streams never starve requests (issue 23, item 1): progress streams (SSE) and downloads are
bounded per user and per replica (429 too_many_streams in the envelope beyond), and they do not
take the ingress's request slots: with twice as many streams open as the Ingress has request slots
(`deployments.ingress.max_ongoing_requests`), `/health` and every other route still answer. Ordinary
requests beyond the slots are a 503 `overloaded` at once, never a hang (serve.api.admission)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve.api.admission import AdmissionMiddleware, StreamLimiter
from serve.errors import TooManyStreams
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import HttpEnv, wait_healthy

APP = "streams"
SLOTS = 2  # the Ingress's request slots in the test app
HEAVY = {"prompt": "held at the VAE", "num_inference_steps": 2}
VAE_PAUSE_S = 60  # chaos_delay_s: each decode waits this long, so the jobs (and their streams) stay open


def _err(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert e["code"] == code, e
    return e


@pytest.mark.fast
def test_stream_limiter_bounds_per_user_and_in_total_and_releases_once():
    lim = StreamLimiter(per_user=2, total=3)
    a1, a2 = lim.acquire("a"), lim.acquire("a")
    with pytest.raises(TooManyStreams, match="you have 2"):
        lim.acquire("a")
    b1 = lim.acquire("b")
    with pytest.raises(TooManyStreams, match="the server has 3"):
        lim.acquire("c")
    a1()
    a1()  # a second release of the same stream changes nothing
    assert lim.count == 2 and lim.open == {"a": 1, "b": 1}
    lim.acquire("c")
    a2(), b1()
    assert lim.open == {"c": 1} and lim.count == 1


@pytest.mark.fast
def test_requests_beyond_the_slots_are_a_503_at_once_and_health_is_never_counted():
    async def main():
        release = asyncio.Event()

        async def slow(request):
            await release.wait()
            return JSONResponse({"ok": True})

        async def health(request):
            return JSONResponse({"status": "healthy"})

        app = Starlette(routes=[Route("/slow", slow), Route("/health", health)])
        app.add_middleware(AdmissionMiddleware, slots=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = [asyncio.create_task(c.get("/slow")) for _ in range(2)]
            while app.middleware_stack is None or not _busy(app, 2):
                await asyncio.sleep(0.01)
            r = await c.get("/slow")
            e = _err(r, 503, "overloaded")
            assert r.headers["retry-after"] == "1" and "its limit" in e["message"]
            assert (await c.get("/health")).status_code == 200
            release.set()
            assert [x.status_code for x in await asyncio.gather(*held)] == [200, 200]
            assert (await c.get("/slow")).status_code == 200  # the slots came back

    asyncio.run(main())


def _busy(app, n: int) -> bool:
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, AdmissionMiddleware):
        layer = getattr(layer, "app", None)
    return layer is not None and layer.busy == n


async def _open_stream(stack: contextlib.AsyncExitStack, client: httpx.AsyncClient, url: str, headers: dict):
    """An SSE stream held open (its first event read: the server has counted it), or the refusal."""
    r = await stack.enter_async_context(client.stream("GET", url, headers=headers))
    if r.status_code != 200:
        await r.aread()
        return r
    lines = r.aiter_lines()
    # held by the stack: a line iterator dropped here would be finalised, closing the stream with it
    stack.push_async_callback(lines.aclose)
    while not (line := await lines.__anext__()).startswith("data:"):
        pass
    status = json.loads(line[5:])["status"]
    assert status in ("queued", "in_progress"), f"the stream's job is {status}: {line}"  # an open stream
    return r


async def _create(c: httpx.AsyncClient, url: str, body: dict, user) -> str:
    r = await c.post(f"{url}/v1/videos", json=body, headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_open_streams_twice_the_slots_leave_health_and_requests_answering(ray_cluster, session_dir):
    from ray import serve

    data_dir = session_dir / f"{APP}-data"
    from conftest import tiny_app_args
    from http_fixtures import SMALL, http_ingress_args
    from serve.app import build_app

    args = tiny_app_args(name=APP, with_ingress=True, chaos_delay_s={"vae": VAE_PAUSE_S},
                         ingress=http_ingress_args(data_dir, limits={
                             **http_ingress_args(data_dir)["limits"], "max_streams_per_user": 3,
                             "max_streams_total": 2 * SLOTS}),
                         deployments={"ingress": {**SMALL, "max_ongoing_requests": SLOTS}, "image_encoder": SMALL})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"{ray_cluster['http_url']}/{APP}"
    try:
        wait_healthy(url)
        env = HttpEnv(url, data_dir, f"sqlite+aiosqlite:///{data_dir / 'cinevivid.db'}")
        alice, bob, carol = env.user(), env.user(), env.user()

        async def main() -> list[float]:
            async with httpx.AsyncClient(timeout=30) as c, contextlib.AsyncExitStack() as stack:
                running, queued = [await _create(c, url, HEAVY, alice) for _ in range(2)]
                events = f"{url}/v1/videos/{{}}/events"
                # alice: 3 streams, her bound; her 4th is a 429 naming her own count
                for vid in (running, queued, running):
                    assert (await _open_stream(stack, c, events.format(vid), alice.headers)).status_code == 200
                r = await _open_stream(stack, c, events.format(queued), alice.headers)
                assert "you have 3" in _err(r, 429, "too_many_streams")["message"] and r.headers["retry-after"]
                # a download counts too: alice's is refused, bob's is the replica's 4th stream (2 x SLOTS)
                content = f"{url}/v1/videos/{running}/content"
                _err(await c.get(content, headers=alice.headers), 429, "too_many_streams")
                bobs = await _create(c, url, {"prompt": "bob"}, bob)
                assert (await _open_stream(stack, c, events.format(bobs), bob.headers)).status_code == 200
                r = await _open_stream(stack, c, events.format(bobs), bob.headers)
                assert "the server has 4" in _err(r, 429, "too_many_streams")["message"]

                # 2 x SLOTS streams open: /health and ordinary requests of every user still answer
                took = []
                for _ in range(5):
                    t0 = time.monotonic()
                    h = await c.get(f"{url}/health", timeout=10)
                    took.append(time.monotonic() - t0)
                    assert h.status_code == 200, h.text
                    assert (await c.get(f"{url}/v1/videos", headers=carol.headers, timeout=10)).status_code == 200
                    assert (await c.get(f"{url}/v1/videos/{running}", headers=alice.headers,
                                        timeout=10)).json()["status"] in ("queued", "in_progress")
                for vid in (running, queued):
                    assert (await c.delete(f"{url}/v1/videos/{vid}", headers=alice.headers)).status_code == 200
            # the streams are closed (the server notices each disconnect): bob may open one again
            deadline = time.monotonic() + 60
            async with httpx.AsyncClient(timeout=30) as c:
                while True:
                    async with contextlib.AsyncExitStack() as stack:
                        r = await _open_stream(stack, c, events.format(bobs), bob.headers)
                    if r.status_code == 200:
                        break
                    _err(r, 429, "too_many_streams")
                    assert time.monotonic() < deadline, "the closed streams were never given back"
                    await asyncio.sleep(0.2)
            return took

        took = asyncio.run(main())
        print(f"/health with {2 * SLOTS} streams open on {SLOTS} request slots: max {max(took):.3f} s")
    finally:
        serve.delete(APP)
