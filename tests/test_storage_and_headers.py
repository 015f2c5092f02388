"""What the ingress answers when its storage misbehaves, and the small things of issue 23 (items 7
and 11), as a user sees them, on the HTTP app in-process (no Ray):

- storage that cannot be written (a read-only file system here: a real read-only tmpfs mounted on
  the folder) is a 503 storage_unavailable in the envelope with nothing half-written, and /health
  names the folder; a full disk stays a 507 (tests/test_http_jobs.py);
- the data dir is mode 700 and the SQLite file 600;
- a 5000-digit number is a 400 that shows no Python internals;
- every answer carries nosniff and the other security headers."""

from __future__ import annotations

import contextlib
import io
import stat
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_MODELS, missing_tool
from tests.ingress_app import ingress_only, make_local_user


@contextlib.contextmanager
def read_only(path: Path):
    """A read-only tmpfs mounted on `path` (root only; skipped with the reason otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "cinevivid-test-ro", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        missing_tool(f"a read-only folder needs a tmpfs mounted for the test, which needs root ({r.stderr.strip()})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.fast
async def test_unwritable_storage_is_a_503_with_nothing_saved_and_health_names_it(tmp_path):
    async with ingress_only(tmp_path, models=TINY_MODELS) as (service, c):
        h = await make_local_user(service)
        health = (await c.get("/health")).json()
        assert health["services"]["storage"]["status"] == "healthy", health
        with read_only(tmp_path / "inputs"):
            r = await c.post("/v1/videos", headers=h, data={"prompt": "x", "model": "cinevivid-tiny-i2v"},
                             files={"input_reference": ("a.png", _png(), "image/png")})
            assert r.status_code == 503, r.text
            e = r.json()["error"]
            assert e["code"] == "storage_unavailable" and "nothing was saved" in e["message"], e
            assert r.headers["retry-after"]
            assert (await c.get("/v1/videos", headers=h)).json()["data"] == []  # no job without its inputs
            storage = (await c.get("/health")).json()["services"]["storage"]
            assert storage["status"] == "unhealthy" and "inputs" in storage["detail"], storage
        with read_only(tmp_path / "videos"):
            storage = (await c.get("/health")).json()["services"]["storage"]
            assert storage["status"] == "unhealthy" and "videos" in storage["detail"], storage
        assert (await c.get("/health")).json()["services"]["storage"]["status"] == "healthy"
        # the text-to-video path writes no input: it still works
        assert (await c.post("/v1/videos", headers=h, json={"prompt": "x"})).status_code == 200


@pytest.mark.fast
async def test_data_dir_and_database_are_private(tmp_path):
    data = tmp_path / "data"
    async with ingress_only(tmp_path, data_dir=data) as (service, c):
        assert (await c.get("/health")).status_code == 200
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for f in data.glob("cinevivid.db*"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@pytest.mark.fast
async def test_no_python_internals_and_security_headers_everywhere(tmp_path):
    async with ingress_only(tmp_path) as (service, c):
        h = await make_local_user(service)
        r = await c.post("/v1/videos", headers={**h, "content-type": "application/json"},
                         content=b'{"prompt": "x", "num_frames": ' + b"9" * 5000 + b"}")
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert "too many digits" in msg and "sys." not in msg and "int_max_str_digits" not in msg, msg
        r = await c.post("/v1/videos", headers=h, data={"prompt": "x", "num_frames": "9" * 5000})
        assert r.status_code == 422 and "sys." not in r.text, r.text
        for path, headers in (("/health", {}), ("/v1/videos", h), ("/nope", {}), ("/ui", {})):
            r = await c.get(path, headers=headers)
            assert r.headers["x-content-type-options"] == "nosniff", (path, r.headers)
            assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["content-security-policy"], path
        assert "sandbox" in (await c.get("/health")).headers["content-security-policy"]
        assert "'self'" in (await c.get("/ui")).headers["content-security-policy"]  # the page's own
        r = await c.request("PROPFIND", "/health")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
