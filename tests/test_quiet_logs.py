"""Log lines that would mislead: a denoise call its caller closed after taking the output (how the
Transformer's hold on the latents is released) is logged OK, not CANCELLED; a really cancelled
call still says CANCELLED. (The access-log line is Serve's; the filter sits on its logger.)"""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.fast


def _access_line(request_id: str, status: str) -> logging.LogRecord:
    record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "CALL %s %s %.1fms",
                               ("denoise", status, 12.5), None)
    record.request_id = request_id
    return record


def test_released_calls_log_ok_and_cancelled_ones_stay_cancelled():
    from deployments.transformer import _ReleasedCallLog

    log = _ReleasedCallLog()
    log.finished("req-done")
    done, cancelled = _access_line("req-done", "CANCELLED"), _access_line("req-cancelled", "CANCELLED")
    assert log.filter(done) and log.filter(cancelled)
    assert done.getMessage() == "CALL denoise OK 12.5ms"
    assert cancelled.getMessage() == "CALL denoise CANCELLED 12.5ms"
    again = _access_line("req-done", "CANCELLED")  # the id is used once
    log.filter(again)
    assert again.getMessage() == "CALL denoise CANCELLED 12.5ms"


def test_the_filter_is_bounded():
    from deployments.transformer import _ReleasedCallLog

    log = _ReleasedCallLog()
    for i in range(_ReleasedCallLog.MAX_PENDING + 10):
        log.finished(f"req-{i}")
    assert len(log._finished) == _ReleasedCallLog.MAX_PENDING and "req-0" not in log._finished
