"""CineVivid's settings for the HAProxy that Ray Serve runs on the HTTP port.

Ray Serve writes HAProxy's config from a fixed template (ray/serve/_private/haproxy_templates.py)
that has no setting for some things CineVivid needs, so `serve.ops.serve_env` points Ray's
`RAY_SERVE_HAPROXY_BINARY_PATH` at a two-line shim that runs this script in front of the real
binary. Each time Ray starts (or reloads) HAProxy, this script edits the config file Ray just wrote,
under the lock Ray writes it with, then `exec`s the real HAProxy with Ray's arguments unchanged (same
pid, same command line, so Ray's process checks still work):

- the stats page (no auth; it shows the backends' addresses) is removed, or with
  CINEVIVID_HAPROXY_STATS=1 bound to 127.0.0.1; HAProxy's Prometheus frontend is bound to
  127.0.0.1 (Ray binds both to every interface);
- `timeout http-request` (CINEVIVID_HTTP_REQUEST_TIMEOUT_S) with `option http-buffer-request`:
  a request's head and a body up to HAProxy's buffer must arrive within that time, else 408 and
  the connection is closed; a client that trickles cannot hold a connection;
- X-Forwarded-For is set to the client's address as HAProxy sees it (a client's own header is
  replaced, so it cannot choose the address the ingress's failed-auth throttles count by);
- the answers HAProxy gives itself are in the API's error envelope (JSON): 400 (a malformed
  request, a bad Content-Length, a request line or headers larger than HAProxy's buffer: HAProxy
  2.8 answers all of these 400, it has no 414/431), 408, and Ray's 500 for 502/503/504;
- a method the API has no use for (anything but ALLOWED_METHODS) is a JSON 405 with `Allow`, and
  `OPTIONS *` a JSON 200 with `Allow`, answered here (uvicorn answers the first in plain text,
  Ray's proxy the second with a plain-text 404);
- every answer, HAProxy's own included, carries `X-Content-Type-Options: nosniff`.

Standard library only: it runs as `python -I -S haproxy_front.py REAL_HAPROXY ARGS...`, fast,
with no package import.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys

STATS_ENV = "CINEVIVID_HAPROXY_STATS"
REQUEST_TIMEOUT_ENV = "CINEVIVID_HTTP_REQUEST_TIMEOUT_S"
MARK = "# cinevivid-front"
ALLOWED_METHODS = ("GET", "HEAD", "POST", "DELETE", "OPTIONS")

ERRORS = {
    400: ("Bad Request", "invalid_request",
          "malformed HTTP request (bad Content-Length, or a request line or headers too large)"),
    408: ("Request Timeout", "request_timeout",
          "the request did not arrive in time; the connection is closed"),
    500: ("Internal Server Error", "internal_error", "internal server error"),
}


def error_page(status: int) -> bytes:
    reason, code, message = ERRORS[status]
    body = json.dumps({"error": {"code": code, "message": message, "param": None}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")
    return head.encode() + body


# Bodies HAProxy answers with `http-request return` (body only: HAProxy writes the head)
BODIES = {
    "405": {"error": {"code": "method_not_allowed", "param": None,
                      "message": f"this API answers the methods {', '.join(ALLOWED_METHODS)}"}},
    "options": {"object": "server_options", "methods": list(ALLOWED_METHODS)},
}


def write_bodies(folder: str) -> dict[str, str]:
    paths = {}
    for name, body in BODIES.items():
        path = os.path.join(folder, f"cinevivid-{name}.json")
        _replace_file(path, json.dumps(body).encode())
        paths[name] = path
    return paths


def write_error_pages(folder: str) -> dict[int, str]:
    paths = {}
    for status in ERRORS:
        path = os.path.join(folder, f"cinevivid-{status}.http")
        data = error_page(status)
        try:
            with open(path, "rb") as f:
                same = f.read() == data
        except OSError:
            same = False
        if not same:
            _replace_file(path, data)
        paths[status] = path
    return paths


def _replace_file(path: str, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary file, then an atomic rename): HAProxy never
    reads half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sections(text: str) -> list[list[str]]:
    """The config as sections: each a list of lines, the first naming it (`global`, `defaults`,
    `frontend x`, `listen stats`, ...); the lines before the first keyword form their own."""
    out: list[list[str]] = [[]]
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            out.append([line])
        else:
            out[-1].append(line)
    return out


def rewrite(text: str, folder: str, env: dict[str, str]) -> str:
    """Ray's config with CINEVIVID's settings (see the module doc). Idempotent."""
    if MARK in text:
        return text
    pages = write_error_pages(folder)
    bodies = write_bodies(folder)
    allow = ", ".join(ALLOWED_METHODS)
    stats = env.get(STATS_ENV, "0") == "1"
    timeout = env.get(REQUEST_TIMEOUT_ENV, "")
    out: list[str] = []
    for section in _sections(text):
        head = section[0].strip() if section else ""
        if head == "listen stats" and not stats:
            continue
        body = []
        for line in section[1:]:
            stripped = line.strip()
            if head in ("listen stats", "frontend prometheus") and stripped.startswith("bind "):
                # `bind *:8404` / `bind :9101` -> loopback only
                line = re.sub(r"bind\s+\S*:(\d+)", r"bind 127.0.0.1:\1", line)
            elif head == "defaults" and re.match(r"errorfile (502|503|504) ", stripped):
                status = stripped.split()[1]
                line = f"    errorfile {status} {pages[500]}"
            elif head == "defaults" and stripped.startswith("timeout http-request") and timeout:
                continue  # ours below
            body.append(line)
            if head == "frontend http_frontend" and stripped.startswith("bind "):
                # the client's address for the ingress (its failed-auth throttles count by it):
                # replace whatever X-Forwarded-For the client sent with the address HAProxy sees
                body.append(f"    http-request set-header X-Forwarded-For %[src]  {MARK}")
                body.append(f"    http-request return status 200 content-type application/json file "
                            f"{bodies['options']} hdr Allow \"{allow}\" if {{ method OPTIONS }} {{ url * }}")
                body.append(f"    http-request return status 405 content-type application/json file "
                            f"{bodies['405']} hdr Allow \"{allow}\" unless {{ method {' '.join(ALLOWED_METHODS)} }}")
                body.append("    http-after-response set-header X-Content-Type-Options nosniff")
        if head == "defaults":
            body.append(f"    {MARK}")
            body.append(f"    errorfile 400 {pages[400]}")
            body.append(f"    errorfile 408 {pages[408]}")
            if timeout:
                body.append(f"    timeout http-request {int(float(timeout))}s")
                body.append("    option http-buffer-request")
        out.extend(section[:1] + body)
    return "\n".join(out) + "\n"


def config_path(args: list[str]) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == "-f":
            return args[i + 1]
    return None


def apply(path: str, env: dict[str, str]) -> None:
    """Rewrite Ray's HAProxy config at `path` in place, under the lock Ray writes it with."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
            new = rewrite(text, os.path.dirname(path), env)
            if new != text:
                tmp = f"{path}.cinevivid.tmp"
                with open(tmp, "w") as f:
                    f.write(new)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def main(argv: list[str]) -> None:
    real, args = argv[0], argv[1:]
    path = config_path(args)
    if path:
        apply(path, dict(os.environ))
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
