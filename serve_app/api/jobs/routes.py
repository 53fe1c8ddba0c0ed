"""The jobs API: submit now (202), watch progress (JSON or server-sent events), fetch later, cancel,
refine a stored image. Records and images are read from the store by any ingress replica; every
change goes through the one JobManager."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...job_queue.records import JobRecord, JobStatus, Webhook, created_at, is_job_id, new_job_id, owner_of
from ...pipeline.params import ImageParams, RefinerParams
from ..encoding import MEDIA_TYPES, decode_init_image, encode_image
from ..errors import ApiError, request_id_of
from ..serving import GenerationService, Service
from .protocol import JobList, JobRequest, JobView, RefineByIdRequest, RefineRequest

router = APIRouter(tags=["Jobs"])

_ACCEPTED = {202: {"description": "accepted: the job's id, status and URLs; Location names it"}}


@router.post("/jobs", status_code=202, response_model=JobView, responses=_ACCEPTED, summary="Submit a job")
async def submit(body: JobRequest, request: Request, service: Service):
    init_image = None
    if body.init_image is not None:
        init_image = await service.init_image(body.init_image, body.image_params())
    record = await submit_job(
        service,
        request,
        body.image_params(),
        body.num_images,
        init_image=init_image,
        webhook=body.webhook,
        preview_every=body.preview_every,
    )
    return accepted(record)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(
    request: Request,
    service: Service,
    status: JobStatus | None = None,
    limit: int = Query(20, ge=1, le=200),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
):
    records, next_cursor = await run_in_threadpool(service.store.list, status, owner(request, service), limit, cursor)
    views = [JobView.of(r, await live_state(service, r)) for r in records]
    return JobList(jobs=views, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobView, summary="A job's state, progress and images")
async def get_job(job_id: str, request: Request, service: Service):
    record = await find(service, request, job_id)
    return JobView.of(record, await live_state(service, record))


@router.get(
    "/jobs/{job_id}/images/{index}",
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    summary="Download one image of a job",
)
async def get_image(
    job_id: str,
    index: int,
    request: Request,
    service: Service,
    format: Literal["png", "jpeg", "webp"] = "png",
    quality: int = Query(90, ge=1, le=100),
):
    record = await find(service, request, job_id)
    if record.status != JobStatus.succeeded:
        raise ApiError(
            409, "job_not_finished", f"job {job_id} is {record.status.value}; its images come when it succeeds"
        )
    if not 0 <= index < len(record.images):
        raise ApiError(404, "image_not_found", f"job {job_id} has images 0 to {len(record.images) - 1}", "index")
    data = await run_in_threadpool(service.store.get_image, job_id, index)
    if data is None:
        raise ApiError(410, "job_expired", f"the images of job {job_id} were deleted")
    if format != "png":
        data = await run_in_threadpool(_convert, data, format, quality)
    headers = {"Content-Disposition": f'inline; filename="{job_id[:12]}-{index}.{format}"'}
    return Response(data, media_type=MEDIA_TYPES[format], headers=headers)


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Server-sent events: queued (position), running, progress, then succeeded, failed or canceled",
)
async def job_events(job_id: str, request: Request, service: Service):
    await find(service, request, job_id)
    stream = service.manager.options(stream=True).events.remote(job_id)
    return event_stream(stream)


@router.delete("/jobs/{job_id}", response_model=JobView, summary="Cancel a job")
async def cancel(job_id: str, request: Request, service: Service):
    await find(service, request, job_id)
    record = await service.call_manager(service.manager.cancel.remote(job_id, owner(request, service)))
    return JobView.of(record)


@router.post(
    "/jobs/{job_id}/refine",
    status_code=202,
    response_model=JobView,
    responses=_ACCEPTED,
    summary="Refine a stored image",
)
async def refine(job_id: str, body: RefineRequest, request: Request, service: Service):
    return await _refine(service, request, job_id, body)


@router.post("/refine", status_code=202, response_model=JobView, responses=_ACCEPTED, summary="Refine a stored image")
async def refine_by_id(body: RefineByIdRequest, request: Request, service: Service):
    return await _refine(service, request, body.id, body)


async def _refine(service: GenerationService, request: Request, job_id: str, body: RefineRequest):
    source = await find(service, request, job_id)
    if source.status != JobStatus.succeeded or body.image >= len(source.images):
        raise ApiError.invalid("image", f"job {job_id} has no stored image {body.image} (it is {source.status.value})")
    png = await run_in_threadpool(service.store.get_image, job_id, body.image)
    if png is None:
        raise ApiError(410, "job_expired", f"the images of job {job_id} were deleted")
    limits = service.models.limits_for(source.params.model)
    init_image = await run_in_threadpool(decode_init_image, png, limits, None, None)
    stored = source.images[body.image]
    # By default the steps the image was made with, and never so few that the strength leaves none.
    steps = body.num_inference_steps or max(
        stored.metadata.get("num_inference_steps") or 1, math.ceil(1 / body.strength)
    )
    params = ImageParams(
        prompt=body.prompt or source.params.prompt,
        negative_prompt=source.params.negative_prompt if body.negative_prompt is None else body.negative_prompt,
        num_inference_steps=steps,
        guidance_scale=source.params.guidance_scale,
        scheduler=source.params.scheduler,
        seed=stored.seed if body.seed is None else body.seed,
        strength=body.strength,
        model=source.params.model,
        loras=source.params.loras,
        refiner=RefinerParams() if _uses_refiner(service, source.params.model, body.refiner) else None,
    )
    record = await submit_job(
        service,
        request,
        params,
        1,
        init_image=init_image,
        webhook=body.webhook,
        refined_from=f"{job_id}/{body.image}",
    )
    return accepted(record)


def _uses_refiner(service: GenerationService, model: str | None, asked: bool | None) -> bool:
    has_one = (model or service.models.default) in service.models.with_refiner
    return has_one if asked is None else asked


# -- shared with the native routes (Prefer: respond-async) and A1111's progress ---------------------


async def submit_job(
    service: GenerationService,
    request: Request,
    params: ImageParams,
    num_images: int,
    *,
    init_image: np.ndarray | None = None,
    webhook: Webhook | None = None,
    refined_from: str | None = None,
    preview_every: int | None = None,
) -> JobRecord:
    """Check, seed and hand a job to the JobManager, which stores it before answering."""
    if webhook is not None:
        _check_webhook(webhook, service.settings.jobs.webhook_hosts)
    jobs = service.jobs_for(params, num_images, request_id_of(request))
    record = JobRecord(
        id=new_job_id(),
        created_at=time.time(),
        owner=owner(request, service),
        request_id=request_id_of(request),
        model=jobs[0].params.model,
        kind="txt2img" if init_image is None else "img2img",
        params=jobs[0].params,
        seeds=[job.seed for job in jobs],
        webhook=webhook,
        refined_from=refined_from,
        preview_every=preview_every,
    )
    init_png = None if init_image is None else await run_in_threadpool(encode_image, init_image, "png")
    return await service.call_manager(service.manager.submit.remote(record, init_png))


def accepted(record: JobRecord) -> JSONResponse:
    view = JobView.of(record, {"status": JobStatus.queued})
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers={"Location": view.urls["self"]})


def owner(request: Request, service: GenerationService) -> str | None:
    """With API keys on, a job belongs to the key that submitted it; others cannot see it."""
    if not service.settings.auth.enabled:
        return None
    _, _, key = (request.headers.get("authorization") or "").partition(" ")
    return owner_of(key.strip() or None)


async def find(service: GenerationService, request: Request, job_id: str) -> JobRecord:
    """The caller's job, or 404 (unknown, malformed or someone else's) / 410 (deleted after its retention)."""
    record = await run_in_threadpool(service.store.get, job_id) if is_job_id(job_id) else None
    if record is None or record.owner != owner(request, service):
        if (
            record is None
            and is_job_id(job_id)
            and created_at(job_id) < time.time() - service.settings.jobs.retention_s
        ):
            raise ApiError(410, "job_expired", f"job {job_id} was deleted after the retention period")
        raise ApiError(404, "job_not_found", f"no job {job_id}")
    return record


async def live_state(service: GenerationService, record: JobRecord) -> dict | None:
    if record.status.final:
        return None
    return await service.call_manager(service.manager.live.remote(record.id))


def event_stream(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        async for event in events:
            yield f"event: {event['event']}\ndata: {json.dumps(event['data'])}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _check_webhook(webhook: Webhook, allowed_hosts: list[str]) -> None:
    parts = urlsplit(webhook.url)
    host = parts.hostname or ""
    hostport = f"{host}:{parts.port}" if parts.port else host
    if parts.scheme not in ("http", "https") or not host:
        raise ApiError.invalid("webhook.url", "must be an http(s) URL")
    if not allowed_hosts:
        raise ApiError.invalid("webhook.url", "webhooks are off on this server (jobs.webhook_hosts is empty)")
    if host not in allowed_hosts and hostport not in allowed_hosts:
        raise ApiError.invalid("webhook.url", f"host {hostport} is not allowed; allowed: {', '.join(allowed_hosts)}")


def _convert(png: bytes, output_format: str, quality: int) -> bytes:
    from PIL import Image

    return encode_image(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), output_format, quality)
