"""Errors are part of the API: one JSON shape, a status that means something, a request id.

    {"error": {"code": "invalid_request", "message": "width: must be ...", "field": "width"},
     "request_id": "3f2a..."}

422 validation (the field named), 400 malformed JSON, 413 body too large,
503 overloaded (with Retry-After), 504 timed out, 500 unexpected (never a
stack trace). Every response carries X-Request-Id.
"""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Request-Id"


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


def error_body(code: str, message: str, request_id: str, field: str | None = None, **extra) -> dict:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error, "request_id": request_id}


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


def is_malformed_body(exc: RequestValidationError) -> bool:
    return any(error.get("type") in ("json_invalid", "model_attributes_type") for error in exc.errors())


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to the error shape. Routes may override the shape (OpenAI compatibility)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        body = error_body(exc.code, exc.message, request_id_of(request), exc.field)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        if is_malformed_body(exc):
            return JSONResponse(
                error_body("malformed_request", "request body must be a JSON object", request_id_of(request)),
                status_code=400,
            )
        problems = validation_problems(exc)
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        body = error_body("invalid_request", message, request_id_of(request), problems[0]["field"], details=problems)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail), request_id_of(request)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )


class RequestIdMiddleware:
    """Outermost ASGI layer: knows the request id, makes sure every response carries it,
    and turns anything unhandled into a 500 JSON error without a stack trace.

    Behind Ray Serve's proxy the request already has an id (the client's X-Request-Id
    or one the proxy made) and the proxy stamps it on the response; only without a
    proxy in front does this layer make one and stamp it itself.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = _incoming_request_id(scope)
        request_id = incoming or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = [] if incoming else [(REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            if started:
                raise
            body = json.dumps(error_body("internal_error", "internal server error", request_id)).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})


def _incoming_request_id(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None
