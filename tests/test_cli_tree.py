"""The `cinevivid` argparse tree (every command's --help), and the HTTP clients' request core and
SSE reading against canned answers from an httpx.MockTransport. No server, no Ray."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from client import cli as client_cli
from client.http import APIError, AsyncCineVividClient, CineVividClient, iter_events
from serve.ops.cli import build_parser, main

pytestmark = pytest.mark.fast  # the fast tier (make test)

ROOT = Path(__file__).resolve().parents[1]


# ---- the command tree -------------------------------------------------------------------------
def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser, its line in the parent's --help) for the root and every (sub)command."""
    yield path, parser, parser.description
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            lines = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                for p, child, line in walk(sub, (*path, name)):
                    yield p, child, lines.get(name) if p == (*path, name) else line


COMMANDS = {path: (parser, line) for path, parser, line in walk(build_parser())}
HTTP_COMMANDS = [("generate",), ("extend",), ("videos", "list"), ("videos", "get"), ("videos", "rm")]


def test_tree_has_every_documented_command():
    expected = {("up",), ("down",), ("users", "add"), ("users", "list"), ("keys", "create"), ("keys", "revoke"),
                ("keys", "list"), ("generate",), ("extend",), ("videos", "list"), ("videos", "get"), ("videos", "rm"),
                ("models", "make-tiny"), ("models", "cache")}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "cinevivid")
def test_help(path, capsys):
    parser, line = COMMANDS[path]
    assert parser.description and "\n" not in parser.description.strip(), path
    if path:
        assert line and line.strip(), f"{path} has no line in its parent's --help"
    with pytest.raises(SystemExit) as exited:
        main([*path, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cinevivid {' '.join(path)}".rstrip())
    assert " ".join(parser.description.split()) in " ".join(out.split())
    if path in HTTP_COMMANDS:
        assert "$CINEVIVID_URL" in out and "$CINEVIVID_API_KEY" in out


def test_the_entry_point_runs():
    """The installed `cinevivid` script (pyproject's [project.scripts]) starts and answers --help."""
    script = Path(sys.executable).parent / "cinevivid"
    assert script.exists(), f"no {script}: install the package (pip install -e .)"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: cinevivid") and build_parser().description in r.stdout


@pytest.mark.parametrize("path", HTTP_COMMANDS, ids=" ".join)
def test_server_and_key_default_to_the_environment(path, monkeypatch):
    monkeypatch.setenv("CINEVIVID_URL", "http://cv.example:9000")
    monkeypatch.setenv("CINEVIVID_API_KEY", "cv-from-env")
    positional = {("videos", "list"): [], ("extend",): ["video_1", "x", "--seconds", "2"]}.get(path, ["x"])
    args = build_parser().parse_args([*path, *positional])
    assert (args.server, args.api_key) == ("http://cv.example:9000", "cv-from-env")
    args = build_parser().parse_args([*path, *positional, "--server", "http://other:1", "--api-key", "cv-flag"])
    assert (args.server, args.api_key) == ("http://other:1", "cv-flag")


# ---- SSE and the request core, over a MockTransport -------------------------------------------
def _frame(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def canned_stream(end: str = "completed") -> bytes:
    return b"".join([
        b": keepalive\n\n",
        _frame("status", {"id": "video_1", "status": "queued", "progress": 0}),
        _frame("stage", {"id": "video_1", "stage": "text_encoder", "stage_status": "started", "progress": 2}),
        # CRLF line ends and data split over two lines (joined with a newline)
        b'event: step\r\ndata: {"id": "video_1", "stage": "transformer", "step": 1,\r\n'
        b'data:  "total_steps": 2, "progress": 40}\r\n\r\n',
        _frame("step", {"id": "video_1", "stage": "transformer", "step": 2, "total_steps": 2, "progress": 80}),
        _frame("status", {"id": "video_1", "status": end, "progress": 100 if end == "completed" else 80}),
        # past the end: never yielded
        _frame("status", {"id": "video_1", "status": "in_progress", "progress": 0}),
    ])


def expected_events(end: str = "completed") -> list[tuple[str, dict]]:
    return [("status", {"id": "video_1", "status": "queued", "progress": 0}),
            ("stage", {"id": "video_1", "stage": "text_encoder", "stage_status": "started", "progress": 2}),
            ("step", {"id": "video_1", "stage": "transformer", "step": 1, "total_steps": 2, "progress": 40}),
            ("step", {"id": "video_1", "stage": "transformer", "step": 2, "total_steps": 2, "progress": 80}),
            ("status", {"id": "video_1", "status": end, "progress": 100 if end == "completed" else 80})]


class Chunked(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body sent in small chunks (events cut anywhere), to the sync or the async client."""

    def __init__(self, data: bytes, size: int = 7):
        self.chunks = [data[i:i + size] for i in range(0, len(data), size)]

    def __iter__(self):
        yield from self.chunks

    async def __aiter__(self):
        for c in self.chunks:
            yield c


class FakeService:
    """Canned answers of the HTTP API; records the requests it got."""

    def __init__(self, end: str = "completed"):
        self.end = end
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if path == "/v1/videos/video_1/events":
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=Chunked(canned_stream(self.end)))
        if path == "/v1/videos" and method == "POST":
            body = json.loads(request.content)
            if body.get("size") == "3x3":
                return httpx.Response(400, json={"error": {"code": "invalid_value", "message": "bad size",
                                                           "param": "size"}})
            return httpx.Response(200, json={"id": "video_1", "status": "queued", "size": body.get("size", "64x64"),
                                             "seconds": body.get("seconds", "1"), "seed": body.get("seed")})
        if path == "/v1/videos" and method == "GET":
            after = request.url.params.get("after")
            page = [{"id": "video_3"}, {"id": "video_2"}] if after is None else [{"id": "video_1"}]
            return httpx.Response(200, json={"object": "list", "data": page, "has_more": after is None,
                                             "last_id": page[-1]["id"]})
        if path == "/v1/videos/video_1/content":
            return httpx.Response(200, content=b"\0\0\0\x18ftypisom")
        if path == "/v1/videos/video_1":
            return httpx.Response(200, json={"id": "video_1", "status": self.end})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": f"no {path}", "param": None}})


@pytest.mark.parametrize("end", ["completed", "failed", "deleted"])
def test_sync_events_stop_at_the_terminal_status(end):
    svc = FakeService(end)
    with CineVividClient("http://cv.test", "cv-key", transport=svc.transport) as cv:
        assert list(cv.events("video_1")) == expected_events(end)
    req = svc.requests[-1]
    assert req.url.path == "/v1/videos/video_1/events"
    assert req.headers["accept"] == "text/event-stream" and req.headers["authorization"] == "Bearer cv-key"


@pytest.mark.parametrize("end", ["completed", "failed", "deleted"])
async def test_async_events_stop_at_the_terminal_status(end):
    svc = FakeService(end)
    async with AsyncCineVividClient("http://cv.test", "cv-key", transport=svc.transport) as cv:
        assert [ev async for ev in cv.events("video_1")] == expected_events(end)
    assert svc.requests[-1].headers["authorization"] == "Bearer cv-key"


def test_events_on_a_bare_httpx_client():
    svc = FakeService()
    with httpx.Client(base_url="http://cv.test", transport=svc.transport) as http:
        assert list(iter_events(http, "video_1")) == expected_events()


async def test_events_error_envelope_raises_api_error():
    svc = FakeService()
    with CineVividClient("http://cv.test", transport=svc.transport) as cv:
        with pytest.raises(APIError) as exc:
            list(cv.events("video_nope"))
    assert (exc.value.status, exc.value.code) == (404, "not_found")
    async with AsyncCineVividClient("http://cv.test", transport=svc.transport) as acv:
        with pytest.raises(APIError) as aexc:
            [ev async for ev in acv.events("video_nope")]
    assert (aexc.value.status, aexc.value.code) == (404, "not_found")


async def test_sync_and_async_send_the_same_requests():
    sync_svc, async_svc = FakeService(), FakeService()
    kw = {"seconds": 2, "size": "64x64", "seed": 7, "num_inference_steps": None}
    with CineVividClient("http://cv.test/", "k", transport=sync_svc.transport) as cv:
        v = cv.create_video("a fox", **kw)
        ids = [x["id"] for x in cv.iter_videos(limit=2)]
        with pytest.raises(APIError) as sync_err:
            cv.create_video("x", size="3x3")
    async with AsyncCineVividClient("http://cv.test/", "k", transport=async_svc.transport) as acv:
        av = await acv.create_video("a fox", **kw)
        aids = [x["id"] async for x in acv.iter_videos(limit=2)]
        with pytest.raises(APIError) as async_err:
            await acv.create_video("x", size="3x3")
    assert v == av and v["seed"] == 7
    assert ids == aids == ["video_3", "video_2", "video_1"]
    assert [(r.method, str(r.url), r.content) for r in sync_svc.requests] == \
        [(r.method, str(r.url), r.content) for r in async_svc.requests]
    assert json.loads(sync_svc.requests[0].content) == {"prompt": "a fox", "seconds": "2", "size": "64x64", "seed": 7}
    assert str(sync_svc.requests[2].url) == "http://cv.test/v1/videos?limit=2&order=desc&after=video_2"
    for err in (sync_err.value, async_err.value):
        assert (err.status, err.code, err.message, err.param) == (400, "invalid_value", "bad size", "size")


# ---- `cinevivid generate`'s progress ----------------------------------------------------------
@pytest.mark.parametrize("quiet", [False, True])
def test_generate_shows_stage_step_and_percent_on_stderr(quiet, monkeypatch, tmp_path, capsys):
    svc = FakeService()
    monkeypatch.setattr(client_cli, "_client",
                        lambda args: CineVividClient(args.server, args.api_key, transport=svc.transport))
    out = tmp_path / "fox.mp4"
    code = main(["generate", "a fox", "-o", str(out), "--server", "http://cv.test", "--api-key", "k",
                 *(["-q"] if quiet else [])])
    err = capsys.readouterr()
    assert code == 0, err.err
    assert err.out.strip() == "video_1" and out.read_bytes()[4:8] == b"ftyp"
    if quiet:
        assert "%" not in err.err and "step 2/2" not in err.err
    else:
        assert "100.0%" in err.err and "step 2/2" in err.err and "completed" in err.err


def test_generate_reports_a_failed_job(monkeypatch, tmp_path, capsys):
    svc = FakeService("failed")
    monkeypatch.setattr(client_cli, "_client",
                        lambda args: CineVividClient(args.server, args.api_key, transport=svc.transport))
    assert main(["generate", "a fox", "-o", str(tmp_path / "no.mp4"), "-q"]) == 1
    assert "did not complete" in capsys.readouterr().err and not (tmp_path / "no.mp4").exists()
