"""HTTP clients for CineVivid: `CineVividClient` (sync) and `AsyncCineVividClient` (async), over
httpx. They speak the OpenAI-compatible `/v1/videos` API plus the CineVivid extensions, follow
progress through Server-Sent Events, and raise `APIError` carrying the server's error envelope.

    from client.http import CineVividClient
    with CineVividClient("http://127.0.0.1:8000", api_key="cv-...") as cv:
        video = cv.create_video("a red fox in the snow", seconds=2, seed=1)
        for event, data in cv.events(video["id"]):
            print(event, data["progress"])
        cv.download(video["id"], "fox.mp4")

`AsyncCineVividClient` has the same methods, awaited (`iter_videos` and `events` are async
iterators). Both are thin transports over one request core: `API` builds each request as a
`Call` (method, path, params, JSON body, how to read the answer) without doing I/O, and
`Call.result` turns a response into the method's result or an `APIError`. Job events are read
with httpx-sse by `iter_events` / `aiter_events`, which also take a bare httpx client.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from serve.config import DEFAULT_URL, Settings
from serve.contracts import DELETED, TERMINAL_STATUSES

# A job's event stream ends with a `status` event carrying one of these.
END_STATUSES = (*TERMINAL_STATUSES, DELETED)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" [{param}]" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


# ---- the request core: requests and responses, no I/O ----------------------------------------
def raise_for_error(r: httpx.Response) -> None:
    """Raise `APIError` for an error response (its body already read), from the server's
    envelope `{"error": {"code", "message", "param"}}`, else from the raw body."""
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        exc = APIError(r.status_code, err.get("code") or "error", err.get("message") or "", err.get("param"),
                       dict(r.headers))
    except (ValueError, KeyError, TypeError, AttributeError):
        exc = APIError(r.status_code, "http_error", r.text[:500], headers=dict(r.headers))
    raise exc


def _json(r: httpx.Response) -> Any:
    return r.json()


@dataclass(frozen=True)
class Call:
    """One API request: what to send, and how to read the answer (`read`, after the error check
    unless `check` is off)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None  # form fields (with `files`: a multipart body)
    files: dict[str, tuple[str, bytes, str]] | None = None
    timeout: httpx.Timeout | None = None  # None: the client's
    read: Callable[[httpx.Response], Any] = _json
    check: bool = True

    def options(self) -> dict[str, Any]:
        """Keyword arguments for httpx's `request` / `stream`."""
        opts: dict[str, Any] = {}
        if self.params is not None:
            opts["params"] = self.params
        if self.json is not None:
            opts["json"] = self.json
        if self.data is not None:
            opts["data"] = self.data
        if self.files is not None:
            opts["files"] = self.files
        if self.timeout is not None:
            opts["timeout"] = self.timeout
        return opts

    def result(self, r: httpx.Response) -> Any:
        if self.check:
            raise_for_error(r)
        return self.read(r)


def video_body(prompt: str, *, seconds: float | str | None = None, size: str | None = None,
               **extensions: Any) -> dict:
    """The POST /v1/videos body: OpenAI's fields plus CineVivid's extensions (None ones dropped)."""
    body: dict[str, Any] = {"prompt": prompt}
    if seconds is not None:
        body["seconds"] = str(seconds)
    if size is not None:
        body["size"] = size
    body.update({k: v for k, v in extensions.items() if v is not None})
    return body


def form_fields(body: dict) -> dict[str, str]:
    """A JSON body as multipart form fields: objects JSON-encoded, numbers as text."""
    import json

    return {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in body.items()}


def _upload(value: bytes | str | Path) -> tuple[str, bytes, str]:
    """An image to upload: (file name, bytes, media type by its first bytes)."""
    name, data = ("image", value) if isinstance(value, bytes) else (Path(value).name, Path(value).read_bytes())
    kind = ("image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg" if data[:3] == b"\xff\xd8\xff"
            else "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "application/octet-stream")
    return name, data, kind


class API:
    """The API as `Call`s: the one place that knows each endpoint's path, parameters and body,
    and how its answer is read. The clients' methods of the same names send these."""

    @staticmethod
    def login(username: str, password: str) -> Call:
        return Call("POST", "/auth/login", json={"username": username, "password": password},
                    read=lambda r: r.json()["access_token"])

    @staticmethod
    def create_api_key(name: str = "") -> Call:
        return Call("POST", "/v1/api-keys", json={"name": name})

    @staticmethod
    def create_video(prompt: str, *, input_reference: bytes | str | Path | None = None,
                     last_frame: bytes | str | Path | None = None, **kw: Any) -> Call:
        """`input_reference` (and `last_frame`): an image file (a path, or its bytes) to start from;
        then the body is a multipart form, as the openai SDK sends it."""
        body = video_body(prompt, **kw)
        if input_reference is None and last_frame is None:
            return Call("POST", "/v1/videos", json=body)
        files = {name: _upload(value) for name, value in (("input_reference", input_reference),
                                                          ("last_frame", last_frame)) if value is not None}
        return Call("POST", "/v1/videos", data=form_fields(body), files=files)

    @staticmethod
    def extend_video(video_id: str, prompt: str, *, seconds: float | str, **kw: Any) -> Call:
        """A new video: `video_id` (one of yours, completed) followed by a new segment of `seconds`."""
        body = video_body(prompt, seconds=seconds, **kw)
        body["video"] = {"id": video_id}
        return Call("POST", "/v1/videos/extensions", json=body)

    @staticmethod
    def get_video(video_id: str) -> Call:
        return Call("GET", f"/v1/videos/{video_id}")

    @staticmethod
    def list_videos(*, after: str | None = None, limit: int = 20, order: str = "desc") -> Call:
        params: dict[str, Any] = {"limit": limit, "order": order}
        if after:
            params["after"] = after
        return Call("GET", "/v1/videos", params=params)

    @staticmethod
    def delete_video(video_id: str) -> Call:
        return Call("DELETE", f"/v1/videos/{video_id}")

    @staticmethod
    def cancel_video(video_id: str) -> Call:
        return Call("POST", f"/v1/videos/{video_id}/cancel")

    @staticmethod
    def remix_video(video_id: str, prompt: str) -> Call:
        return Call("POST", f"/v1/videos/{video_id}/remix", json={"prompt": prompt})

    @staticmethod
    def content(video_id: str, variant: str = "video") -> Call:
        return Call("GET", f"/v1/videos/{video_id}/content", params={"variant": variant}, read=lambda r: r.content)

    @staticmethod
    def events(video_id: str, timeout: float | None = None) -> Call:
        """The SSE stream; `timeout` bounds the wait for each event (None: no bound)."""
        return Call("GET", f"/v1/videos/{video_id}/events", timeout=httpx.Timeout(timeout, connect=10.0))

    @staticmethod
    def health() -> Call:
        return Call("GET", "/health", check=False)  # an unhealthy service answers 503 with the same body

    @staticmethod
    def voices() -> Call:
        return Call("GET", "/v1/voices", read=lambda r: r.json()["data"])


def next_page_after(page: dict) -> str | None:
    """The `after` cursor of the page following `page`, None on the last page."""
    return page["last_id"] if page.get("has_more") and page.get("data") else None


def _part_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


# ---- Server-Sent Events (httpx-sse) -----------------------------------------------------------
def _event(sse: ServerSentEvent) -> tuple[str, dict] | None:
    return (sse.event, sse.json()) if sse.data else None


def is_end(kind: str, data: dict) -> bool:
    """Whether (kind, data) is the last event of a job's stream."""
    return kind == "status" and data.get("status") in END_STATUSES


def iter_events(http: httpx.Client, video_id: str, *, timeout: float | None = None) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of GET /v1/videos/{id}/events on `http` (any httpx.Client with the
    base URL and auth), up to and including the terminal `status` event."""
    call = API.events(video_id, timeout)
    with connect_sse(http, call.method, call.path, **call.options()) as source:
        if source.response.is_error:
            source.response.read()
            raise_for_error(source.response)
        for sse in source.iter_sse():
            if (ev := _event(sse)) is not None:
                yield ev
                if is_end(*ev):
                    return


async def aiter_events(http: httpx.AsyncClient, video_id: str, *,
                       timeout: float | None = None) -> AsyncIterator[tuple[str, dict]]:
    """`iter_events` on an httpx.AsyncClient."""
    call = API.events(video_id, timeout)
    async with aconnect_sse(http, call.method, call.path, **call.options()) as source:
        if source.response.is_error:
            await source.response.aread()
            raise_for_error(source.response)
        async for sse in source.aiter_sse():
            if (ev := _event(sse)) is not None:
                yield ev
                if is_end(*ev):
                    return


# ---- the transports ---------------------------------------------------------------------------
def _http_options(base_url: str | None, api_key: str | None, timeout: float, transport: Any) -> dict:
    settings = Settings()
    base_url = (base_url or settings.url or DEFAULT_URL).rstrip("/")
    api_key = api_key or settings.api_key
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": base_url, "headers": headers, "timeout": timeout, "transport": transport}


class CineVividClient:
    """Sync client. `base_url` and `api_key` default to $CINEVIVID_URL and $CINEVIVID_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(**_http_options(base_url, api_key, timeout, transport))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> Any:
        return call.result(self._http.request(call.method, call.path, **call.options()))

    # auth
    def login(self, username: str, password: str) -> str:
        """Log in with a password; later requests use the returned access token."""
        token = self._send(API.login(username, password))
        self._http.headers["Authorization"] = f"Bearer {token}"
        return token

    def create_api_key(self, name: str = "") -> dict:
        return self._send(API.create_api_key(name))

    # videos
    def create_video(self, prompt: str, **kw: Any) -> dict:
        return self._send(API.create_video(prompt, **kw))

    def extend_video(self, video_id: str, prompt: str, *, seconds: float | str, **kw: Any) -> dict:
        return self._send(API.extend_video(video_id, prompt, seconds=seconds, **kw))

    def get_video(self, video_id: str) -> dict:
        return self._send(API.get_video(video_id))

    def list_videos(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
        return self._send(API.list_videos(after=after, limit=limit, order=order))

    def iter_videos(self, *, limit: int = 20, order: str = "desc") -> Iterator[dict]:
        """Every video, page by page."""
        after = None
        while True:
            page = self.list_videos(after=after, limit=limit, order=order)
            yield from page["data"]
            if (after := next_page_after(page)) is None:
                return

    def delete_video(self, video_id: str) -> dict:
        return self._send(API.delete_video(video_id))

    def cancel_video(self, video_id: str) -> dict:
        return self._send(API.cancel_video(video_id))

    def remix_video(self, video_id: str, prompt: str) -> dict:
        return self._send(API.remix_video(video_id, prompt))

    def download_bytes(self, video_id: str, variant: str = "video") -> bytes:
        return self._send(API.content(video_id, variant))

    def download(self, video_id: str, path: str | Path, variant: str = "video") -> Path:
        """Stream the content to `path` (through a temporary file beside it)."""
        call, path = API.content(video_id, variant), Path(path)
        tmp = _part_file(path)
        try:
            with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.is_error:
                    r.read()
                    raise_for_error(r)
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def events(self, video_id: str, *, timeout: float | None = None) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from the SSE stream until the job ends."""
        return iter_events(self._http, video_id, timeout=timeout)

    def wait(self, video_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> dict:
        """Poll until the video is completed or failed (or `timeout_s` passed); returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.get_video(video_id)
            if v["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
                return v
            time.sleep(poll_s)

    # service
    def health(self) -> dict:
        return self._send(API.health())

    def voices(self) -> list[dict]:
        return self._send(API.voices())


class AsyncCineVividClient:
    """Async client: `CineVividClient`'s methods, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._http = httpx.AsyncClient(**_http_options(base_url, api_key, timeout, transport))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> Any:
        return call.result(await self._http.request(call.method, call.path, **call.options()))

    # auth
    async def login(self, username: str, password: str) -> str:
        token = await self._send(API.login(username, password))
        self._http.headers["Authorization"] = f"Bearer {token}"
        return token

    async def create_api_key(self, name: str = "") -> dict:
        return await self._send(API.create_api_key(name))

    # videos
    async def create_video(self, prompt: str, **kw: Any) -> dict:
        return await self._send(API.create_video(prompt, **kw))

    async def extend_video(self, video_id: str, prompt: str, *, seconds: float | str, **kw: Any) -> dict:
        return await self._send(API.extend_video(video_id, prompt, seconds=seconds, **kw))

    async def get_video(self, video_id: str) -> dict:
        return await self._send(API.get_video(video_id))

    async def list_videos(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
        return await self._send(API.list_videos(after=after, limit=limit, order=order))

    async def iter_videos(self, *, limit: int = 20, order: str = "desc") -> AsyncIterator[dict]:
        after = None
        while True:
            page = await self.list_videos(after=after, limit=limit, order=order)
            for v in page["data"]:
                yield v
            if (after := next_page_after(page)) is None:
                return

    async def delete_video(self, video_id: str) -> dict:
        return await self._send(API.delete_video(video_id))

    async def cancel_video(self, video_id: str) -> dict:
        return await self._send(API.cancel_video(video_id))

    async def remix_video(self, video_id: str, prompt: str) -> dict:
        return await self._send(API.remix_video(video_id, prompt))

    async def download_bytes(self, video_id: str, variant: str = "video") -> bytes:
        return await self._send(API.content(video_id, variant))

    async def download(self, video_id: str, path: str | Path, variant: str = "video") -> Path:
        call, path = API.content(video_id, variant), Path(path)
        tmp = _part_file(path)
        try:
            async with self._http.stream(call.method, call.path, **call.options()) as r:
                if r.is_error:
                    await r.aread()
                    raise_for_error(r)
                with open(tmp, "wb") as f:
                    async for chunk in r.aiter_bytes():
                        f.write(chunk)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def events(self, video_id: str, *, timeout: float | None = None) -> AsyncIterator[tuple[str, dict]]:
        """(event, data) pairs from the SSE stream until the job ends (`async for`)."""
        return aiter_events(self._http, video_id, timeout=timeout)

    async def wait(self, video_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            v = await self.get_video(video_id)
            if v["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
                return v
            await asyncio.sleep(poll_s)

    # service
    async def health(self) -> dict:
        return await self._send(API.health())

    async def voices(self) -> list[dict]:
        return await self._send(API.voices())
