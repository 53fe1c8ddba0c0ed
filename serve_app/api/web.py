"""The web page at `/`: plain HTML, CSS and JS from serve_app/web/ (no build step, nothing from a CDN).

The page only talks to the native API (`/info`, `/readyz`, `POST /generate`), so
the server's part is handing out its files.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles


def mount_web_page(app: FastAPI) -> None:
    index_html = resources.files("serve_app") / "web" / "index.html"

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(index_html), media_type="text/html")

    app.mount("/web", StaticFiles(packages=[("serve_app", "web")]), name="web")
