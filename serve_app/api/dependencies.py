"""What a route's signature asks for: the services (`service: Service`, `jobs: Jobs`) and who calls."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..service.generation import GenerationService
from ..service.jobs import JobService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


def get_owner(request: Request) -> str | None:
    """The jobs the caller may see: its API key's (hashed), or everyone's when keys are off."""
    _, _, key = (request.headers.get("authorization") or "").partition(" ")
    return get_jobs(request).owner(key.strip() or None)


Service = Annotated[GenerationService, Depends(get_service)]
Jobs = Annotated[JobService, Depends(get_jobs)]
Owner = Annotated[str | None, Depends(get_owner)]
