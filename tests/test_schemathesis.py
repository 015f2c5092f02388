"""The OpenAPI document says what the service does: a bounded Schemathesis run against the deployed
test app, over every operation with every check, a fixed seed and a time budget. It fails on any
5xx, any response that the schema does not describe (status, content type, headers, body), and any
schema-invalid request the service accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


from tests.http_fixtures import *  # noqa: F401,F403

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261130
# What a schema-valid request may still get, by design: the model's bounds (sizes in multiples of
# 16, 4k+1 frames, the prompt's length) and the per-user quotas are configuration, not schema.
ACCEPTABLE_FOR_VALID_DATA = "2xx,400,401,403,404,409,413,416,429"


def schemathesis_bin() -> str:
    found = Path(sys.executable).parent / "schemathesis"
    return str(found) if found.exists() else (shutil.which("schemathesis") or "schemathesis")


def test_schemathesis_finds_no_server_error_or_schema_violation(http_env, tmp_path):
    import httpx

    user = http_env.user()
    # a JWT, not an API key: the run may revoke the keys it can see, never its own session
    token = httpx.post(f"{http_env.url}/auth/login", json={"username": user.username, "password": user.password},
                       timeout=30).json()["access_token"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks.positive_data_acceptance]\n"
        f"expected-statuses = {ACCEPTABLE_FOR_VALID_DATA.split(',')!r}\n".replace("'", '"'))
    cmd = [schemathesis_bin(), "--config-file", str(config), "run", f"{http_env.url}/openapi.json",
           # every check; the response-time one only as a hang detector (timings are not asserted)
           "--checks", "all", "--max-response-time", "60",
           "--seed", str(SEED), "--max-examples", "3", "--generation-deterministic",
           "--workers", "1", "--request-timeout", "60", "--max-time", "60",
           "-H", f"Authorization: Bearer {token}",
           "--report", "junit", "--report-dir", str(tmp_path / "report")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    (tmp_path / "schemathesis.log").write_text(out.stdout + out.stderr)
    if os.environ.get("CINEVIVID_SCHEMATHESIS_LOG"):
        Path(os.environ["CINEVIVID_SCHEMATHESIS_LOG"]).write_text(out.stdout + out.stderr)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert "operations" in out.stdout.lower() or "api operations" in out.stdout.lower(), tail
