"""The web page at `GET /` (SPEC section 10): one HTML file with its own script and styles, nothing
loaded from outside, so it works offline. It talks to the jobs API (app/serving/protocols/jobs.py);
app/serving/web/health.py serves it at `/` to browsers."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import HTMLResponse

PAGE_FILE = Path(__file__).with_name("static") / "index.html"
#: The page may load nothing from elsewhere; a browser enforces it with this policy.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


@cache
def page_html() -> str:
    return PAGE_FILE.read_text(encoding="utf-8")


def page_response() -> HTMLResponse:
    return HTMLResponse(
        page_html(),
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )
