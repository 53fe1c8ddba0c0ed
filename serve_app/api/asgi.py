"""The ASGI (FastAPI) application the Ingress serves: middleware, error handlers, every family's routes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from . import health
from .a1111 import routes as a1111_routes
from .errors import install_error_handlers
from .jobs import routes as job_routes
from .middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    ConcurrencyLimitMiddleware,
    DeadlineMiddleware,
    OutcomeCounterMiddleware,
    RequestIdMiddleware,
)
from .native import routes as native_routes
from .openai import routes as openai_routes
from .serving import GenerationService
from .web import mount_web_page

DESCRIPTION = """Text-to-image and image-to-image with dynamic batching on Ray Serve.

* Native API: `/generate`, `/generate/batch`, `/img2img`, `/info`, `/healthz`.
* OpenAI Images API: `/v1/images/generations`, `/v1/images/edits`, `/v1/models`.
* AUTOMATIC1111 API: `/sdapi/v1/txt2img`, `/sdapi/v1/img2img`, `/sdapi/v1/samplers`, `/sdapi/v1/sd-models`.

Errors: `{"error": {"code", "message", "field"}, "request_id"}` (OpenAI's shape under `/v1`);
every response carries `X-Request-Id`.
"""


def create_api(service: GenerationService, api_keys: list[str] | None = None) -> FastAPI:
    """The app for `service`; with `api_keys`, every route but probes, docs and the page needs one."""
    app = FastAPI(title="Stable Diffusion on Ray Serve", version=__version__, description=DESCRIPTION)
    app.state.service = service
    install_error_handlers(app)
    limits = service.limits
    # add_middleware puts each layer outside the previous one: read these bottom-up for the request path.
    app.add_middleware(DeadlineMiddleware, default_s=limits.request_timeout_s)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(
        ConcurrencyLimitMiddleware, limit=limits.max_concurrent_requests, retry_after_s=limits.retry_after_s
    )
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)
    if service.settings.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=service.settings.cors.allow_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Request-Timeout"],
            expose_headers=["X-Request-Id", "X-Seed", "X-Batch-Size", "X-Generation-Time-S", "Retry-After"],
        )
    app.add_middleware(OutcomeCounterMiddleware, counter=service.responses_by_status)
    app.add_middleware(RequestIdMiddleware, replica=service.replica)
    app.include_router(native_routes.router)
    app.include_router(job_routes.router)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(a1111_routes.router)
    mount_web_page(app)
    return app
