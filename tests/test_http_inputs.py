"""Hostile and odd inputs: each is a 4xx in the error envelope naming what is wrong, nothing is
queued, and downloads are whole files (or 404s), never cut short. The HTTP app runs in-process (its
own database) against the deployed Generator."""

from __future__ import annotations



from full_disk import small_disk
from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import local_service, make_local_user, wait_local


def _err(r, status, code=None, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    e = r.json()["error"]
    assert code is None or e["code"] == code, e
    assert param is None or e["param"] == param, e
    return e


def deep(n: int) -> str:
    return "[" * n + "]" * n


async def test_hostile_bodies_are_4xx(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = {**await make_local_user(service), "content-type": "application/json"}
        for route in ("/v1/videos", "/generate/text-to-video", "/auth/login", "/v1/api-keys"):
            body = '{"prompt": ' + deep(200_000) + "}"
            _err(await c.post(route, content=body, headers=h), 400, "invalid_json")
        nested = {"text": "hi"}
        for _ in range(40):
            nested = {"text": nested}
        _err(await c.post("/v1/videos", json={"prompt": "x", "voiceover": nested}, headers=h), 400, "invalid_json")
        lone = '{"prompt": "a fox \\ud800 in the snow"}'
        _err(await c.post("/v1/videos", content=lone, headers=h), 400, "invalid_request", "prompt")
        _err(await c.post("/generate/text-to-video", content=lone, headers=h), 400, "invalid_request", "prompt")
        for seconds in ("inf", "1e308", 1e308, "nan", "-inf"):
            _err(await c.post("/v1/videos", json={"prompt": "x", "seconds": seconds}, headers=h),
                 400, "invalid_request", "seconds")
        _err(await c.post("/v1/videos", json={"prompt": "x", "seconds": "1", "fps": 0}, headers=h),
             400, "invalid_request", "fps")
        assert (await c.get("/v1/videos", headers=h)).json()["data"] == []  # nothing was queued
        ok = await c.post("/v1/videos", json={"prompt": "x", "num_inference_steps": 1}, headers=h)
        assert ok.status_code == 200, ok.text
        vid = ok.json()["id"]
        _err(await c.post(f"/v1/videos/{vid}/remix", content='{"prompt": "\\udfff"}', headers=h),
             400, "invalid_request", "prompt")




async def test_ranges_and_a_download_racing_a_delete(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        vid = (await c.post("/v1/videos", json={"prompt": "ranges", "num_inference_steps": 1}, headers=h)).json()["id"]
        assert (await wait_local(c, h, vid, {"completed", "failed"}))["status"] == "completed"
        whole = await c.get(f"/v1/videos/{vid}/content", headers=h)
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
        data, size = whole.content, len(whole.content)
        part = await c.get(f"/v1/videos/{vid}/content", headers={**h, "Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20]
        assert part.headers["content-range"] == f"bytes 10-19/{size}"
        tail = await c.get(f"/v1/videos/{vid}/content", headers={**h, "Range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == data[-5:]
        e = _err(await c.get(f"/v1/videos/{vid}/content", headers={**h, "Range": f"bytes={size}-"}),
                 416, "range_not_satisfiable")
        assert str(size) in e["message"]
        for bad in ("bytes=abc", "lines=1-2", "bytes=5-1"):  # malformed: ignored, the whole file
            r = await c.get(f"/v1/videos/{vid}/content", headers={**h, "Range": bad})
            assert r.status_code == 200 and r.content == data, bad
        # a download that started before a DELETE still gets the whole file; after it, a 404
        async with c.stream("GET", f"/v1/videos/{vid}/content", headers=h) as s:
            assert s.status_code == 200
            deleted = await c.delete(f"/v1/videos/{vid}", headers=h)
            assert deleted.status_code == 200
            body = b"".join([chunk async for chunk in s.aiter_bytes()])
        assert body == data
        _err(await c.get(f"/v1/videos/{vid}/content", headers=h), 404)


async def test_a_full_disk_is_a_507_not_a_500(http_env, tmp_path):
    """The data dir, with the job database in it (the default), on a small disk of its own filled
    to the last page: SQLite's own "database or disk is full" on a write is a 507
    insufficient_storage in the error envelope, and nothing is saved; reads still work, a wrong API
    key or password is still a 401 (its failure goes uncounted), /health says `degraded`. With room again, the
    same request is queued and its video made."""
    with small_disk(tmp_path / "disk") as disk:
        async with local_service(disk.path) as (service, c):
            h = await make_local_user(service)
            assert (await c.get("/v1/videos", headers=h)).json()["data"] == []
            disk.fill()
            job = {"prompt": "x", "num_inference_steps": 1}
            for route, body in (("/v1/videos", job), ("/generate/text-to-video", job), ("/v1/api-keys", {"name": "k"})):
                r = await c.post(route, json=body, headers=h)
                e = _err(r, 507, "insufficient_storage")
                assert e == {"code": "insufficient_storage", "param": None,
                             "message": "the server's storage is full; nothing was saved. Try again later."}, route
                assert r.headers["retry-after"] == "60"
            assert (await c.get("/v1/videos", headers=h)).json()["data"] == []  # nothing was queued
            assert len((await c.get("/v1/api-keys", headers=h)).json()["data"]) == 1  # nor a key made
            # a refused key or password is still a 401, not a 507: its failure goes uncounted
            _err(await c.get("/v1/videos", headers={"Authorization": "Bearer cv-not-a-key"}), 401, "invalid_api_key")
            _err(await c.post("/auth/login", json={"username": "nobody", "password": "wrong"}), 401)
            health = (await c.get("/health")).json()
            assert health["status"] == "degraded" and health["services"]["storage"]["status"] == "unhealthy", health

            disk.empty()
            ok = await c.post("/v1/videos", json=job, headers=h)
            assert ok.status_code == 200, ok.text
            assert (await wait_local(c, h, ok.json()["id"], {"completed", "failed"}))["status"] == "completed"
            assert (await c.get("/health")).json()["status"] == "healthy"
