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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..service.errors import ApiError
from ..service.validation import OPENAI_PREFIX, validation_problems


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


def validate_or_422(model, data):
    """Validate a body the route parsed itself (multipart forms, dual content types) like FastAPI would."""
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_request", "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = RequestValidationError(exc.errors())
        error.model = model  # its fields' whole rules, for the messages (`validation_problems`)
        raise error from None


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


def request_fields(request: Request, exc: RequestValidationError) -> dict[str, list]:
    """Where a validation error's loc starts, for the route that raised it: location ("body", "query", ...)
    -> candidates, each (annotation, field metadata); a parameters-by-name dict stands for an annotation.
    A body validated by `validate_or_422` carries its model; FastAPI's own come from the route."""
    model = getattr(exc, "model", None)
    if model is not None:
        return {"body": [(model, [])]}
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None:
        return {}

    def by_name(params) -> dict:
        return {p.alias: (p.field_info.annotation, list(p.field_info.metadata)) for p in params}

    body = dependant.body_params
    return {
        # One body parameter is the body itself (loc body.width), unless embedded (loc body.<name>.width).
        "body": ([(body[0].field_info.annotation, [])] if len(body) == 1 else []) + [(by_name(body), [])],
        "query": [(by_name(dependant.query_params), [])],
        "path": [(by_name(dependant.path_params), [])],
        "header": [(by_name(dependant.header_params), [])],
        "cookie": [(by_name(dependant.cookie_params), [])],
    }


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
        problems = validation_problems(
            exc.errors(), request.url.path, limits, known_fields, request_fields(request, exc)
        )
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(request, 422, "invalid_request", message, problems[0]["field"], details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
