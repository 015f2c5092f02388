"""One line for any error a `cinevivid` command meets: what went wrong and what to do, never a
traceback (`cinevivid --debug ...` shows that). Used by `serve.ops.cli.main`; imports what it
recognises only when there is an error to describe, so `--help` stays fast."""

from __future__ import annotations

import re

DEBUG_HINT = "(--debug shows the traceback)"


def _reason(exc: BaseException) -> str:
    """An OS-level reason without its errno prefix: "[Errno 111] Connection refused" -> "connection refused"."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", first_line(exc)) or type(exc).__name__
    return text[:1].lower() + text[1:]


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _server(exc: BaseException, args) -> str:
    request = getattr(exc, "_request", None)
    if request is not None:
        return f"{request.url.scheme}://{request.url.netloc.decode()}"
    return getattr(args, "server", None) or "the service"


def one_line(exc: BaseException, args=None) -> str:
    """The message for `exc`, one line (callers prefix it with "error: ")."""
    import httpx

    from client.http import APIError
    from pydantic import ValidationError

    from serve.errors import CineVividError, LaunchError, StackNotRunning

    if isinstance(exc, APIError):  # the service answered with its error envelope
        where = f" [{exc.param}]" if exc.param else ""
        return f"{exc.code}{where}: {exc.message} (HTTP {exc.status})"
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return (f"cannot reach the CineVivid service at {_server(exc, args)} ({_reason(exc)}): is the stack up? "
                "Start it with `make run` or `cinevivid up`, or point --server / $CINEVIVID_URL at it")
    if isinstance(exc, httpx.TimeoutException):
        return f"the service at {_server(exc, args)} did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPError):
        return f"HTTP request to {_server(exc, args)} failed: {_reason(exc)}"
    if isinstance(exc, (StackNotRunning, LaunchError, ConnectionError, LookupError, TimeoutError)):
        return first_line(exc) or type(exc).__name__
    if isinstance(exc, CineVividError):
        where = f" [{exc.param}]" if exc.param else ""
        return f"{exc.code}{where}: {exc.message}"
    if isinstance(exc, ValidationError):  # a config file
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"invalid {exc.title}: {where}: {first.get('msg', '')}{more}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else first_line(exc)
    text = first_line(exc)
    return f"{text or type(exc).__name__} {DEBUG_HINT}"
