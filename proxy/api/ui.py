"""The operator's page: ``GET /ui`` and its two static files under ``/ui/static/`` (``proxy/ui/``, shipped
in the wheel as package data; plain HTML, CSS and JavaScript, no build step).

The page itself is public: it holds no data. Everything it shows comes from the key-guarded endpoints
(``/status``, ``/status/events``, ``/status/requests``, ``/logs/{model}``, ``/load``, ``/unload``), which
the page's script calls with ``fetch()`` and an ``Authorization`` header, the key kept in the tab's
``sessionStorage`` only. ``EventSource`` cannot send that header, so the script reads the SSE streams
through ``fetch()`` with a small parser of its own: no key ever goes into a URL (nor so into a log).

A strict Content-Security-Policy goes with the page: scripts, styles and connections from the proxy's own
origin only, no inline script or style, nothing from a third party, no framing.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(request: Request) -> Response:
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


routes: list[BaseRoute] = [
    Route("/ui", page, methods=["GET", "HEAD"]),
    Mount("/ui/static", StaticFiles(directory=UI_DIR / "static"), name="ui-static"),
]
