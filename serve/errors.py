"""Typed errors shared by the stages, the Generator, the ingress and the clients.

Each carries a stable `code`, a human `message`, the offending `param` (a request field) where
there is one, and the HTTP `status` the ingress answers with. They pickle cleanly, so they
cross Ray process boundaries intact (Serve re-raises them wrapped in RayTaskError; use
`unwrap_error` to get the original back).
"""

from __future__ import annotations


class CineVividError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, stage: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.stage = stage
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code, self.status, self.stage))

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        return f"{self.code}{where}: {self.message}"


def _rebuild(cls, message, param, code, status, stage):
    return cls(message, param=param, code=code, status=status, stage=stage)


class InvalidSpecError(CineVividError):
    """The request is invalid; raised before any model work. `param` names the field."""

    code = "invalid_request"
    status = 400


class UnknownModelError(InvalidSpecError):
    code = "model_not_found"
    status = 404


class StageError(CineVividError):
    """A model stage failed (out of memory, a bad checkpoint, ...). `stage` names it."""

    code = "stage_failed"
    status = 500

    def __init__(self, message: str, *, stage: str | None = None, **kw):
        super().__init__(message, stage=stage, **kw)

    def __str__(self) -> str:
        return f"{self.code} in stage {self.stage}: {self.message}"


class GenerationCancelled(CineVividError):
    code = "cancelled"
    status = 409


class OverloadedError(CineVividError):
    code = "overloaded"
    status = 503


class TTSError(CineVividError):
    """Speech synthesis failed; `code` says how (tts_invalid_api_key, tts_quota_exceeded, ...)."""

    code = "tts_failed"
    status = 502


def unwrap_error(exc: BaseException) -> BaseException:
    """Return the CineVividError inside a RayTaskError chain, or `exc` itself."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # RayTaskError(X) is also an X, but only its `.cause` carries X's attributes.
        cause = getattr(cur, "cause", None)
        if isinstance(cause, BaseException):
            cur = cause
            continue
        if isinstance(cur, CineVividError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return exc
