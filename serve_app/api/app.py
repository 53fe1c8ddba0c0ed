"""The FastAPI application the Ingress serves."""

from __future__ import annotations

from fastapi import FastAPI

from .. import __version__
from . import a1111, native, openai_compat
from .errors import install_error_handlers
from .middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from .service import GenerationService
from .web import mount_web_page

DESCRIPTION = """Text-to-image and image-to-image with dynamic batching on Ray Serve.

* Native API: `/generate`, `/generate/batch`, `/img2img`, `/info`, `/healthz`.
* OpenAI Images API: `/v1/images/generations`, `/v1/images/edits`, `/v1/models`.
* AUTOMATIC1111 API: `/sdapi/v1/txt2img`, `/sdapi/v1/img2img`, `/sdapi/v1/samplers`, `/sdapi/v1/sd-models`.

Errors: `{"error": {"code", "message", "field"}, "request_id"}` (OpenAI's shape under `/v1`);
every response carries `X-Request-Id`.
"""


def create_api(service: GenerationService) -> FastAPI:
    app = FastAPI(title="Stable Diffusion on Ray Serve", version=__version__, description=DESCRIPTION)
    app.state.service = service
    install_error_handlers(app)
    # Added last = outermost: request ids wrap everything, including the 413 answer.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=service.limits.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(native.router)
    app.include_router(openai_compat.router)
    app.include_router(a1111.router)
    mount_web_page(app)
    return app
