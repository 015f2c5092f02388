"""One parser for every body (issue 23, item 3): JSON, multipart and urlencoded requests meet the
same checks (nesting depth, lone surrogates, UTF-8 text, strict types), and each bad input is a
400/422 in the error envelope naming the field, never a 500. The real request readers
(serve.api.requests) run behind the app's real exception handlers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve.api import schemas as m
from serve.api.errors import EXCEPTION_HANDLERS
from serve.api.requests import read_body_with_files


async def _create(request):
    req, files = await read_body_with_files(request, m.VideoCreateRequest, ("input_reference",), 1000)
    return JSONResponse(req.model_dump(mode="json", exclude_none=True))


APP = Starlette(routes=[Route("/v1/videos", _create, methods=["POST"])], exception_handlers=EXCEPTION_HANDLERS)
DEEP = '{"text": "hi", "voice": ' + "[" * 50 + "]" * 50 + "}"
VERY_DEEP = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _post(**kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as c:
            return await c.post("/v1/videos", **kw)
    return asyncio.run(go())


def _err(r: httpx.Response, status: int, param: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert e["param"] == param and e["code"] and e["message"], e
    assert "Traceback" not in e["message"] and "sys.set_int_max_str_digits" not in e["message"], e
    return e


def _forms(fields: dict):
    """The same fields as a urlencoded and as a multipart body."""
    yield {"data": fields}
    yield {"files": {k: (None, v) for k, v in fields.items()}}


@pytest.mark.fast
@pytest.mark.parametrize("field", ["voiceover", "lora"])
def test_form_objects_meet_the_json_checks(field):
    for kind in _forms({"prompt": "x", field: DEEP}):
        _err(_post(**kind), 400, field)
    for kind in _forms({"prompt": "x", field: VERY_DEEP}):
        _err(_post(**kind), 400, field)
    surrogate = '{"text": "\\ud800"}' if field == "voiceover" else '{"name": "\\ud800"}'
    for kind in _forms({"prompt": "x", field: surrogate}):
        _err(_post(**kind), 400, f"{field}.{'text' if field == 'voiceover' else 'name'}")
    for kind in _forms({"prompt": "x", field: "[1, 2]"}):
        _err(_post(**kind), 400, field)
    for kind in _forms({"prompt": "x", field: "{not json"}):
        _err(_post(**kind), 400, field)
    # the same object in JSON
    _err(_post(json={"prompt": "x", field: json.loads(DEEP)}), 400, field)


@pytest.mark.fast
def test_form_text_must_be_utf8():
    _err(_post(content=b"prompt=%FF%FE", headers={"content-type": "application/x-www-form-urlencoded"}),
         400, "prompt")
    _err(_post(content=b"prompt=caf\xe9", headers={"content-type": "application/x-www-form-urlencoded"}),
         400, "prompt")
    _err(_post(files={"prompt": (None, b"caf\xe9")}), 400, "prompt")
    # valid UTF-8 comes through as sent
    for kind in _forms({"prompt": "café ☕", "voiceover": json.dumps({"text": "ça va"})}):
        r = _post(**kind)
        assert r.status_code == 200 and r.json()["prompt"] == "café ☕", r.text
        assert r.json()["voiceover"]["text"] == "ça va"


@pytest.mark.fast
def test_a_boolean_is_not_a_number():
    _err(_post(json={"prompt": "x", "seconds": True}), 422, "seconds")
    _err(_post(json={"prompt": "x", "num_frames": False}), 422, "num_frames")
    _err(_post(json={"prompt": "x", "lora": {"name": "a", "scale": True}}), 422, "lora.scale")
    for kind in _forms({"prompt": "x", "lora": '{"name": "a", "scale": true}'}):
        _err(_post(**kind), 422, "lora.scale")
    ok = _post(json={"prompt": "x", "seconds": 2, "lora": {"name": "a", "scale": 0.5}})
    assert ok.status_code == 200 and ok.json()["lora"] == {"name": "a", "scale": 0.5}, ok.text
