"""The client's errors, and the retry policy for the one error it retries (503, server busy)."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


class SDServeError(Exception):
    """The server answered with an error, or could not be reached (status 0)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        field: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        head = f"{self.status} {self.code}: " if self.status else ""
        tail = f" (request {self.request_id})" if self.request_id else ""
        return f"{head}{self.message}{tail}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> SDServeError:
        """Our JSON error shape, OpenAI's, or whatever text a proxy in front sent."""
        request_id = response.headers.get("x-request-id")
        code, message, field_name = f"http_{response.status_code}", "", None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code = error.get("code") or code
            message = error.get("message") or ""
            field_name = error.get("field") or error.get("param")
            request_id = body.get("request_id") or request_id
        if not message:
            message = response.text.strip()[:300] or response.reason_phrase
        return cls(
            message,
            status=response.status_code,
            code=code,
            field=field_name,
            request_id=request_id,
            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
        )


class SDServeConnectionError(SDServeError):
    """Nothing answered: wrong URL, server down, or the request timed out."""

    @classmethod
    def from_transport_error(cls, exc: httpx.TransportError, base_url: str) -> SDServeConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return SDServeTimeout(f"no answer from {base_url} in time ({type(exc).__name__})")
        return cls(f"cannot reach {base_url}: {exc or type(exc).__name__}")


class SDServeTimeout(SDServeConnectionError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    """How 503 answers (server overloaded) and short 429s (rate limited) are retried; other errors never are.

    The server's Retry-After is honoured (capped at `max_wait_s`) with a little jitter,
    so that clients told to come back at the same time do not all arrive together.
    Without the header the wait doubles from `backoff_s`, with full jitter.
    """

    max_retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0

    def delay_s(self, retry: int, retry_after_s: float | None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        if retry_after_s is not None:
            return min(self.max_wait_s, retry_after_s) * (1 + 0.1 * rand())
        return min(self.max_wait_s, self.backoff_s * 2**retry) * rand()


DEFAULT_RETRY = RetryPolicy()


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
