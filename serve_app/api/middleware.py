"""ASGI layers around the FastAPI app: request ids and last-resort 500s, outcome counts,
API keys, tenants and their limits, admission control, body size limit, deadlines.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: they run on every request,
and answering early (401, 413, 503) must not read the body first.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections import Counter, deque

from starlette.exceptions import HTTPException

from ..config import KEY_NAME
from ..pipeline.fairness import SHARED_TENANT, Claim, Tally
from ..service.errors import ApiError
from ..service.generation import REQUEST_ADMISSION, REQUEST_DEADLINE
from ..service.tenants import TENANT_HEADER, Tenant, TenantAdmission
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
    proxy in front does this layer make one and stamp it itself. `replica` (this ingress
    replica's id) goes out as X-Ingress-Replica: which replica answered, seen from outside.
    A 429 or 503 always says when to come back: one that no layer gave a Retry-After gets
    `retry_after_s`.
    """

    def __init__(self, app, replica: str = "", retry_after_s: int = 2):
        self.app = app
        self.replica_header = [(b"x-ingress-replica", replica.encode())] if replica else []
        self.retry_after = [(b"retry-after", str(retry_after_s).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = _header(scope, b"x-request-id")
        request_id = incoming or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = [] if incoming else [(REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
        extra_headers += self.replica_header
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), *extra_headers]
                if message["status"] in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers += self.retry_after
                message = {**message, "headers": headers}
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
        message = f"request body is larger than {self.max_body_bytes} bytes"
        await _send_error(scope, send, 413, "payload_too_large", message, [(b"connection", b"close")])


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class OutcomeCounterMiddleware:
    """Counts responses by status code, for /info."""

    def __init__(self, app, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


# Routes anyone may call when API keys are on: probes, the web page and the API description.
OPEN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"}
)
OPEN_PREFIXES = ("/web/", "/docs-assets/")


class ApiKeyMiddleware:
    """Bearer API keys: 401 without one, 403 for a wrong one; keys compared in constant time."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._is_open(scope):
            return await self.app(scope, receive, send)
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return await _send_error(
                scope,
                send,
                401,
                "missing_api_key",
                "send an API key: Authorization: Bearer <key>",
                [(b"www-authenticate", b"Bearer")],
            )
        offered = token.strip().encode()
        # Compare with every key, always: the time taken says nothing about which key came close.
        matches = [hmac.compare_digest(offered, key) for key in self.keys]
        if not any(matches):
            return await _send_error(scope, send, 403, "invalid_api_key", "the API key is not valid")
        await self.app(scope, receive, send)

    @staticmethod
    def _is_open(scope) -> bool:
        path = scope.get("path", "")
        return scope.get("method") == "OPTIONS" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class TenantMiddleware:
    """Who asks (`service.tenants`): the API key's tenant, or with keys off the `X-Tenant` name (422 when it is
    not a name), else the shared one. For requests that make images, the tenant's limits that need no body
    (quota used up, bucket empty, images in flight at the cap) answer 429 at once, before the body is read; the
    request's admission goes with it to the generation service (which charges its images) and closes with the
    answer. Answers to a tenant with a rate or quota carry RateLimit-Limit/-Remaining/-Reset."""

    def __init__(self, app, admission: TenantAdmission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or ApiKeyMiddleware._is_open(scope):
            return await self.app(scope, receive, send)
        _, _, key = (_header(scope, b"authorization") or "").partition(" ")
        name = None if self.admission.directory.auth else _header(scope, TENANT_HEADER.lower().encode())
        if name is not None and not KEY_NAME.match(name):
            message = f"{TENANT_HEADER}: a tenant name is 1 to 64 letters, digits or . _ @ + - (got {name[:80]!r})"
            return await _send_error(scope, send, 422, "invalid_request", message, field=TENANT_HEADER)
        tenant = self.admission.tenant_for(key.strip() or None, name)
        makes_images = _makes_images(scope)
        try:
            admission = await self.admission.begin(tenant, synchronous=not _is_job(scope), makes_images=makes_images)
        except ApiError as exc:
            return await _send_error(scope, send, exc.status, exc.code, exc.message, _raw(exc.headers))
        scope.setdefault("state", {})["tenant"] = tenant
        status = 500

        async def send_with_limits(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                present = {key for key, _ in message.get("headers", [])}
                extra = [h for h in _raw(admission.headers()) if h[0] not in present] if makes_images else []
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        token = REQUEST_ADMISSION.set(admission)
        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            REQUEST_ADMISSION.reset(token)
            admission.finish(status)


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class ConcurrencyLimitMiddleware:
    """The ingress's own bounds on synchronous generation, answered at once with 503 and Retry-After
    (before reading a possibly large body), instead of queueing what cannot be served in time:
    - at most `limit` synchronous generation requests in flight;
    - admission by expected wait (Little's law): with answers coming back at `rate` per second (measured
      over the last RATE_WINDOW_S), a new request would be answered once the requests ahead of it are: its
      tenant's in flight, and each other tenant's up to that tenant's weighted share (the engines admit by
      fair share, `pipeline/fairness.py`), so about (ahead + 1) / rate seconds. Past DEADLINE_SHARE of its
      deadline (`default_deadline_s`, or a shorter X-Request-Timeout) it is refused now, cheaply, rather than
      answered 504 later after holding a place in every queue. The Generator refuses by its own, finer
      estimate what gets past this.
    Jobs (`/jobs`, `Prefer: respond-async`) are neither counted nor limited here: they are answered 202 in
    milliseconds and queue in the JobManager, up to its own bounds (`jobs.max_queued`, per key)."""

    RATE_WINDOW_S = 10.0
    MIN_ANSWERS = 8  # fewer answers in the window than this: no estimate (idle, or just started)
    # (active + 1) / rate is the mean time to an answer; the slow end of the spread must fit too.
    DEADLINE_SHARE = 0.75

    def __init__(self, app, limit: int, retry_after_s: int, default_deadline_s: float | None = None):
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.default_deadline_s = default_deadline_s
        self.active = 0
        self.active_by_tenant: dict[str, tuple[float, int]] = {}  # tenant id: (weight, requests in flight)
        self.answered: deque[float] = deque()  # monotonic times of recent 200 answers
        self.refused_by_wait = 0

    def answer_rate(self, now: float) -> float | None:
        """Answers per second over the last RATE_WINDOW_S, or None without enough of them."""
        while self.answered and self.answered[0] < now - self.RATE_WINDOW_S:
            self.answered.popleft()
        return len(self.answered) / self.RATE_WINDOW_S if len(self.answered) >= self.MIN_ANSWERS else None

    def ahead_of(self, tenant: Tenant | None) -> float:
        """Requests in flight that a new request of `tenant` waits for under fair share, itself included."""
        tenant_id, weight = (tenant.id, tenant.policy.weight) if tenant else (SHARED_TENANT, 1.0)
        claim = Claim(tenant_id, cost=1.0, weight=weight, steps=1.0)
        waiting = Tally(
            {
                t: (weight, (0.0, float(n), 0.0), (0.0, float(n), 0.0))
                for t, (weight, n) in self.active_by_tenant.items()
            }
        )
        return waiting.steps_ahead(claim)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _makes_images(scope) or _is_job(scope):
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            message = f"server busy: {self.active} requests in flight; retry after {self.retry_after_s}s"
            return await _send_error(
                scope, send, 503, "overloaded", message, [(b"retry-after", str(self.retry_after_s).encode())]
            )
        tenant: Tenant | None = scope.get("state", {}).get("tenant")
        if self.default_deadline_s is not None:
            now = time.monotonic()
            rate = self.answer_rate(now)
            try:
                deadline_s = request_timeout_s(scope, self.default_deadline_s)
            except ValueError:  # DeadlineMiddleware answers it with 422
                deadline_s = self.default_deadline_s
            ahead = self.ahead_of(tenant)  # this one included
            if rate is not None and (expected_s := ahead / rate) > self.DEADLINE_SHARE * deadline_s:
                self.refused_by_wait += 1
                retry_after = max(1, math.ceil(expected_s - self.DEADLINE_SHARE * deadline_s))
                message = (
                    f"server busy: {ahead - 1:.0f} requests ahead, about {expected_s:.0f}s to answer, too close to "
                    f"this request's {deadline_s:g}s deadline; retry after {retry_after}s"
                )
                return await _send_error(
                    scope, send, 503, "overloaded", message, [(b"retry-after", str(retry_after).encode())]
                )
        status = 0

        async def status_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        key, weight = (tenant.id, tenant.policy.weight) if tenant else (SHARED_TENANT, 1.0)
        self.active += 1
        self.active_by_tenant[key] = (weight, self.active_by_tenant.get(key, (weight, 0))[1] + 1)
        try:
            await self.app(scope, receive, status_send)
        finally:
            self.active -= 1
            remaining = self.active_by_tenant[key][1] - 1
            if remaining:
                self.active_by_tenant[key] = (weight, remaining)
            else:
                del self.active_by_tenant[key]
            if status == 200:
                self.answered.append(time.monotonic())


# GET routes that make an image (the tutorials' GET /generate?prompt=...): admitted like a POST.
_GENERATING_GETS = frozenset({"/generate"})


def _makes_images(scope) -> bool:
    method = scope.get("method")
    return method == "POST" or (method == "GET" and scope.get("path") in _GENERATING_GETS)


def _is_job(scope) -> bool:
    path = scope.get("path", "")
    prefer = _header(scope, b"prefer") or ""
    return path.startswith(("/jobs", "/refine")) or "respond-async" in prefer


TIMEOUT_HEADER = "X-Request-Timeout"


def request_timeout_s(scope, default_s: float) -> float:
    """This request's deadline in seconds: X-Request-Timeout where it is shorter than the server's.
    ValueError when the header is not a positive number of seconds."""
    asked = _header(scope, TIMEOUT_HEADER.lower().encode())
    if asked is None:
        return default_s
    try:
        seconds = float(asked)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_HEADER}: must be a positive number of seconds (got {asked!r})")
    return min(seconds, default_s)


# The wall-clock time (time.time()) by which the request being served must be answered; the
# Generator refuses at once work that could not be done by then (see GenerationService.generate).


class DeadlineMiddleware:
    """504 when a generation request outlives its deadline: the server's `request_timeout_s`, or a
    shorter one the client asks for in X-Request-Timeout (seconds). Cancelling the request here
    cancels its Generator calls too, so work that has not started is dropped."""

    def __init__(self, app, default_s: float):
        self.app = app
        self.default_s = default_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        try:
            timeout = request_timeout_s(scope, self.default_s)
        except ValueError as exc:
            return await _send_error(scope, send, 422, "invalid_request", str(exc), field=TIMEOUT_HEADER)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        token = REQUEST_DEADLINE.set(time.time() + timeout)
        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), timeout)
        except asyncio.TimeoutError:
            if not started:
                await _send_error(scope, send, 504, "timeout", f"request did not finish within {timeout:g}s")
        finally:
            REQUEST_DEADLINE.reset(token)


async def _send_error(
    scope, send, status: int, code: str, message: str, headers: list | None = None, field: str | None = None
) -> None:
    request_id = scope.get("state", {}).get("request_id", "")
    body = error_body(scope.get("path", ""), status, code, message, request_id, field)
    await _send_json(send, status, body, headers)
