"""Uploads cost what they are (issue 23, item 2), on the HTTP app in-process (no Ray): the per-user
cap on active jobs is checked before a body is read or decoded (an over-cap upload is a 429 at
once, its image never decoded), and four concurrent 40 MP image uploads keep the ingress process's
RSS within a stated bound, which it gives back afterwards (decodes one at a time, memory returned
to the OS after each: serve.api.media_requests)."""

from __future__ import annotations

import asyncio
import io
import threading

import psutil
import pytest
from PIL import Image

from conftest import TINY_MODELS
from tests.ingress_app import ingress_only, make_local_user

MiB = 2**20
# what four concurrent 40 MP decodes may add to the process at their peak (one decode's worth and
# its fitted copies; before: about 900 MB), and what may stay once they are done
PEAK_BOUND = 600 * MiB
LEFT_BOUND = 150 * MiB


def _bomb() -> bytes:
    """An 8000x5000 PNG (40 MP, inside the limit) of about 100 KB."""
    buf = io.BytesIO()
    Image.new("RGB", (8000, 5000), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


class _PeakRss:
    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def test_over_cap_is_refused_before_the_body_and_four_40mp_uploads_stay_bounded(tmp_path):
    png = _bomb()
    async with ingress_only(tmp_path, models=TINY_MODELS, limits={"max_concurrent_jobs_per_user": 4}) as (service, c):
        h = await make_local_user(service)

        def upload():
            return c.post("/v1/videos", headers=h, data={"prompt": "x", "model": "cinevivid-tiny-i2v"},
                          files={"input_reference": ("big.png", png, "image/png")})

        warm = await upload()  # the first decode loads the codecs: not what is measured
        assert warm.status_code == 200, warm.text
        await c.delete(f"/v1/videos/{warm.json()['id']}", headers=h)
        before = psutil.Process().memory_info().rss
        with _PeakRss() as rss:
            answers = await asyncio.gather(*[upload() for _ in range(4)])
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        after = psutil.Process().memory_info().rss
        print(f"RSS before {before / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB, after {after / MiB:.0f} MiB")
        assert rss.peak - before < PEAK_BOUND, (before, rss.peak)
        assert after - before < LEFT_BOUND, (before, after)

        # the 5th, over the cap: a 429 without the image being decoded (no decode slot taken)
        from serve.api import media_requests

        decodes = []
        original = media_requests._bounded_decode
        media_requests._bounded_decode = lambda *a: decodes.append(1) or original(*a)
        try:
            r = await upload()
        finally:
            media_requests._bounded_decode = original
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs", r.text
        assert decodes == []
