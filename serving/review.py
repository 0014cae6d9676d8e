"""The review page: `GET /` (serving/static/review.html) and its assets under `/static/`.

Paste or upload messages, see each verdict, probability, language and the threshold that applied, with the
spans that raised (red) and lowered (green) the spam probability highlighted (POST /v1/classify with
"explain": true), and report a wrong verdict (POST /v1/feedback). Plain HTML, CSS and JavaScript shipped in
the package (pyproject.toml's package data): no build step, nothing from a CDN, so it works offline.

A message is untrusted input. The page builds its DOM with textContent / createElement only, and every
response here carries a Content-Security-Policy that allows scripts, styles and requests from this origin
alone and no inline script, so even markup that got into the DOM could not run. The page itself is open
(like /docs); the API calls it makes carry the key typed into it (`Authorization: Bearer <key>`).

    from serving import review
    app.include_router(review.router)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent / "static"
# Only these files are served: no directory listing, no path from the URL reaches the filesystem.
ASSETS = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new release's page and script arrive together
}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/")
async def review_page() -> Response:
    return Response(_read("review.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def review_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no static file {name!r}")  # the server answers it as {"error": {...}}
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
