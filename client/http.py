"""HTTP clients for CineVivid: `CineVividClient` (sync) and `AsyncCineVividClient` (async), over
httpx. They speak the OpenAI-compatible `/v1/videos` API plus the CineVivid extensions, follow
progress through Server-Sent Events, and raise `APIError` carrying the server's error envelope.

    from client.http import CineVividClient
    with CineVividClient("http://127.0.0.1:8000", api_key="cv-...") as cv:
        video = cv.create_video("a red fox in the snow", seconds=2, seed=1)
        for event, data in cv.events(video["id"]):
            print(event, data["progress"])
        cv.download(video["id"], "fox.mp4")
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("completed", "failed")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" [{param}]" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        raise APIError(r.status_code, err.get("code", "error"), err.get("message", ""), err.get("param"),
                       dict(r.headers))
    except (ValueError, KeyError, TypeError):
        raise APIError(r.status_code, "http_error", r.text[:500]) from None


def _video_body(prompt: str, *, seconds: float | str | None = None, size: str | None = None,
                **extensions: Any) -> dict:
    body: dict[str, Any] = {"prompt": prompt}
    if seconds is not None:
        body["seconds"] = str(seconds)
    if size is not None:
        body["size"] = size
    body.update({k: v for k, v in extensions.items() if v is not None})
    return body


def _parse_sse_lines(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    kind, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield kind, json.loads("\n".join(data))


def _is_end(kind: str, data: dict) -> bool:
    return kind == "status" and data.get("status") in (*TERMINAL, "deleted")


class CineVividClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        base_url = (base_url or os.environ.get("CINEVIVID_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key or os.environ.get("CINEVIVID_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def _req(self, method: str, path: str, **kw) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        _raise_for(r)
        return r

    # auth
    def login(self, username: str, password: str) -> str:
        token = self._req("POST", "/auth/login", json={"username": username, "password": password}).json()
        self._http.headers["Authorization"] = f"Bearer {token['access_token']}"
        return token["access_token"]

    def create_api_key(self, name: str = "") -> dict:
        return self._req("POST", "/v1/api-keys", json={"name": name}).json()

    # videos
    def create_video(self, prompt: str, **kw) -> dict:
        return self._req("POST", "/v1/videos", json=_video_body(prompt, **kw)).json()

    def get_video(self, video_id: str) -> dict:
        return self._req("GET", f"/v1/videos/{video_id}").json()

    def list_videos(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
        params = {"limit": limit, "order": order, **({"after": after} if after else {})}
        return self._req("GET", "/v1/videos", params=params).json()

    def iter_videos(self, *, limit: int = 20, order: str = "desc") -> Iterator[dict]:
        after = None
        while True:
            page = self.list_videos(after=after, limit=limit, order=order)
            yield from page["data"]
            if not page["has_more"]:
                return
            after = page["last_id"]

    def delete_video(self, video_id: str) -> dict:
        return self._req("DELETE", f"/v1/videos/{video_id}").json()

    def cancel_video(self, video_id: str) -> dict:
        return self._req("POST", f"/v1/videos/{video_id}/cancel").json()

    def remix_video(self, video_id: str, prompt: str) -> dict:
        return self._req("POST", f"/v1/videos/{video_id}/remix", json={"prompt": prompt}).json()

    def download(self, video_id: str, path: str | Path, variant: str = "video") -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        with self._http.stream("GET", f"/v1/videos/{video_id}/content", params={"variant": variant}) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            with open(tmp, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        tmp.replace(path)
        return path

    def events(self, video_id: str, *, timeout: float | None = None) -> Iterator[tuple[str, dict]]:
        """(event, data) pairs from the SSE stream until the job ends."""
        with self._http.stream("GET", f"/v1/videos/{video_id}/events",
                               timeout=httpx.Timeout(timeout, connect=10.0)) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for kind, data in _parse_sse_lines(r.iter_lines()):
                yield kind, data
                if _is_end(kind, data):
                    return

    def wait(self, video_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.get_video(video_id)
            if v["status"] in TERMINAL or time.monotonic() > deadline:
                return v
            time.sleep(poll_s)

    # service
    def health(self) -> dict:
        r = self._http.get("/health")
        return r.json()

    def voices(self) -> list[dict]:
        return self._req("GET", "/v1/voices").json()["data"]


class AsyncCineVividClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        base_url = (base_url or os.environ.get("CINEVIVID_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key or os.environ.get("CINEVIVID_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _req(self, method: str, path: str, **kw) -> httpx.Response:
        r = await self._http.request(method, path, **kw)
        _raise_for(r)
        return r

    async def login(self, username: str, password: str) -> str:
        token = (await self._req("POST", "/auth/login", json={"username": username, "password": password})).json()
        self._http.headers["Authorization"] = f"Bearer {token['access_token']}"
        return token["access_token"]

    async def create_video(self, prompt: str, **kw) -> dict:
        return (await self._req("POST", "/v1/videos", json=_video_body(prompt, **kw))).json()

    async def get_video(self, video_id: str) -> dict:
        return (await self._req("GET", f"/v1/videos/{video_id}")).json()

    async def list_videos(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> dict:
        params = {"limit": limit, "order": order, **({"after": after} if after else {})}
        return (await self._req("GET", "/v1/videos", params=params)).json()

    async def delete_video(self, video_id: str) -> dict:
        return (await self._req("DELETE", f"/v1/videos/{video_id}")).json()

    async def cancel_video(self, video_id: str) -> dict:
        return (await self._req("POST", f"/v1/videos/{video_id}/cancel")).json()

    async def remix_video(self, video_id: str, prompt: str) -> dict:
        return (await self._req("POST", f"/v1/videos/{video_id}/remix", json={"prompt": prompt})).json()

    async def download_bytes(self, video_id: str, variant: str = "video") -> bytes:
        return (await self._req("GET", f"/v1/videos/{video_id}/content", params={"variant": variant})).content

    async def events(self, video_id: str) -> AsyncIterator[tuple[str, dict]]:
        async with self._http.stream("GET", f"/v1/videos/{video_id}/events",
                                     timeout=httpx.Timeout(None, connect=10.0)) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise_for(r)
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if line == "":
                    for kind, data in _parse_sse_lines(iter(lines)):
                        yield kind, data
                        if _is_end(kind, data):
                            return
                    lines = []
