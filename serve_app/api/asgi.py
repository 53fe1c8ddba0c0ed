"""The ASGI (FastAPI) application the Ingress serves: middleware, error handlers, every family's routes."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..config import named_keys
from ..service.generation import GenerationService
from ..service.jobs import JobService
from ..service.tenants import TenantAdmission, TenantDirectory
from . import health, usage
from .a1111 import routes as a1111_routes
from .errors import install_error_handlers
from .guides import routes as guide_routes
from .jobs import routes as job_routes
from .jobs.protocol import JobRequest
from .middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    ConcurrencyLimitMiddleware,
    DeadlineMiddleware,
    OutcomeCounterMiddleware,
    RequestIdMiddleware,
    TenantMiddleware,
)
from .native import protocol as native_protocol
from .native import routes as native_routes
from .openai import routes as openai_routes
from .web import mount_docs, mount_web_page

DESCRIPTION = """Text-to-image and image-to-image with dynamic batching on Ray Serve.

* Native API: `/generate`, `/generate/prompts`, `/img2img`, `/info`, `/healthz`.
* OpenAI Images API: `/v1/images/generations`, `/v1/images/edits`, `/v1/models`.
* AUTOMATIC1111 API: `/sdapi/v1/txt2img`, `/sdapi/v1/img2img`, `/sdapi/v1/samplers`, `/sdapi/v1/sd-models`.
* The tutorials' own routes: `GET /generate?prompt=`, `POST /generate_images`, `GET /health`, `/status/{id}`, `/download/{id}`.

Errors: `{"error": {"code", "message", "field"}, "request_id"}` (OpenAI's shape under `/v1`);
every response carries `X-Request-Id`.
"""


# Every field name the native API takes (the others ignore unknown fields), for "did you mean ...?".
NATIVE_FIELDS = frozenset(
    name
    for model in (
        native_protocol.GenerateRequest,
        native_protocol.Img2ImgRequest,
        native_protocol.MultiPromptRequest,
        JobRequest,
    )
    for name in model.model_fields
)


def create_api(
    service: GenerationService, api_keys: list[str] | dict[str, str] | None = None, jobs: JobService | None = None
) -> FastAPI:
    """The app for `service` (and `jobs`: without one, the jobs API has no queue to talk to); with `api_keys`
    (by name, or a list: named from their hashes), every route but probes, docs and the page needs one."""
    app = FastAPI(
        title="Stable Diffusion on Ray Serve",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,  # served by mount_docs, from local assets
        redoc_url=None,
    )
    app.state.service = service
    app.state.jobs = jobs or JobService(None, None, service)
    install_error_handlers(app, known_fields=NATIVE_FIELDS)
    limits = service.published_limits
    keys = named_keys(api_keys) if isinstance(api_keys, list) else api_keys
    # Who asks and what they may (tenants: fair share, priorities, rate limits, daily quotas in the job store).
    app.state.tenants = TenantAdmission(
        TenantDirectory(service.settings.tenants, keys or None),
        store=app.state.jobs.store,
        writer=service.replica or None,
        retry_after_s=limits.retry_after_s,
    )
    # add_middleware puts each layer outside the previous one: read these bottom-up for the request path.
    app.add_middleware(DeadlineMiddleware, default_s=limits.request_timeout_s)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limits.max_body_bytes)
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        limit=limits.max_concurrent_requests,
        retry_after_s=limits.retry_after_s,
        default_deadline_s=limits.request_timeout_s,
    )
    app.add_middleware(TenantMiddleware, admission=app.state.tenants)
    if keys:
        app.add_middleware(ApiKeyMiddleware, keys=list(keys.values()))
    if service.settings.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=service.settings.cors.allow_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Request-Timeout", "X-Tenant"],
            expose_headers=[
                "X-Request-Id",
                "X-Seed",
                "X-Batch-Size",
                "X-Generation-Time-S",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
            ],
        )
    app.add_middleware(OutcomeCounterMiddleware, counter=service.responses_by_status)
    app.add_middleware(RequestIdMiddleware, replica=service.replica, retry_after_s=limits.retry_after_s)
    app.include_router(native_routes.router)
    app.include_router(job_routes.router)
    app.include_router(health.router)
    app.include_router(usage.router)
    app.include_router(openai_routes.router)
    app.include_router(a1111_routes.router)
    app.include_router(a1111_routes.controlnet_router)
    app.include_router(guide_routes.router)
    mount_web_page(app)
    mount_docs(app)
    publish_limits_in_openapi(app, limits, service.models)
    return app


# The request fields of every family that carry a deployment limit, by the limit's name.
_LIMITED_FIELDS = {
    "width": ("width",),
    "height": ("height",),
    "num_inference_steps": ("num_inference_steps", "steps"),
    "guidance_scale": ("guidance_scale", "cfg_scale"),
    "num_images": ("num_images", "n", "batch_size"),
}


def publish_limits_in_openapi(app: FastAPI, limits, models) -> None:
    """/openapi.json states this deployment's limits (`limits.bounds()`), not the schema's outer bounds:
    what the document promises is what validation enforces and what its errors say. With several models
    the bounds are the widest of them, and each request's `model` says which model allows what."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        bounds = limits.bounds()
        for properties in _all_properties(schema):  # components, and the request bodies written inline
            for limit, names in _LIMITED_FIELDS.items():
                for name in names:
                    if name in properties:
                        _bound(properties[name], *bounds[limit])
            for name in ("prompt", "negative_prompt"):
                if name in properties:
                    _bound_length(properties[name], limits.max_prompt_chars)
        if models.several:
            for properties in _request_properties(schema):
                if "model" in properties:
                    _describe_models(properties["model"], models, bounds)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _all_properties(node) -> list[dict]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            found.append(node["properties"])
        for value in node.values():
            found += _all_properties(value)
    elif isinstance(node, list):
        for value in node:
            found += _all_properties(value)
    return found


def _request_properties(schema: dict) -> list[dict]:
    """The properties of request bodies (inline, and every schema they name, however deep), not of responses."""
    components = schema.get("components", {}).get("schemas", {})
    found = [
        media["schema"]
        for path in schema.get("paths", {}).values()
        for operation in path.values()
        if isinstance(operation, dict)
        for media in operation.get("requestBody", {}).get("content", {}).values()
        if "schema" in media
    ]
    seen: set[str] = set()
    for node in found:  # grows as named schemas are found
        for ref in _refs(node):
            name = ref.rsplit("/", 1)[-1]
            if name in components and name not in seen:
                seen.add(name)
                found.append(components[name])
    return _all_properties(found)


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _describe_models(prop: dict, models, published: dict) -> None:
    """Each model a request may name, with its bounds where they are narrower than the published ones."""
    notes = []
    for model_id in models.ids:
        own = [
            f"{name} {low:g}–{high:g}"
            for name, (low, high) in models.limits_for(model_id).bounds().items()
            if (low, high) != published[name]
        ]
        label = f"{model_id} (default)" if model_id == models.default else model_id
        notes.append(f"{label}: {', '.join(own)}" if own else label)
    described = next((part for part in [prop, *prop.get("anyOf", [])] if "description" in part), prop)
    text = described.get("description", "").rstrip(".")
    described["description"] = ". ".join(filter(None, [text, f"Models here: {'; '.join(notes)}"]))


def _numeric_parts(prop: dict) -> list[dict]:
    return [p for p in [prop, *prop.get("anyOf", [])] if p.get("type") in ("integer", "number")]


def _bound(prop: dict, lowest: float, highest: float) -> None:
    for part in _numeric_parts(prop):
        part.pop("exclusiveMinimum", None)
        part["minimum"], part["maximum"] = lowest, highest


def _bound_length(prop: dict, longest: int) -> None:
    for part in [prop, *prop.get("anyOf", [])]:
        if part.get("type") == "string":
            part["maxLength"] = longest
