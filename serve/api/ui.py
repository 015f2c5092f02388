"""The web UI: static files shipped in the package (`serve/api/ui/`), served at `/ui` and
`/ui/<file>`, no build step and no external URL. Only the files that exist in that folder when
the module loads can be served (a fixed name -> file map), so no request path reaches any other
file. The page talks to the same API as every other client (`/auth/login`, `/v1/...`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from serve.errors import NotFound

if TYPE_CHECKING:
    from serve.api.auth import Principal

UI_DIR = Path(__file__).resolve().parent / "ui"
INDEX = "index.html"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                ".ico": "image/x-icon"}
# What the page may load: only this origin, plus the object URLs it makes for fetched videos.
# The page works offline; this also makes any external URL fail loudly in the browser.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'self'; "
                                "frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset_table(folder: Path) -> dict[str, Path]:
    """name -> file for every served file; names are single path segments of known types."""
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix in _MEDIA_TYPES}


ASSETS = _asset_table(UI_DIR)


async def ui_index(request: Request, user: "Principal | None") -> Response:
    """The page. `<base href>` points at this UI's folder under the app's mount point, so the
    page's relative URLs resolve the same from `/ui` and `/ui/` and under a route prefix."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = ASSETS[INDEX].read_text(encoding="utf-8").replace(
        "{{BASE_HREF}}", html.escape(f"{root}/ui/", quote=True))
    return HTMLResponse(page, headers=_HEADERS)


async def ui_asset(request: Request, user: "Principal | None") -> Response:
    name = request.path_params["asset"]
    if name in ("", INDEX):
        return await ui_index(request, user)
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"no UI file {name!r}", param="path")
    return Response(path.read_bytes(), media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)
