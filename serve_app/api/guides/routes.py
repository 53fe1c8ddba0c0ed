"""Routes of the tutorials' servers (see protocol.py), answered by this server's own services."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ...job_queue.records import JobStatus
from ...service.encoding import encode_results, zip_archive
from ...service.generation import is_ready
from ..dependencies import Jobs, Owner, Service
from ..errors import ApiError, request_id_of, validate_or_422
from .protocol import FIELD_NAMES, GenerateImagesRequest, GenerateQuery

router = APIRouter(tags=["Tutorial-compatible"])


@router.get(
    "/generate",
    responses={200: {"content": {"image/png": {}}}},
    summary="Text to image from a query string (the SD 3.5 Turbo guide's GET /generate?prompt=...)",
)
async def generate_from_query(request: Request, service: Service):
    query = validate_or_422(GenerateQuery, dict(request.query_params))
    tasks = service.tasks_for(query.params(), 1, request_id_of(request), names=FIELD_NAMES)
    [image] = await service.generate(tasks)
    [png] = await encode_results([image], "png", 90, service.model)
    return Response(
        png, media_type="image/png", headers={"X-Seed": str(image.seed), "X-Batch-Size": str(image.batch_size)}
    )


@router.post(
    "/generate_images",
    responses={200: {"content": {"application/zip": {}}}},
    summary="Several prompts, one PNG each, as a zip (the SD 3.5 Turbo guide's POST /generate_images)",
)
async def generate_images(body: GenerateImagesRequest, request: Request, service: Service):
    most = service.published_limits.max_prompts_per_request
    if len(body.prompts) > most:
        raise ApiError.invalid("prompts", f"must have at most {most} entries (got {len(body.prompts)})")
    request_id = request_id_of(request)
    task_lists = [
        service.tasks_for(body.image_params(prompt, i), 1, request_id, names={**FIELD_NAMES, "prompt": f"prompts.{i}"})
        for i, prompt in enumerate(body.prompts)
    ]
    images = [image for images in await service.generate_each(task_lists) for image in images]
    pngs = await encode_results(images, "png", 90, service.model)
    files = {f"image_{i:03d}_seed{image.seed}.png": png for i, (image, png) in enumerate(zip(images, pngs))}
    return Response(
        zip_archive(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="images-{request_id[:12]}.zip"'},
    )


@router.get("/health", summary="Health in the GTX 1060 guide's shape (GPU memory, model loaded, uptime)")
async def health(service: Service):
    status = await service.generator_status()
    ready = is_ready(status)
    gpu = None
    if ready:
        try:
            gpu = (await service.generator_info()).get("gpu")
        except Exception:  # noqa: BLE001 - health must answer even when a replica is busy or restarting
            gpu = None
    return {
        "status": "healthy" if ready else "starting",
        "gpu_available": gpu is not None,
        "gpu_memory_used": gpu["memory_used_bytes"] if gpu else None,
        "gpu_memory_total": gpu["memory_total_bytes"] if gpu else None,
        "model_loaded": ready,
        "uptime_seconds": int(time.time()) - service.started_at,
    }


@router.get("/status/{job_id}", summary="A job's status (the job-queue guides' GET /status/{job_id})")
async def job_status(job_id: str, jobs: Jobs, owner: Owner):
    record = await jobs.find(job_id, owner)
    live = await jobs.live_state(record) or {}
    progress = live.get("progress") or {}
    done = record.status == JobStatus.succeeded
    return {
        "job_id": record.id,
        "status": record.status.value,
        "position": live.get("position"),
        "progress": progress.get("step", 0) / progress["total_steps"] if progress.get("total_steps") else float(done),
        "images": [f"/download/{record.id}?index={image.index}" for image in record.images] if done else [],
        "error": record.error.message if record.error else None,
    }


@router.get(
    "/download/{job_id}",
    responses={200: {"content": {"image/png": {}}}},
    summary="A finished job's image as PNG (the job-queue guides' GET /download/{id})",
)
async def download(job_id: str, jobs: Jobs, owner: Owner, index: int = Query(0, ge=0, description="which image")):
    record = await jobs.find(job_id, owner)
    png = await jobs.image(record, index)
    headers = {"Content-Disposition": f'attachment; filename="{job_id[:12]}-{index}.png"'}
    return Response(png, media_type="image/png", headers=headers)
