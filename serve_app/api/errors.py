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

OPENAI_PREFIX = "/v1/"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    @classmethod
    def invalid(cls, field: str, problem: str) -> ApiError:
        return cls(422, "invalid_request", f"{field}: {problem}", field)


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


def validation_problems(exc: RequestValidationError) -> list[dict]:
    problems = []
    for error in exc.errors():
        field = _field_path(error.get("loc", ()))
        message = "unknown field" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
        problems.append({"field": field, "message": message.removeprefix("Value error, ")})
    return problems


def _is_malformed_body(exc: RequestValidationError) -> bool:
    return any(
        error.get("type") in ("json_invalid", "model_attributes_type")
        or (error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",))
        for error in exc.errors()
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        if _is_malformed_body(exc):
            return error_response(request, 400, "malformed_request", "request body must be a JSON object")
        problems = validation_problems(exc)
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(request, 422, "invalid_request", message, problems[0]["field"], details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return error_response(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
