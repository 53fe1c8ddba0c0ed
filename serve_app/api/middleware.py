"""ASGI layers around the FastAPI app: request ids, last-resort 500s, body size limit."""

from __future__ import annotations

import json
import logging
import uuid

from starlette.exceptions import HTTPException

from .errors import error_body

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Request-Id"


async def _send_json(send, status: int, body: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


class RequestIdMiddleware:
    """Outermost layer: knows the request id, makes sure every response carries it,
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
        incoming = _header(scope, b"x-request-id")
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
            body = error_body(scope.get("path", ""), 500, "internal_error", "internal server error", request_id)
            await _send_json(send_with_id, 500, body)


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing passes it on as a 413 (it turns other errors into 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or as soon as a
    chunked body passes it, before any of it is parsed."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._reject(scope, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        request_id = scope.get("state", {}).get("request_id", "")
        message = f"request body is larger than {self.max_body_bytes} bytes"
        body = error_body(scope.get("path", ""), 413, "payload_too_large", message, request_id)
        await _send_json(send, 413, body, [(b"connection", b"close")])


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
