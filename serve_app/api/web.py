"""What a browser gets: the web page at `/` (plain HTML, CSS and JS from serve_app/web/, no build
step) and the API documentation at `/docs` (Swagger UI) and `/redoc` (ReDoc). Nothing comes from a
CDN: the documentation's assets are served from the `fastapi-offline` package, so both work on a
machine with no network.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-assets"


def mount_web_page(app: FastAPI) -> None:
    index_html = resources.files("serve_app") / "web" / "index.html"

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(index_html), media_type="text/html")

    app.mount("/web", StaticFiles(packages=[("serve_app", "web")]), name="web")


def mount_docs(app: FastAPI) -> None:
    """/docs and /redoc with local assets (the app is created with docs_url=None, redoc_url=None)."""
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
