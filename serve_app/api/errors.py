"""Errors are part of the API: one JSON shape, a status that means something, a request id.

    {"error": {"code": "invalid_request", "message": "width: must be ...", "field": "width"},
     "request_id": "3f2a..."}

OpenAI-compatible routes (/v1/...) answer in OpenAI's shape instead:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": "invalid_request"}}

422 validation (the field named), 400 malformed body, 413 body too large,
503 overloaded (with Retry-After), 504 timed out, 500 unexpected (never a
stack trace). Every response carries X-Request-Id.
"""

from __future__ import annotations

import difflib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service.errors import ApiError

OPENAI_PREFIX = "/v1/"


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def validate_or_422(model, data):
    """Validate a body the route parsed itself (multipart forms, dual content types) like FastAPI would."""
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_request", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def error_body(
    path: str, status: int, code: str, message: str, request_id: str, field: str | None = None, **extra
) -> dict:
    """The error document for a response on `path`: OpenAI's shape under /v1/, ours elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": _openai_type(status), "param": field, "code": code}}
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error, "request_id": request_id}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict | None = None,
    **extra,
) -> JSONResponse:
    body = error_body(request.url.path, status, code, message, request_id_of(request), field, **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _openai_type(status: int) -> str:
    if status in (401, 403):
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _field_path(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


# Fields of the other API families (and common slips), by what they are called on the native API.
_OTHER_NAMES = {
    "steps": ("num_inference_steps", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "cfg_scale": ("guidance_scale", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "sampler_name": ("scheduler", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "sampler_index": ("scheduler", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "batch_size": ("num_images", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "n_iter": ("num_images", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "denoising_strength": ("strength", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "init_images": ("init_image", "the AUTOMATIC1111 API's name (/sdapi/v1)"),
    "size": ("width and height", "the OpenAI API's name (/v1/images/generations)"),
    "n": ("num_images", "the OpenAI API's name (/v1/images/generations)"),
    "sampler": ("scheduler", None),
    "cfg": ("guidance_scale", None),
    "guidance": ("guidance_scale", None),
    "negative": ("negative_prompt", None),
}
# The field names of each family's requests, for the names their callers use in messages.
_FAMILY_NAMES = {
    OPENAI_PREFIX: {"n": "num_images"},
    "/sdapi/": {"steps": "num_inference_steps", "cfg_scale": "guidance_scale", "batch_size": "num_images"},
}
_BOUND_ERRORS = ("less_than_equal", "greater_than_equal", "less_than", "greater_than")


def _unknown_field(field: str, known: set[str]) -> str:
    """'unknown field', and what the caller probably meant."""
    name = field.rsplit(".", 1)[-1]
    if name in _OTHER_NAMES:
        meant, where = _OTHER_NAMES[name]
        return f"unknown field; did you mean {meant}?" + (f" ({name} is {where})" if where else "")
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"unknown field; did you mean {close[0]}?" if close else "unknown field"


def validation_problems(
    exc: RequestValidationError, path: str = "", limits=None, known: set[str] = frozenset()
) -> list[dict]:
    """One problem per error: the field as the caller named it, and a message that says what to send.
    Range errors state this deployment's limits (`limits.bounds()`), not the schema's outer bounds."""
    family = next((names for prefix, names in _FAMILY_NAMES.items() if path.startswith(prefix)), {})
    bounds = limits.bounds() if limits is not None else {}
    problems = []
    for error in exc.errors():
        field = _field_path(error.get("loc", ()))
        kind = error.get("type")
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        name = field.rsplit(".", 1)[-1]
        canonical = family.get(name, name)
        if kind == "extra_forbidden":
            message = _unknown_field(field, known)
        elif kind in _BOUND_ERRORS and canonical in bounds:
            lowest, highest = bounds[canonical]
            message = f"must be between {lowest:g} and {highest:g} (got {error.get('input')})"
        elif kind in _BOUND_ERRORS and name == "seed" and error.get("input") in (-1, "-1"):
            message = "must be 0 or more; leave seed out (or send null) for a random seed"
        problems.append({"field": field, "message": message})
    return problems


def _malformed(exc: RequestValidationError, request: Request, body: bytes) -> tuple[int, str] | None:
    """A body that is not what the route reads: a status and a message saying what went wrong and where."""
    errors = exc.errors()
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    for error in errors:
        if error.get("type") == "json_invalid":
            position = error.get("loc", (None, None))[-1]
            where = ""
            if isinstance(position, int):
                before = body[:position].decode("utf-8", "replace")
                where = f" at line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}"
            reason = (error.get("ctx") or {}).get("error", "not valid JSON")
            return 400, f"request body is not valid JSON: {reason}{where}"
    # A body FastAPI did not parse as JSON (another Content-Type, or none) reaches the model as bytes.
    unparsed = any(
        tuple(e.get("loc", ())) == ("body",)
        and e.get("type") in ("missing", "model_attributes_type")
        and isinstance(e.get("input"), (bytes, type(None)))
        for e in errors
    )
    if unparsed and body and content_type != "application/json" and not content_type.startswith("multipart/"):
        got = f"Content-Type {content_type}" if content_type else "no Content-Type"
        return 415, f"send the body as JSON with Content-Type: application/json (it came with {got})"
    body_missing = any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors)
    if body_missing or any(e.get("type") == "model_attributes_type" for e in errors):
        return 400, "request body must be a JSON object"
    return None


async def _body_if_unread(request: Request) -> bytes:
    """The raw body, to say where JSON broke; a multipart body was streamed into its form, never kept."""
    try:
        return await request.body()
    except RuntimeError:  # "Stream consumed"
        return b""


def install_error_handlers(app: FastAPI, known_fields: set[str] = frozenset()) -> None:
    """`known_fields`: every field name the API accepts, for "did you mean ...?" on unknown ones."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        malformed = _malformed(exc, request, await _body_if_unread(request))
        if malformed is not None:
            status, message = malformed
            code = "unsupported_media_type" if status == 415 else "malformed_request"
            return error_response(request, status, code, message)
        service = getattr(request.app.state, "service", None)
        limits = getattr(service, "published_limits", None)
        problems = validation_problems(exc, request.url.path, limits, known_fields)
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(request, 422, "invalid_request", message, problems[0]["field"], details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
