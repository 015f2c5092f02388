"""A stalled upload (issue 23, item 11): a client that sends its head and part of its body, then
nothing, gets a 408 request_timeout in the API's error envelope after the app's
`http_front.body_idle_timeout_s` (the session app: tests.http_fixtures.BODY_IDLE_TIMEOUT_S).
Before, HAProxy cut it at its `timeout client` (60 s) with a 400. Through HAProxy on the session
stack, with raw sockets."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.http_fixtures import *  # noqa: F401,F403 (the user fixtures)
from tests.http_fixtures import BODY_IDLE_TIMEOUT_S


def _stall(url: str, headers: dict, path: str, content_type: str, length: int, sent: int) -> tuple[float, bytes]:
    """POST `path` announcing `length` bytes, send `sent` of them, then nothing: the seconds until
    the server's answer is complete (its Content-Length read; HAProxy closes the connection only at
    its `timeout client`, waiting for the rest of the body) and the answer."""
    parts = urlsplit(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection((parts.hostname, parts.port), timeout=BODY_IDLE_TIMEOUT_S + 30) as s:
        s.sendall(head.encode() + b" " * sent)
        start = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if sep and length and len(body) >= int(length[0]):
                break
    return time.monotonic() - start, data


def _parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.fast
@pytest.mark.parametrize("sent", [50_000, 1_000], ids=["past-haproxys-buffer", "within-haproxys-buffer"])
def test_a_stalled_upload_is_a_408_in_the_envelope(http_env, alice, sent):
    # past HAProxy's 16 KiB buffer the body streams to the replica, which times it out; a body
    # within the buffer is held by HAProxy, which answers 408 at `request_timeout_s` (10 s)
    took, data = _stall(http_env.url, alice.headers, "/v1/videos", "application/json", 200_000, sent)
    status, headers, body = _parse(data)
    assert status == 408, data[:500]
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert took < 15, took  # not HAProxy's `timeout client` (60 s)
    if sent == 50_000:
        assert took >= BODY_IDLE_TIMEOUT_S - 0.5, took


@pytest.mark.fast
def test_the_body_timeout_must_beat_haproxys_client_timeout():
    from pydantic import ValidationError

    from serve.config import HTTPFrontConfig

    assert HTTPFrontConfig().body_idle_timeout_s < HTTPFrontConfig().client_idle_timeout_s
    with pytest.raises(ValidationError, match="body_idle_timeout_s"):
        HTTPFrontConfig(body_idle_timeout_s=60, client_idle_timeout_s=60)
