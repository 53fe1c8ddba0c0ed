"""The jobs API: submit now (202), watch progress (JSON or server-sent events), fetch later, cancel,
refine a stored image. The work is the jobs service's (`service/jobs.py`); these are its HTTP forms."""

from __future__ import annotations

import asyncio
import io
from typing import Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ...job_queue.records import JobStatus
from ...service.encoding import MEDIA_TYPES, encode_image
from ..dependencies import Jobs, Owner, Service
from ..errors import request_id_of
from ..responses import accepted, event_stream
from .protocol import JobList, JobRequest, JobView, RefineByIdRequest, RefineRequest

router = APIRouter(tags=["Jobs"])

_ACCEPTED = {202: {"description": "accepted: the job's id, status and URLs; Location names it"}}


@router.post("/jobs", status_code=202, response_model=JobView, responses=_ACCEPTED, summary="Submit a job")
async def submit(body: JobRequest, request: Request, service: Service, jobs: Jobs, owner: Owner):
    params = body.image_params()
    init_image = mask = None
    if body.init_image is not None:
        init_image, mask = await service.edit(body.init_image, body.mask, params)
    size = None if init_image is None else (init_image.shape[1], init_image.shape[0])
    params, controls = await service.control_images(params, body.control_images(), size=size)
    record = await jobs.submit(
        params,
        body.num_images,
        request_id_of(request),
        owner,
        init_image=init_image,
        mask=mask,
        control_images=controls,
        webhook=body.webhook,
        preview_every=body.preview_every,
        priority=body.priority,
    )
    return accepted(record)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(
    jobs: Jobs,
    owner: Owner,
    status: JobStatus | None = None,
    limit: int = Query(20, ge=1, le=200),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
):
    page, next_cursor = await jobs.list(status, owner, limit, cursor)
    views = [JobView.of(record, live, await jobs.links(record)) for record, live in page]
    return JobList(jobs=views, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobView, summary="A job's state, progress and images")
async def get_job(job_id: str, jobs: Jobs, owner: Owner):
    record = await jobs.find(job_id, owner)
    return JobView.of(record, await jobs.live_state(record), await jobs.links(record))


@router.get(
    "/jobs/{job_id}/images/{index}",
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    summary="Download one image of a job",
)
async def get_image(
    job_id: str,
    index: int,
    jobs: Jobs,
    owner: Owner,
    format: Literal["png", "jpeg", "webp"] = "png",
    quality: int = Query(90, ge=1, le=100),
):
    data = await jobs.image(await jobs.find(job_id, owner), index)
    if format != "png":
        data = await asyncio.to_thread(_convert, data, format, quality)
    headers = {"Content-Disposition": f'inline; filename="{job_id[:12]}-{index}.{format}"'}
    return Response(data, media_type=MEDIA_TYPES[format], headers=headers)


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Server-sent events: queued (position), running, progress, then succeeded, failed or canceled",
)
async def job_events(job_id: str, jobs: Jobs, owner: Owner):
    return event_stream(await jobs.events(job_id, owner))


@router.delete("/jobs/{job_id}", response_model=JobView, summary="Cancel a job")
async def cancel(job_id: str, jobs: Jobs, owner: Owner):
    return JobView.of(await jobs.cancel(job_id, owner))


@router.post(
    "/jobs/{job_id}/refine",
    status_code=202,
    response_model=JobView,
    responses=_ACCEPTED,
    summary="Refine a stored image",
)
async def refine(job_id: str, body: RefineRequest, request: Request, jobs: Jobs, owner: Owner):
    return await _refine(jobs, request, owner, job_id, body)


@router.post("/refine", status_code=202, response_model=JobView, responses=_ACCEPTED, summary="Refine a stored image")
async def refine_by_id(body: RefineByIdRequest, request: Request, jobs: Jobs, owner: Owner):
    return await _refine(jobs, request, owner, body.id, body)


async def _refine(jobs: Jobs, request: Request, owner: str | None, job_id: str, body: RefineRequest):
    record = await jobs.refine(
        await jobs.find(job_id, owner),
        body.image,
        request_id_of(request),
        owner,
        **body.model_dump(include={"prompt", "negative_prompt", "strength", "num_inference_steps", "seed", "refiner"}),
        mask=body.mask,
        inpaint=body.inpaint_params(body.mask is not None),
        webhook=body.webhook,
    )
    return accepted(record)


def _convert(png: bytes, output_format: str, quality: int) -> bytes:
    from PIL import Image

    return encode_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), output_format, quality)
