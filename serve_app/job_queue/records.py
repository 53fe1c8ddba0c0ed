"""What a job is, as stored: its request, its state and its images. Torch-free and Ray-free.

Ids are unguessable and sort by creation time: 12 hex digits of milliseconds since the epoch,
then 24 random hex digits (96 bits). So a store lists newest first by name alone, and a
well-formed id whose time is past the retention answers "expired" (410) once its record is gone.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from enum import Enum

from pydantic import BaseModel, Field

from ..pipeline.fairness import SHARED_TENANT, Priority
from ..pipeline.params import ImageParams

JOB_ID = re.compile(r"^[0-9a-f]{36}$")


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


_last_millis = 0


def new_job_id(now: float | None = None) -> str:
    """A new id. Ids made by one process sort in the order they were made, even within a millisecond."""
    global _last_millis
    millis = int((time.time() if now is None else now) * 1000)
    if now is None:
        millis = _last_millis = max(millis, _last_millis + 1)
    return f"{millis:012x}{secrets.token_hex(12)}"


def is_job_id(text: str) -> bool:
    return bool(JOB_ID.match(text))


def created_at(job_id: str) -> float:
    """When a well-formed id was made (seconds since the epoch)."""
    return int(job_id[:12], 16) / 1000


def owner_of(api_key: str | None) -> str | None:
    """Who owns a job: a hash of the caller's API key (the key itself is never stored); None without keys."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else None


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class JobImage(BaseModel):
    index: int
    seed: int
    file: str = Field(..., description="name of the stored image (PNG) inside the job's folder")
    metadata: dict = Field(default_factory=dict, description="the parameters it was made with, and how")


class Webhook(BaseModel):
    url: str
    events: list[JobStatus] = Field(
        default_factory=lambda: [JobStatus.succeeded, JobStatus.failed, JobStatus.canceled],
        description="which final states are POSTed",
    )


class JobRecord(BaseModel):
    """One job, as the store holds it. Progress while running lives with the queue holder, not here."""

    id: str
    status: JobStatus = JobStatus.queued
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    request_id: str = ""
    model: str
    kind: str = Field("txt2img", description="txt2img or img2img")
    params: ImageParams  # as asked (defaults not filled); seed is the first image's
    seeds: list[int]
    images: list[JobImage] = Field(default_factory=list)
    error: JobError | None = None
    attempts: int = 0
    webhook: Webhook | None = None
    refined_from: str | None = Field(None, description="'<job id>/<image index>' this job refines")
    preview_every: int | None = Field(None, description="a latent preview event every this many steps")
    # Fair dispatch (the same rule as the engines'): who submitted it (a hashed id), at what priority, and
    # that tenant's weight when it was submitted.
    tenant: str = SHARED_TENANT
    priority: Priority = "normal"
    weight: float = 1.0
