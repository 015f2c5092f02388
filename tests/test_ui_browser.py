"""The web UI at /ui, used the way a person uses it: a real Chromium (Debian's, driven by
Playwright) against the deployed HTTP app. It signs in, generates a tiny video, watches the
progress by stage and step reach 100 %, plays the result, downloads and deletes it; a wrong
password and a 429 show readable messages. The static routes serve only the UI's own files.

Without Playwright or /usr/bin/chromium the browser tests are skipped and say why; with
they fail instead with CINEVIVID_REQUIRE_ALL_TESTS=1 (as .ci/run sets it). A screenshot of the finished page goes to `CINEVIVID_TEST_ARTIFACTS`
(default `test-artifacts/`); with `CINEVIVID_UPDATE_DOCS_SCREENSHOT=1` it also replaces
`docs/ui.png`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import missing_tool

from tests.http_fixtures import *  # noqa: F401,F403
from tests.http_fixtures import HTTP_APP, http_ingress_args, run_sync

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "serve" / "api" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GENERATION_TIMEOUT_MS = 180_000


def _unavailable(reason: str):
    missing_tool(reason)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    d = Path(os.environ.get("CINEVIVID_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    # While Playwright's sync API is open it marks an event loop as running in this thread:
    # anything async the tests need runs in other threads (run_sync, the uvicorn server below).
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class PageWatch:
    """A fresh browser context and page (its own sessionStorage) that records what a user would
    not see but a test must: requests to any other origin and JavaScript errors."""

    def __init__(self, browser, origin: str):
        self.origin = origin
        self.context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.foreign: list[str] = []
        self.js_errors: list[str] = []
        self.page.on("request", self._request)
        self.page.on("pageerror", lambda exc: self.js_errors.append(str(exc)))

    def _request(self, req) -> None:
        if not (req.url.startswith(self.origin + "/") or req.url.startswith(("blob:", "data:"))):
            self.foreign.append(req.url)

    def sign_in(self, username: str, password: str) -> None:
        self.page.goto(f"{self.origin}/ui")
        self.page.fill("#username", username)
        self.page.fill("#password", password)
        self.page.click("#signin")

    def close(self) -> None:
        self.context.close()
        assert not self.foreign, f"the page loaded URLs from elsewhere: {self.foreign}"
        assert not self.js_errors, f"JavaScript errors on the page: {self.js_errors}"


@pytest.fixture
def ui(http_env, browser):
    pages: list[PageWatch] = []

    def open_page(origin: str = http_env.url) -> PageWatch:
        pages.append(PageWatch(browser, origin))
        return pages[-1]

    yield open_page
    for p in pages:
        p.close()


# ---- the static routes (no browser needed) ----
def test_ui_files_are_served_offline_and_safely(http_env):
    page = httpx.get(f"{http_env.url}/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<base href="/ui/">' in page.text and 'src="app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{http_env.url}/ui/", timeout=10).text == page.text
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{http_env.url}/ui/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), (name, r.headers)
        assert r.content == (UI_DIR / name).read_bytes()
    # only the UI's own files: no traversal to the package's code or the system's files
    for path in ("/ui/nope.js", "/ui/%2e%2e/ui.py", "/ui/..%2fui.py", "/ui/%2e%2e%2f%2e%2e%2fconfig.py",
                 "/ui/%2fetc%2fpasswd", "/ui/..%5cui.py", "/ui/sub/app.js"):
        r = httpx.get(f"{http_env.url}{path}", timeout=10)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] in ("not_found",), (path, r.text)
    # no CDN or other external URL anywhere in the shipped files
    for f in UI_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text(), re.I), f
    # and not in the OpenAPI document, like /docs
    assert not [p for p in httpx.get(f"{http_env.url}/openapi.json", timeout=10).json()["paths"] if p.startswith("/ui")]


# ---- in the browser ----
@pytest.mark.fast
def test_sign_in_generate_watch_play_download_delete(http_env, ui, artifacts_dir):
    from playwright.sync_api import expect

    user = http_env.user()
    w = ui()
    page = w.page
    w.sign_in(user.username, user.password)
    expect(page.locator("#whoami")).to_have_text(f"Signed in as {user.username}")
    assert page.evaluate("sessionStorage.getItem('cinevivid.token')").count(".") == 2  # a JWT
    expect(page.locator("#message")).to_be_hidden()

    prompt = "a lighthouse in a storm, waves breaking at dusk"
    page.fill("#prompt", prompt)
    page.select_option("#size", "64x64")
    page.fill("#seconds", "1")
    # what the progress line says over time, as the user sees it
    page.evaluate("""() => {
        window.__seen = [];
        const note = () => window.__seen.push(document.querySelector('#progress-text').textContent + ' | ' +
                                               document.querySelector('#progress-status').textContent);
        new MutationObserver(note).observe(document.querySelector('#progress-panel'),
                                           {subtree: true, childList: true, characterData: true});
    }""")
    page.click("#generate")

    expect(page.locator("#progress-text")).to_have_text("100 %", timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#progress-status")).to_have_text(re.compile(r"^completed"))
    expect(page.locator('#stages li[data-stage="transformer"] .stage-state')).to_have_text("finished")
    expect(page.locator('#stages li[data-stage="vae"] .stage-state')).to_have_text("finished")
    seen = page.evaluate("window.__seen")
    steps = [s for s in seen if re.search(r"step \d+ of 4$", s)]
    assert steps, f"no denoising step shown live: {seen}"
    percents = [int(s.split(" %")[0]) for s in seen]
    assert percents == sorted(percents) and percents[-1] == 100, seen

    # the result plays in the <video> element, from a blob: URL (the content route needs auth)
    page.wait_for_function("() => { const v = document.querySelector('#player');"
                           " return v.readyState >= 1 && v.duration > 0; }")
    player = page.evaluate("() => { const v = document.querySelector('#player');"
                           " return {src: v.src, duration: v.duration, w: v.videoWidth, h: v.videoHeight}; }")
    assert player["src"].startswith("blob:"), player
    assert player["duration"] > 0 and (player["w"], player["h"]) == (64, 64), player
    expect(page.locator("#player-caption")).to_contain_text(prompt)

    row = page.locator("#videos tbody tr", has_text=prompt)
    expect(row.locator("td.status")).to_have_text("completed")
    video_id = row.get_attribute("data-id")
    page.mouse.move(0, 0)
    shot = artifacts_dir / "ui-completed.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("CINEVIVID_UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "ui.png")

    # download: the same bytes as the API serves
    with page.expect_download() as dl:
        row.locator("button[data-action=download]").click()
    assert dl.value.suggested_filename == f"{video_id}.mp4"
    served = httpx.get(f"{http_env.url}/v1/videos/{video_id}/content", headers=user.headers, timeout=30)
    assert Path(dl.value.path()).read_bytes() == served.content and served.content[4:8] == b"ftyp"

    # delete: gone from the list and from the server
    row.locator("button[data-action=delete]").click()
    expect(page.locator("#message")).to_have_text(f"Deleted “{prompt}”.")
    expect(page.locator("#videos tbody tr", has_text=prompt)).to_have_count(0)
    expect(page.locator("#player-panel")).to_be_hidden()
    assert httpx.get(f"{http_env.url}/v1/videos/{video_id}", headers=user.headers, timeout=10).status_code == 404


def test_wrong_password_and_refused_request_say_so(http_env, ui):
    from playwright.sync_api import expect

    user = http_env.user()
    w = ui()
    w.sign_in(user.username, user.password + "-wrong")
    expect(w.page.locator("#message")).to_have_text("Wrong username or password.")
    expect(w.page.locator("#message")).to_be_visible()
    expect(w.page.locator("#app")).to_be_hidden()
    assert w.page.evaluate("sessionStorage.getItem('cinevivid.token')") is None
    # and the right one still works from the same page
    w.page.fill("#password", user.password)
    w.page.click("#signin")
    expect(w.page.locator("#whoami")).to_have_text(f"Signed in as {user.username}")
    expect(w.page.locator("#message")).to_be_hidden()
    # any other refusal shows the error envelope's message (here a 400 naming `seconds`)
    w.page.fill("#prompt", "too long for the tiny model")
    w.page.fill("#seconds", "60")
    w.page.click("#generate")
    refused = httpx.post(f"{http_env.url}/v1/videos", headers=user.headers, timeout=10,
                         json={"prompt": "too long for the tiny model", "size": "64x64", "seconds": "60"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seconds", refused.text
    said = refused.json()["error"]["message"]
    expect(w.page.locator("#message")).to_have_text(said[0].upper() + said[1:])
    expect(w.page.locator("#progress-panel")).to_be_hidden()
    assert httpx.get(f"{http_env.url}/v1/videos", headers=user.headers, timeout=10).json()["data"] == []


class ThreadedApp:
    """The HTTP app under uvicorn on a free 127.0.0.1 port, in a thread of this process, with its
    own database and limits, driving the deployed Generator (like `local_service`, but reachable
    by a browser). The socket listens before the thread starts, so it can be used at once:
    uvicorn answers once its lifespan (database migration, dispatcher) has started."""

    def __init__(self, data_dir: Path, **ingress_overrides):
        self.data_dir = data_dir
        self.overrides = ingress_overrides
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ui-test-uvicorn", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            import uvicorn

            from conftest import tiny_app_args
            from serve.api.routes import create_app
            from serve.config import AppArgs
            from serve.jobs.generation_backend import GeneratorHandleBackend
            from serve.jobs.service import JobService

            args = AppArgs.model_validate(tiny_app_args(
                name=HTTP_APP, with_ingress=True, ingress=http_ingress_args(self.data_dir, **self.overrides)))
            app = create_app(JobService(args, GeneratorHandleBackend.for_app(HTTP_APP)))
            self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", loop="asyncio",
                                                        access_log=False))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            raise
        finally:
            self.ready.set()
        self.server.run(sockets=[self.sock])

    def start(self) -> "ThreadedApp":
        self.thread.start()
        self.ready.wait()
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()
        assert not self.thread.is_alive(), "the threaded app did not stop"


def test_rate_limit_says_when_to_retry(http_env, ui, tmp_path):
    """One request per minute, burst 1: after signing in (not rate-limited) the page's first call
    takes the only token and the next one is refused with 429 + Retry-After."""
    from playwright.sync_api import expect

    from serve.ops.admin import add_user

    # the user exists (and the database is migrated) before the app starts on it
    name, password = f"u{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    run_sync(add_user(name, password, database_url=f"sqlite+aiosqlite:///{tmp_path / 'cinevivid.db'}"))
    app = ThreadedApp(tmp_path, limits={"rate_limit_per_minute": 1, "rate_limit_burst": 1}).start()
    try:
        w = ui(app.url)
        w.sign_in(name, password)
        expect(w.page.locator("#whoami")).to_have_text(f"Signed in as {name}")
        message = w.page.locator("#message")
        expect(message).to_have_text(re.compile(r"^Too many requests \(rate limit of 1 requests per minute "
                                                r"exceeded\)\. Try again in \d+ seconds?\.$"))
        seconds = int(re.search(r"Try again in (\d+)", message.text_content()).group(1))
        assert 1 <= seconds <= 60, seconds
        expect(w.page.locator("#app")).to_be_visible()  # still signed in: a 429 is not a 401
    finally:
        app.stop()
