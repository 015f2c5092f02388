"""Every limit trips with its status and error code; malformed bodies name the field. These run
the HTTP app in-process (own database and limits) against the deployed Generator."""

from __future__ import annotations

import json

import pytest

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import local_service, make_local_user

HEAVY = {"prompt": "a long one", "size": "256x256", "num_frames": 65, "num_inference_steps": 100}


def _err(r, status, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    if code:
        assert e["code"] == code, e
    if param:
        assert e["param"] == param, e
    return e


async def test_model_and_configured_bounds(http_env, tmp_path):
    limits = {"max_prompt_chars": 50, "max_frames": 17, "max_width": 32, "max_height": 48, "max_steps": 3}
    async with local_service(tmp_path, limits=limits) as (service, c):
        h = await make_local_user(service)
        _err(await c.post("/v1/videos", json={"prompt": "x" * 51}, headers=h), 400, "invalid_request", "prompt")
        _err(await c.post("/v1/videos", json={"prompt": "x", "num_frames": 21}, headers=h),
             400, "invalid_request", "num_frames")
        _err(await c.post("/v1/videos", json={"prompt": "x", "seconds": "4"}, headers=h),
             400, "invalid_request", "seconds")
        _err(await c.post("/v1/videos", json={"prompt": "x", "size": "64x48"}, headers=h),
             400, "invalid_request", "size")
        _err(await c.post("/generate/text-to-video", json={"prompt": "x", "height": 64}, headers=h),
             400, "invalid_request", "height")
        _err(await c.post("/v1/videos", json={"prompt": "x", "num_inference_steps": 4}, headers=h),
             400, "invalid_request", "num_inference_steps")
        _err(await c.post("/v1/videos", json={"prompt": "x", "model": "nope"}, headers=h), 404, "model_not_found",
             "model")
        ok = await c.post("/v1/videos", json={"prompt": "x" * 50, "num_frames": 17, "size": "32x48",
                                              "num_inference_steps": 3}, headers=h)
        assert ok.status_code == 200, ok.text
        # nothing rejected was queued
        assert (await c.get("/v1/videos", headers=h)).json()["data"][0]["id"] == ok.json()["id"]
        assert len((await c.get("/v1/videos", headers=h)).json()["data"]) == 1


async def test_upload_size_413(http_env, tmp_path):
    async with local_service(tmp_path, limits={"max_upload_bytes": 2000, "max_image_bytes": 3000}) as (service, c):
        h = await make_local_user(service)
        body = json.dumps({"prompt": "x" * 3000})
        _err(await c.post("/v1/videos", content=body, headers={**h, "content-type": "application/json"}),
             413, "payload_too_large")

        async def chunks():  # no Content-Length: counted as it streams in
            for _ in range(4):
                yield b" " * 1000
        _err(await c.post("/v1/videos", content=chunks(), headers={**h, "content-type": "application/json"}),
             413, "payload_too_large")
        # a multipart upload: an image up to max_image_bytes (the field is named), the body up to two of them
        _err(await c.post("/v1/videos", files={"input_reference": ("a.png", b"\x89PNG" + b"0" * 5000)},
                          data={"prompt": "x"}, headers=h), 413, "payload_too_large", "input_reference")
        _err(await c.post("/v1/videos", files={"input_reference": ("a.png", b"\x89PNG" + b"0" * 9000)},
                          data={"prompt": "x"}, headers=h), 413, "payload_too_large")


async def test_per_user_concurrent_jobs_429(http_env, tmp_path):
    async with local_service(tmp_path, limits={"max_concurrent_jobs_per_user": 2},
                             dispatcher={"max_concurrent_jobs": 1}) as (service, c):
        h, other = await make_local_user(service), await make_local_user(service)
        a = (await c.post("/v1/videos", json=HEAVY, headers=h)).json()["id"]
        b = (await c.post("/v1/videos", json=HEAVY, headers=h)).json()["id"]
        r = await c.post("/v1/videos", json={"prompt": "third"}, headers=h)
        _err(r, 429, "too_many_active_jobs")
        assert int(r.headers["retry-after"]) >= 1
        # other users are not affected
        assert (await c.post("/generate/text-to-video", json={"prompt": "x"}, headers=other)).status_code == 202
        for vid in (a, b):
            assert (await c.post(f"/v1/videos/{vid}/cancel", headers=h)).json()["status"] == "failed"
        assert (await c.post("/v1/videos", json={"prompt": "now fits"}, headers=h)).status_code == 200


async def test_rate_limit_429_with_retry_after(http_env, tmp_path):
    async with local_service(tmp_path, limits={"rate_limit_per_minute": 6, "rate_limit_burst": 3}) as (service, c):
        h, other = await make_local_user(service), await make_local_user(service)
        for _ in range(3):
            assert (await c.get("/v1/videos", headers=h)).status_code == 200
        r = await c.get("/v1/videos", headers=h)
        _err(r, 429, "rate_limit_exceeded")
        assert 1 <= int(r.headers["retry-after"]) <= 10
        assert (await c.get("/v1/videos", headers=other)).status_code == 200


async def test_malformed_bodies(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        js = {**h, "content-type": "application/json"}
        _err(await c.post("/v1/videos", content=b'{"prompt": ', headers=js), 400, "invalid_json")
        _err(await c.post("/v1/videos", content=b"[1, 2]", headers=js), 400, "invalid_json")
        _err(await c.post("/v1/videos", content=b"", headers=js), 400, "invalid_json")
        _err(await c.post("/v1/videos", json={"seconds": "4"}, headers=h), 422, "validation_error", "prompt")
        _err(await c.post("/v1/videos", json={"prompt": "x", "num_frames": "many"}, headers=h),
             422, "validation_error", "num_frames")
        _err(await c.post("/v1/videos", json={"prompt": "x", "colour": "red"}, headers=h),
             422, "validation_error", "colour")
        _err(await c.post("/generate/text-to-video", json={"prompt": "x", "seconds": 3}, headers=h),
             422, "validation_error", "seconds")
        # multipart form, as the openai SDK sends it
        _err(await c.post("/v1/videos", data={"seconds": "4"}, files={"x": ("", b"")}, headers=h),
             422, "validation_error", "prompt")
        _err(await c.post("/v1/videos", data={"prompt": "x", "seed": "-1"}, files={"x": ("", b"")}, headers=h),
             422, "validation_error")
        # a form's object field is parsed as JSON by the one parser of every body (as a JSON body is)
        _err(await c.post("/v1/videos", data={"prompt": "x", "voiceover": "{not json"}, headers=h),
             400, "invalid_json", "voiceover")
        # a truncated multipart body carries no usable field: the missing one is named
        _err(await c.post("/v1/videos", content=b"--zzz\r\nbroken", headers={
            **h, "content-type": "multipart/form-data; boundary=zzz"}), 422, "validation_error", "prompt")
        _err(await c.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"\x89PNG")},
                          headers=h), 400, "invalid_request", "input_reference")
        _err(await c.post("/auth/login", content=b"nope", headers={"content-type": "application/json"}),
             400, "invalid_json")


async def test_voiceover_passes_through_and_is_validated(http_env, tmp_path):
    async with local_service(tmp_path) as (service, c):
        h = await make_local_user(service)
        _err(await c.post("/v1/videos", json={"prompt": "x", "voiceover": {"text": "  "}}, headers=h),
             400, "invalid_request", "voiceover.text")
        _err(await c.post("/v1/videos", json={"prompt": "x", "voiceover": {"text": "hi", "provider": "elevenlabs"}},
                          headers=h), 400, "invalid_request", "voiceover.provider")
        r = await c.post("/v1/videos", data={"prompt": "x", "voiceover": json.dumps({"text": "hello",
                                                                                     "provider": "none"})},
                         headers=h)
        assert r.status_code == 200, r.text
        # the openai SDK's form encoding of a nested object: voiceover[text]=...
        r2 = await c.post("/v1/videos", data={"prompt": "y", "voiceover[text]": "hi there",
                                              "voiceover[provider]": "none"}, headers=h)
        assert r2.status_code == 200, r2.text
        r3 = await c.post("/generate/text-to-video", json={"prompt": "z", "voiceover": {"text": "x",
                                                                                        "provider": "none"}},
                          headers=h)
        assert r3.status_code == 202, r3.text
        for vid in (r.json()["id"], r2.json()["id"], r3.json()["task_id"]):
            job = await service.store.get(vid)
            assert json.loads(job["spec"])["voiceover"]["provider"] == "none"
        voices = await c.get("/v1/voices", headers=h)
        assert voices.status_code == 200 and voices.json()["object"] == "list"
        assert isinstance(voices.json()["data"], list)


def test_production_mode_needs_a_jwt_secret(tmp_path, monkeypatch):
    from serve.api.auth import load_jwt_secret
    from serve.config import IngressConfig
    from serve.errors import ConfigurationError

    monkeypatch.delenv("CINEVIVID_JWT_SECRET", raising=False)
    cfg = IngressConfig(data_dir=str(tmp_path), mode="production")
    with pytest.raises(ConfigurationError, match="CINEVIVID_JWT_SECRET"):
        load_jwt_secret(cfg)
    monkeypatch.setenv("CINEVIVID_JWT_SECRET", "short")
    with pytest.raises(ConfigurationError, match="shorter"):
        load_jwt_secret(cfg)
    monkeypatch.setenv("CINEVIVID_JWT_SECRET", "s" * 32)
    assert load_jwt_secret(cfg) == "s" * 32
    # embedded: generated once, kept in the data dir, the same on the next start
    monkeypatch.delenv("CINEVIVID_JWT_SECRET")
    emb = IngressConfig(data_dir=str(tmp_path))
    first = load_jwt_secret(emb)
    assert len(first) >= 32 and load_jwt_secret(emb) == first
    assert (tmp_path / ".jwt_secret").stat().st_mode & 0o077 == 0
