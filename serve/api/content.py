"""Sending an artifact: the file is opened before the response starts, so a DELETE racing the
download cannot cut the body short (the open file keeps its data until it is closed: the client
gets the whole file, or a 404 if the DELETE came first). One byte range (`Range: bytes=...`) is
honoured with 206; an unsatisfiable range is a 416 in the error envelope; a malformed Range header
is ignored (RFC 9110 §14.2), so the whole file is sent."""

from __future__ import annotations

import os
import re
from typing import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serve.api.errors import error_response
from serve.errors import NotFound

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(start, end inclusive) of a single satisfiable range; None to send the whole file (no header,
    a malformed or multi-range one); False when the range cannot be satisfied."""
    if not header:
        return None
    m = _RANGE.match(header.replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return None  # syntactically invalid: ignored
    else:  # a suffix: the last N bytes
        n = int(last)
        if n == 0:
            return False
        start, end = max(0, size - n), size - 1
    if start >= size:
        return False
    return start, end


async def _read(fd: int, start: int, length: int) -> AsyncIterator[bytes]:
    try:
        offset, left = start, length
        while left > 0:
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(CHUNK, left), offset)
            if not chunk:
                break
            yield chunk
            offset += len(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)


def file_response(request: Request, path: str, media_type: str, filename: str, what: str,
                  size_limit: int | None = None, headers: dict | None = None) -> Response:
    """`size_limit`: serve only the first bytes of the file (a growing preview: its whole fragments)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(f"the {what} is missing from storage (deleted?)", param="variant") from None
    size = os.fstat(fd).st_size
    if size_limit is not None:
        size = min(size, size_limit)
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{filename}"', **(headers or {})}
    wanted = _byte_range(request.headers.get("range"), size)
    if wanted is False:
        os.close(fd)
        return error_response(416, "range_not_satisfiable",
                              f"the range {request.headers.get('range')!r} is outside the file's {size} bytes",
                              "Range", headers={"Content-Range": f"bytes */{size}"})
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        os.close(fd)
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_read(fd, start, length), status_code=status, headers=headers, media_type=media_type)
