"""The FastAPI application the Ingress serves."""

from __future__ import annotations

from fastapi import FastAPI

from .. import __version__
from . import native
from .errors import RequestIdMiddleware, install_error_handlers
from .service import GenerationService


def create_api(service: GenerationService) -> FastAPI:
    app = FastAPI(
        title="Stable Diffusion on Ray Serve",
        version=__version__,
        description="Text-to-image with dynamic batching. Errors: "
        '`{"error": {"code", "message", "field"}, "request_id"}`; every response carries X-Request-Id.',
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(native.router)
    return app
