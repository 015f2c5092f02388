"""Deadlines of stage calls: a hung replica is treated like a dead one.

A stage call from the Generator must finish within a deadline derived from the job's size:

    deadline = max(floor, denoising steps x per-step bound)

(`LivenessConfig.stage_deadline_floor_s`, `.stage_deadline_per_step_s`; the steps are every
window's for a long video, the Transformer's `total_steps`). Both sides keep it:

- the Generator (`Deadline`): a call past its deadline is cancelled and fails with
  StageUnavailable, as when the replica dies mid-call, so the job service retries the job;
- the stage replica (`OverdueCalls`): its `check_health` fails while one of its calls is past its
  deadline, so Serve replaces a replica whose event loop still runs but whose work is stuck. A
  replica that is frozen altogether (SIGSTOP) cannot answer its health check at all; Serve's health
  check timeout replaces that one.

A Transformer call's clock starts again when the job's batch starts (its "stage" event): on the
Generator's side the wait for a batch slot is bounded by one deadline, the denoising by another; on
the replica's side only the denoising counts (a ticket waiting for a slot is not stuck work).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass


def stage_deadline_s(steps: int, per_step_s: float, floor_s: float) -> float:
    """The deadline of a stage call for a job of `steps` denoising steps (0: a call whose cost does
    not grow with the steps gets the floor)."""
    return max(floor_s, max(0, steps) * per_step_s)


class Deadline:
    """One call's deadline on the caller's side (monotonic clock)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = time.monotonic()

    def restart(self, seconds: float | None = None) -> None:
        """Count again from now (with a new length, if given)."""
        if seconds is not None:
            self.seconds = seconds
        self.started = time.monotonic()

    def extend_to(self, seconds: float) -> None:
        """Make the deadline `seconds` from the same start, if that is longer."""
        self.seconds = max(self.seconds, seconds)

    def remaining(self) -> float:
        return self.started + self.seconds - time.monotonic()


@dataclass
class _Call:
    what: str
    started: float
    seconds: float


class OverdueCalls:
    """The calls in flight on a stage replica, with their deadlines; `check()` raises while one is
    overdue (a replica's `check_health` calls it)."""

    def __init__(self) -> None:
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()

    def start(self, what: str, seconds: float) -> int:
        token = next(self._ids)
        self._calls[token] = _Call(what, time.monotonic(), seconds)
        return token

    def restart(self, token: int, seconds: float | None = None) -> None:
        call = self._calls.get(token)
        if call is not None:
            call.started = time.monotonic()
            if seconds is not None:
                call.seconds = seconds

    def extend_to(self, token: int, seconds: float) -> None:
        call = self._calls.get(token)
        if call is not None:
            call.seconds = max(call.seconds, seconds)

    def end(self, token: int | None) -> None:
        if token is not None:
            self._calls.pop(token, None)

    def overdue(self) -> list[str]:
        now = time.monotonic()
        return [f"{c.what} ({now - c.started:.0f} s, deadline {c.seconds:.0f} s)"
                for c in self._calls.values() if now - c.started > c.seconds]

    def check(self) -> None:
        late = self.overdue()
        if late:
            raise RuntimeError(f"{len(late)} call(s) past their deadline: {', '.join(late[:3])}")

    def __len__(self) -> int:
        return len(self._calls)
