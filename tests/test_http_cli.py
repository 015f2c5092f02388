"""The `cinevivid` command line (admin and client sub-commands) and the Python HTTP clients,
against the deployed app."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import av
import httpx

from client.http import APIError, AsyncCineVividClient, CineVividClient
from tests.http_fixtures import *  # noqa: F401,F403

ROOT = Path(__file__).resolve().parents[1]


def cli(env_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CINEVIVID_DATA_DIR": str(env_dir)}
    env.pop("CINEVIVID_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "serve.ops.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


def test_admin_cli_users_and_keys(http_env):
    name = f"cli-{os.getpid()}"
    r = cli(http_env.data_dir, "users", "add", name, stdin="s3cret-pass\n")
    assert r.returncode == 0, r.stderr
    assert "password:" not in r.stdout  # given on stdin, not generated
    login = httpx.post(f"{http_env.url}/auth/login", json={"username": name, "password": "s3cret-pass"})
    assert login.status_code == 200
    again = cli(http_env.data_dir, "users", "add", name, stdin="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    gen = cli(http_env.data_dir, "users", "add", f"{name}-admin", "--admin", "--generate")
    assert gen.returncode == 0 and "created admin" in gen.stdout
    password = gen.stdout.split("password:")[1].strip()
    assert httpx.post(f"{http_env.url}/auth/login",
                      json={"username": f"{name}-admin", "password": password}).status_code == 200

    k = cli(http_env.data_dir, "keys", "create", name)
    assert k.returncode == 0, k.stderr
    key = k.stdout.strip()
    key_id = k.stderr.split("key id:")[1].split()[0]
    assert key.startswith("cv-")
    h = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{http_env.url}/v1/videos", headers=h).status_code == 200
    rv = cli(http_env.data_dir, "keys", "revoke", key_id)
    assert rv.returncode == 0, rv.stderr
    assert httpx.get(f"{http_env.url}/v1/videos", headers=h).status_code == 401
    assert cli(http_env.data_dir, "keys", "create", "no-such-user").returncode == 1


@pytest.mark.fast
def test_generate_with_progress_and_videos_commands(http_env, alice, tmp_path):
    out = tmp_path / "fox.mp4"
    base = ["--server", http_env.url, "--api-key", alice.api_key]
    r = cli(http_env.data_dir, "generate", "a red fox", "-o", str(out), "--frames", "5", "--seed", "3",
            "--steps", "3", *base)
    assert r.returncode == 0, r.stderr
    assert "100.0%" in r.stderr and "step 3/3" in r.stderr
    vid = r.stdout.strip().splitlines()[-1]
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5

    ls = cli(http_env.data_dir, "videos", "list", *base)
    assert ls.returncode == 0 and vid in ls.stdout
    thumb = tmp_path / "t.jpg"
    get = cli(http_env.data_dir, "videos", "get", vid, "-o", str(thumb), "--variant", "thumbnail", *base)
    assert get.returncode == 0, get.stderr
    assert thumb.read_bytes()[:2] == b"\xff\xd8" and f'"id": "{vid}"' in get.stdout
    rm = cli(http_env.data_dir, "videos", "rm", vid, *base)
    assert rm.returncode == 0 and f"deleted {vid}" in rm.stdout
    gone = cli(http_env.data_dir, "videos", "get", vid, *base)
    assert gone.returncode == 1 and "not_found" in gone.stderr
    bad = cli(http_env.data_dir, "generate", "x", "--size", "3x3", "-o", str(tmp_path / "no.mp4"), *base)
    assert bad.returncode == 1 and "size" in bad.stderr and not (tmp_path / "no.mp4").exists()


def test_sync_client(http_env, alice, tmp_path):
    with CineVividClient(http_env.url, alice.api_key) as cv:
        v = cv.create_video("sync client", seconds=1, num_inference_steps=2)
        events = list(cv.events(v["id"], timeout=120))
        assert events[-1] == ("status", {**events[-1][1], "status": "completed"})
        path = cv.download(v["id"], tmp_path / "a.mp4")
        assert path.read_bytes()[4:8] == b"ftyp"
        assert v["id"] in [x["id"] for x in cv.iter_videos(limit=1)]
        try:
            cv.get_video("video_nope")
            raise AssertionError("expected a 404")
        except APIError as exc:
            assert exc.status == 404 and exc.code == "not_found"


async def test_async_client(http_env, alice):
    async with AsyncCineVividClient(http_env.url, alice.api_key) as cv:
        v = await cv.create_video("async client", num_inference_steps=3)
        kinds = [(k, d) async for k, d in cv.events(v["id"])]
        assert [d["step"] for k, d in kinds if k == "step"] == [1, 2, 3]
        assert kinds[-1][1]["status"] == "completed"
        mp4 = await cv.download_bytes(v["id"])
        with av.open(io.BytesIO(mp4)) as c:
            assert c.streams.video[0].codec_context.width == 64
        remix = await cv.remix_video(v["id"], "async remix")
        assert remix["remixed_from_video_id"] == v["id"] and remix["seed"] == v["seed"]
        await cv.delete_video(remix["id"])
