"""Errors the pipeline layer raises for one task, each with the HTTP status it maps to.

Torch-free, and plain enough to cross a process boundary: Ray re-raises them in
the ingress as a subclass of the original, so `except GenerationError` works there.
"""

from __future__ import annotations


class GenerationError(Exception):
    status = 500
    code = "generation_failed"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidTaskError(GenerationError):
    """The task asks for something this model cannot do (caught before the pipeline runs)."""

    status = 422
    code = "invalid_request"


class InsufficientMemoryError(GenerationError):
    """Even a single image of this size does not fit in device memory."""

    status = 507
    code = "insufficient_memory"


class PipelineUnavailableError(RuntimeError):
    """The replica's device failed: raised to Serve's health check, which replaces the replica."""


class OverloadedError(GenerationError):
    """Refused at admission: the queue ahead would not be done before the task's deadline."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return type(self), (self.message, self.retry_after_s)
