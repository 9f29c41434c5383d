"""The web console at ``/ui``: a static page and its script, shipped in the package.

The files (felix/control/api/static/) hold no data and no secret: the page asks for a
token (the admin token or a Felix token), keeps it in the tab's ``sessionStorage`` and
sends it as ``Authorization: Bearer`` on its calls to the same API (``/v1/...``), so the
API's own authentication and tenant scoping decide what it sees. Without ``--auth``
(loopback dev mode) the API needs no token and the page asks for none.

So these routes are public, not part of the OpenAPI document, and serve only the fixed
files below (read once), each with strict security headers: a Content-Security-Policy
allowing only this origin's script, style and API (no inline script, no other origin,
no framing, no form submission), ``X-Frame-Options: DENY``, ``Referrer-Policy:
no-referrer`` and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from felix.errors import NotFound

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "router"]

#: The files served under /ui/, and their media types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@functools.cache
def _asset(name: str) -> bytes:
    return (resources.files("felix.control.api") / "static" / name).read_bytes()


def _serve(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no console file {name[:80]!r}")
    return Response(_asset(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/ui")
async def console_root() -> Response:
    # The page's files are named relative to /ui/ (so a proxy may mount it elsewhere).
    return RedirectResponse("ui/", status_code=308, headers=SECURITY_HEADERS)


@router.get("/ui/")
async def console_page() -> Response:
    return _serve("index.html")


@router.get("/ui/{name}")
async def console_file(name: str) -> Response:
    return _serve(name)
