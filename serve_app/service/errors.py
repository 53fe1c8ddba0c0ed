"""A refusal with its HTTP status: what the services raise and every API family answers in its own shape.

Below the routes on purpose: the services, the JobManager and bulk runs refuse with the same error
(bulk writes its message into the manifest instead of a response). `api/errors.py` renders it.
"""

from __future__ import annotations


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

    @classmethod
    def of(cls, exc) -> ApiError:
        """A pipeline or job-queue refusal (`GenerationError` and its kin) as an ApiError, Retry-After kept."""
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return cls(exc.status, exc.code, exc.message, exc.field, headers=headers)
