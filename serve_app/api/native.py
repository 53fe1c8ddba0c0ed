"""The native API: /generate, /generate/batch, /img2img, /healthz, /info."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..pipeline.jobs import GeneratedImage
from .encoding import MEDIA_TYPES, b64, decode_init_image, encode_image, parameters_text, zip_archive
from .errors import ApiError, request_id_of, validate_or_422
from .jobs import build_jobs
from .protocol import (
    BatchRequest,
    BatchResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationMetadata,
    ImageData,
    ImageParams,
    Img2ImgRequest,
    OutputOptions,
)
from .service import GenerationService, is_ready

router = APIRouter()


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


Service = Annotated[GenerationService, Depends(get_service)]

_IMAGE_RESPONSE = {
    200: {
        "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/zip": {}},
        "description": "the image bytes (one image; X-Seed and X-Batch-Size headers), JSON with base64 images and "
        "metadata, or a zip of images and metadata.json, as response_format / Accept ask",
    },
    422: {"description": "a parameter is out of range; error.field names it"},
}


@router.post("/generate", response_model=GenerateResponse, responses=_IMAGE_RESPONSE, summary="Text to image")
async def generate(body: GenerateRequest, request: Request, service: Service):
    form = choose_response_format(body.response_format, body.num_images, request.headers.get("accept"))
    jobs = build_jobs(body, service.limits, request_id_of(request))
    images = await service.generate(jobs)
    return await respond(images, body, form, request_id_of(request), service.model)


@router.post(
    "/img2img",
    response_model=GenerateResponse,
    responses=_IMAGE_RESPONSE,
    summary="Image to image",
    description="JSON with `init_image` as base64, or multipart/form-data with the image file in `init_image` "
    "(or `image`) and the other fields as form fields.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": Img2ImgRequest.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        **Img2ImgRequest.model_json_schema(),
                        "properties": {
                            **Img2ImgRequest.model_json_schema()["properties"],
                            "init_image": {"type": "string", "format": "binary"},
                        },
                    }
                },
            },
        }
    },
)
async def img2img(request: Request, service: Service):
    body, upload = await _read_img2img(request)
    form = choose_response_format(body.response_format, body.num_images, request.headers.get("accept"))
    init_image = await run_in_threadpool(decode_init_image, upload, service.limits, body.width, body.height)
    jobs = build_jobs(body, service.limits, request_id_of(request), init_image=init_image, strength=body.strength)
    images = await service.generate(jobs)
    return await respond(images, body, form, request_id_of(request), service.model)


@router.post(
    "/generate/batch",
    response_model=BatchResponse,
    responses={200: {"content": {"application/zip": {}}}},
    summary="Many prompts in one request",
    description="Every image goes through the same batcher as single requests, submitted together.",
)
async def generate_batch(body: BatchRequest, request: Request, service: Service):
    request_id = request_id_of(request)
    items = body.items()
    list_field = "prompts" if body.prompts is not None else "requests"
    if len(items) > service.limits.max_batch_items:
        raise ApiError.invalid(
            list_field, f"must have at most {service.limits.max_batch_items} entries (got {len(items)})"
        )
    job_lists = [
        build_jobs(
            item, service.limits, request_id, names={f: f"{list_field}.{i}.{f}" for f in ImageParams.model_fields}
        )
        for i, item in enumerate(items)
    ]
    results = await service.generate_each(job_lists)
    wants_zip = body.response_format == "zip" or (
        body.response_format is None and "application/zip" in request.headers.get("accept", "")
    )
    encoded = [await encode_all(images, body, service.model) for images in results]
    if wants_zip:
        files = {
            f"{i:03d}-{j:02d}-{image.seed}.{body.output_format}": data
            for i, (images, datas) in enumerate(zip(results, encoded))
            for j, (image, data) in enumerate(zip(images, datas))
        }
        meta = [metadata(images, service.model, request_id).model_dump() for images in results]
        files["metadata.json"] = json.dumps(meta, indent=2).encode()
        return zip_response(files, request_id)
    return BatchResponse(
        results=[
            json_response(images, datas, body, service.model, request_id) for images, datas in zip(results, encoded)
        ],
        request_id=request_id,
    )


@router.get("/healthz", summary="Liveness: the HTTP side is up")
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: a Generator replica can take work",
    responses={503: {"description": "no Generator replica is running yet (Retry-After says when to ask again)"}},
)
async def readyz(service: Service):
    status = await service.generator_status()
    body = {"status": "ready" if is_ready(status) else "not_ready", "generator": status}
    if not is_ready(status):
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(service.limits.retry_after_s)})
    return body


@router.get("/info", summary="Model, device, replicas, batching, pipeline calls by batch size, responses by status")
async def info(service: Service):
    return {
        "model": service.model,
        "uptime_s": int(time.time()) - service.started_at,
        "limits": service.limits.model_dump(),
        "auth": service.settings.auth.enabled,
        "responses_by_status": dict(sorted(service.responses_by_status.items())),
        "generator_deployment": await service.generator_status(),
        "generator": await service.generator_info(),
    }


# -- shared by the routes above --------------------------------------------------------


def choose_response_format(asked: str | None, count: int, accept: str | None) -> str:
    """What the caller asked for, else what its Accept header prefers, else one image / JSON for several."""
    if asked == "image" and count > 1:
        raise ApiError.invalid("response_format", "'image' returns one image; use 'json' or 'zip' for num_images > 1")
    if asked:
        return asked
    accept = accept or ""
    if "application/zip" in accept:
        return "zip"
    if count > 1 or ("application/json" in accept and "image/" not in accept):
        return "json"
    return "image"


async def encode_all(images: list[GeneratedImage], options: OutputOptions, model: str) -> list[bytes]:
    """Encode off the event loop: a 1024x1024 PNG takes tens of milliseconds."""

    def encode() -> list[bytes]:
        return [
            encode_image(i.pixels, options.output_format, options.quality, parameters_text(i, model)) for i in images
        ]

    return await run_in_threadpool(encode)


async def respond(
    images: list[GeneratedImage], options: OutputOptions, form: str, request_id: str, model: str
) -> Response | GenerateResponse:
    encoded = await encode_all(images, options, model)
    if form == "image":
        image = images[0]
        return Response(encoded[0], media_type=MEDIA_TYPES[options.output_format], headers=image_headers(image))
    if form == "zip":
        files = {
            f"{i:02d}-{image.seed}.{options.output_format}": data
            for i, (image, data) in enumerate(zip(images, encoded))
        }
        files["metadata.json"] = metadata(images, model, request_id).model_dump_json(indent=2).encode()
        return zip_response(files, request_id)
    return json_response(images, encoded, options, model, request_id)


def json_response(
    images: list[GeneratedImage], encoded: list[bytes], options: OutputOptions, model: str, request_id: str
) -> GenerateResponse:
    return GenerateResponse(
        images=[
            ImageData(
                b64=b64(data), seed=i.seed, media_type=MEDIA_TYPES[options.output_format], batch_size=i.batch_size
            )
            for i, data in zip(images, encoded)
        ],
        metadata=metadata(images, model, request_id),
    )


def zip_response(files: dict[str, bytes], request_id: str) -> Response:
    return Response(
        zip_archive(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="images-{request_id[:12]}.zip"'},
    )


def image_headers(image: GeneratedImage) -> dict[str, str]:
    return {
        "X-Seed": str(image.seed),
        "X-Batch-Size": str(image.batch_size),
        "X-Generation-Time-S": f"{image.generation_time_s:.4f}",
    }


def metadata(images: list[GeneratedImage], model: str, request_id: str) -> GenerationMetadata:
    first = images[0]
    return GenerationMetadata(
        prompt=first.prompt,
        negative_prompt=first.negative_prompt,
        width=first.width,
        height=first.height,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        scheduler=first.scheduler,
        strength=first.strength,
        seeds=[i.seed for i in images],
        model=model,
        batch_size=max(i.batch_size for i in images),
        generation_time_s=round(max(i.generation_time_s for i in images), 4),
        request_id=request_id,
        warnings=sorted({w for i in images for w in i.warnings}),
    )


async def _read_img2img(request: Request) -> tuple[Img2ImgRequest, bytes | str]:
    """The request from JSON (init_image as base64) or multipart (init_image as a file)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=64)
        upload = form.get("init_image") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError.invalid("init_image", "attach the image file as form field 'init_image' (or 'image')")
        fields = {k: v for k, v in form.items() if k not in ("init_image", "image")}
        data = await upload.read()
        body = validate_or_422(Img2ImgRequest, {**fields, "init_image": ""})
        return body, data
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            400, "malformed_request", "request body must be a JSON object (or multipart/form-data)"
        ) from None
    body = validate_or_422(Img2ImgRequest, payload)
    if not body.init_image:
        raise ApiError.invalid("init_image", "must not be empty")
    return body, body.init_image
