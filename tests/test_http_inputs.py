"""Hostile and odd inputs: each is a 4xx in the error envelope naming what is wrong, nothing is
queued, and downloads are whole files (or 404s), never cut short. The HTTP app runs in-process (its
own database) against the deployed Generator."""

from __future__ import annotations



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
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        store = service.store

        async def full(*args, **kwargs):
            raise OSError(28, "No space left on device")  # what the OS says when the disk is full

        real, store.create = store.create, full
        try:
            e = _err(await c.post("/v1/videos", json={"prompt": "x"}, headers=h), 507, "insufficient_storage")
            assert "storage is full" in e["message"]
        finally:
            store.create = real
