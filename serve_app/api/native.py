"""The native API: POST /generate, GET /healthz, GET /info."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..pipeline.jobs import GeneratedImage, GenerationJob
from .encoding import MEDIA_TYPES, b64, encode_image, parameters_text
from .errors import request_id_of
from .protocol import GenerateRequest, GenerateResponse, GenerationMetadata, ImageData, check_limits
from .service import GenerationService, new_seed

router = APIRouter()


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


Service = Annotated[GenerationService, Depends(get_service)]


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "PNG bytes (default) with X-Seed and X-Batch-Size headers, "
            "or JSON with base64 images and metadata when response_format is json",
        },
        422: {"description": "a parameter is out of range; error.field names it"},
    },
    summary="Text to image",
)
async def generate(body: GenerateRequest, request: Request, service: Service):
    check_limits(body, service.limits)
    request_id = request_id_of(request)
    job = GenerationJob(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed if body.seed is not None else new_seed(),
        width=body.width,
        height=body.height,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        scheduler=body.scheduler,
        request_id=request_id,
    )
    images = await service.run([job])
    encoded = await run_in_threadpool(
        lambda: [encode_image(i.pixels, parameters=parameters_text(i, service.model)) for i in images]
    )
    if body.response_format == "image":
        image = images[0]
        return Response(encoded[0], media_type=MEDIA_TYPES["png"], headers=image_headers(image))
    return GenerateResponse(
        images=[ImageData(b64=b64(data), seed=i.seed, batch_size=i.batch_size) for i, data in zip(images, encoded)],
        metadata=metadata(images, service.model, request_id),
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
        model=model,
        batch_size=max(i.batch_size for i in images),
        generation_time_s=round(max(i.generation_time_s for i in images), 4),
        request_id=request_id,
        warnings=sorted({w for i in images for w in i.warnings}),
    )


@router.get("/healthz", summary="Liveness: the HTTP side is up")
async def healthz():
    return {"status": "ok"}


@router.get("/info", summary="Model, device, batching settings and pipeline calls by batch size")
async def info(service: Service):
    return {"model": service.model, "limits": service.limits.model_dump(), "generator": await service.generator_info()}
