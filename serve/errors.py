"""Every error class of CineVivid, shared by the stages, the Generator, the ingress and the clients.

Each `CineVividError` carries a stable `code`, a human `message`, the offending `param` (a request
field) where there is one, the `stage` that failed where there is one, the HTTP `status` the
ingress answers with, and `retry_after_s` (sent as `Retry-After`) where waiting helps. They pickle
cleanly, so they cross Ray process boundaries intact (Serve re-raises them wrapped in
RayTaskError; `unwrap_error` gets the original back).
"""

from __future__ import annotations


class CineVividError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, stage: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.stage = stage
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.code, self.status, self.stage,
                           self.retry_after_s))

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}

    def __str__(self) -> str:
        where = f" [{self.param}]" if self.param else ""
        return f"{self.code}{where}: {self.message}"


def _rebuild(cls, message, param, code, status, stage, retry_after_s=None):
    err = cls.__new__(cls)
    CineVividError.__init__(err, message, param=param, code=code, status=status, stage=stage,
                            retry_after_s=retry_after_s)
    return err


# -- the request ------------------------------------------------------------------------------
class InvalidRequest(CineVividError):
    """A request the server refuses as it is (a bad cursor, a bad field of an admin call)."""

    code = "invalid_request"
    status = 400


class InvalidJSON(CineVividError):
    code = "invalid_json"
    status = 400


class InvalidForm(CineVividError):
    code = "invalid_form"
    status = 400


class VideoNotReady(CineVividError):
    """The video (or its preview, or the video to extend) has no content to serve yet."""

    code = "video_not_ready"
    status = 409


class InvalidSpecError(InvalidRequest):
    """The request is invalid; raised before any model work. `param` names the field."""


class VoiceProviderNotConfigured(InvalidSpecError):
    """A voice-over asks for a provider the TTS stage cannot speak with (ElevenLabs without its API
    key): refused at submission, naming voiceover.provider."""

    code = "tts_provider_not_configured"


class UnknownModelError(InvalidSpecError):
    code = "model_not_found"
    status = 404


class NotFound(CineVividError):
    """No such video, task or key for this caller (another user's video is a 404 too)."""

    code = "not_found"
    status = 404


class PayloadTooLarge(CineVividError):
    code = "payload_too_large"
    status = 413


class RequestTimeout(CineVividError):
    """A request that did not arrive in time: its body stalled (`http_front.body_idle_timeout_s`;
    HAProxy answers the same code for a head that did not arrive, serve.ops.haproxy_front)."""

    code = "request_timeout"
    status = 408


# -- auth and limits --------------------------------------------------------------------------
class AuthError(CineVividError):
    code = "invalid_api_key"
    status = 401


class MissingCredentials(AuthError):
    code = "missing_credentials"


class InvalidCredentials(AuthError):
    code = "invalid_credentials"


class InvalidToken(AuthError):
    code = "invalid_token"


class TokenExpired(AuthError):
    code = "token_expired"


class ApiKeyRevoked(AuthError):
    code = "api_key_revoked"


class PermissionDenied(CineVividError):
    code = "permission_denied"
    status = 403


class ConflictError(CineVividError):
    code = "conflict"
    status = 409


class ApiKeyLimitReached(ConflictError):
    code = "api_key_limit_reached"


class TooManyWebhooks(ConflictError):
    code = "too_many_webhooks"


class RateLimited(CineVividError):
    """Too many requests; `retry_after_s` says when to try again."""

    code = "rate_limit_exceeded"
    status = 429


class TooManyJobsError(RateLimited):
    code = "too_many_active_jobs"


class TooManyStreams(RateLimited):
    """Too many progress streams (SSE) and downloads open: the caller's own, or the replica's."""
    code = "too_many_streams"


class TooManyFailedAttempts(RateLimited):
    """Sign-ins from this client or for this username are locked after repeated failures."""

    code = "too_many_failed_attempts"


# -- generation -------------------------------------------------------------------------------
class StageError(CineVividError):
    """A model stage failed (out of memory, a bad checkpoint, ...). `stage` names it."""

    code = "stage_failed"
    status = 500

    def __str__(self) -> str:
        return f"{self.code} in stage {self.stage}: {self.message}"


class StageUnavailable(StageError):
    """A stage's replica stopped (killed, crashed, its node lost) while it ran this call. The job
    service re-runs such a job from the start (`dispatcher.stage_retries`); the message is short
    and names the stage, the Ray error behind it goes to the log only."""

    code = "stage_unavailable"
    status = 503


class StageOutOfMemory(StageError):
    code = "out_of_memory"


class NoResult(CineVividError):
    """The Generator's stream ended without a result."""

    code = StageError.code


class InputsMissing(CineVividError):
    """A queued job's stored inputs (reference image, video to extend) are gone."""

    code = "inputs_missing"


class StorageError(CineVividError):
    """The finished video could not be stored (not a full disk: that is InsufficientStorage)."""

    code = "storage_error"


class MaxAttemptsExceeded(CineVividError):
    """A job whose replicas kept dying: failed after its last attempt (a job record's error code)."""

    code = "max_attempts_exceeded"


class StorageUnavailable(CineVividError):
    """The server cannot write where it keeps its data (a read-only file system, a permission
    taken away): nothing was saved; an operator must fix it."""
    code = "storage_unavailable"
    status = 503


class InsufficientStorage(CineVividError):
    """The server's disk is full: a file (an artifact) or the database could not be written."""

    code = "insufficient_storage"
    status = 507


class GenerationCancelled(CineVividError):
    code = "cancelled"
    status = 409


class JobLost(Exception):
    """Inside the dispatcher: the job it runs is no longer its own (deleted, or re-queued to
    another replica), so it stops without writing anything."""


class OverloadedError(CineVividError):
    code = "overloaded"
    status = 503


class StageBusy(OverloadedError):
    """A stage's Serve queue was full (its `max_queued_requests`): Serve refused the call at once
    (`BackPressureError`), before any work. The job service waits it out: the job stays in
    progress with stage "waiting for capacity" and is handed over again, for at most
    `dispatcher.busy_wait_max_s`; past that it fails with `overloaded`."""


class TTSError(CineVividError):
    """Speech synthesis failed; `code` says how (tts_invalid_api_key, tts_quota_exceeded, ...)."""

    code = "tts_failed"
    status = 502


class TTSProviderError(TTSError):
    code = "tts_provider_error"


class TTSInvalidApiKey(TTSError):
    code = "tts_invalid_api_key"


class TTSVoiceNotFound(TTSError):
    code = "tts_voice_not_found"
    status = 400


class TTSInvalidRequest(TTSError):
    code = "tts_invalid_request"
    status = 422


class TTSProviderUnavailable(TTSError):
    code = "tts_provider_unavailable"
    status = 503


class TTSQuotaExceeded(TTSError):
    code = "tts_quota_exceeded"
    status = 503


class TTSRateLimited(TTSError):
    code = "tts_rate_limited"
    status = 429


class TTSTimeout(TTSError):
    code = "tts_timeout"
    status = 504


class VoiceoverTooLong(TTSError):
    """The speech lasts longer than the video and voiceover.fit is "error"."""

    code = "voiceover_too_long"
    status = 422


class UnknownVoice(InvalidSpecError):
    """A voice-over voice the provider does not have (checked at submission)."""

    code = TTSVoiceNotFound.code


# -- operations -------------------------------------------------------------------------------
class ConfigurationError(RuntimeError):
    """A startup error the operator must fix (e.g. a missing JWT secret in production)."""


class LaunchError(RuntimeError):
    """`cinevivid up` / `make run` cannot start the stack; the message is one line that says why
    and what to do (the CLI prints it as is)."""


class PortInUse(LaunchError):
    """A port the stack needs is taken: the message names it, its holder when known, and the flag
    that picks another."""


class StackNotRunning(ConnectionError):
    """No CineVivid stack to connect to: `cinevivid up` recorded none in CINEVIVID_CACHE_DIR, or
    the Ray cluster it recorded no longer answers."""


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


def replica_stopped(exc: BaseException) -> BaseException | None:
    """The error in `exc`'s chain that says the process running a call went away, not that the
    call failed: a Ray actor (a Serve replica) that died or cannot be reached, a crashed worker or
    node, an object whose owner died with it, or Serve's "replica no longer available"; else None.
    A typed CineVividError on the way (a stage that answered with an error) is a real answer: None."""
    from ray import exceptions as rx
    from ray.serve.exceptions import ReplicaUnavailableError

    return _ray_error_in_chain(exc, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError,
                                     rx.ObjectLostError, ReplicaUnavailableError))


def busy(exc: BaseException) -> BaseException | None:
    """Serve's `BackPressureError` in `exc`'s chain (a deployment's queue, `max_queued_requests`,
    was full: the call was refused before any work), else None."""
    from ray.serve.exceptions import BackPressureError

    return _ray_error_in_chain(exc, (BackPressureError,))


def _ray_error_in_chain(exc: BaseException, types: tuple[type, ...]) -> BaseException | None:
    """The first error of `types` in `exc`'s chain (through RayTaskError causes), stopping at a
    typed CineVividError (a stage's real answer)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, CineVividError):
            return None
        if isinstance(cur, types):
            return cur
        cause = getattr(cur, "cause", None)  # RayTaskError(X): X is its .cause
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    return None


def is_storage_unwritable(exc: BaseException) -> bool:
    """EACCES / EPERM / EROFS anywhere in the chain (a file write), or SQLite's own way of saying it."""
    import errno

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
        if any(m in str(cur) for m in ("attempt to write a readonly database", "unable to open database file")):
            return True
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "orig", None)
    return False


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain (a file write), or SQLite's own way of saying it."""
    import errno

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "database or disk is full" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "orig", None)
    return False


# -- the configuration --------------------------------------------------------------------------

class ConfigError(CineVividError):
    """A configuration the service cannot run as given (raised when a stage loads, or by the CLI)."""

    code = "invalid_config"


class LeverUnavailable(ConfigError):
    """A speed lever the hardware or the installed packages cannot run here (FP8 on a CPU, an
    attention kernel that is not installed): the message names the lever, why, and what is available."""

    code = "lever_unavailable"
