"""OpenAI Images API routes: /v1/images/generations, /v1/images/edits, /v1/models.

The official `openai` Python package, pointed at this server's base URL
(`OpenAI(base_url="http://host:8000/v1", api_key="unused")`), works unmodified.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}} (see api/errors.py).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from pydantic import Field

from ...pipeline.tasks import ImageResult
from ...service.encoding import b64, encode_results
from ...service.jobs import JobService
from ..dependencies import Jobs, Owner, Service
from ..errors import ApiError, request_id_of
from .protocol import (
    FIELD_NAMES,
    ImageEditFields,
    ImageGenerationRequest,
    ImageLink,
    ImageObject,
    ImagesResponse,
    ModelList,
    ModelObject,
)

PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, tags=["OpenAI compatible"])


class ImageEditForm(ImageEditFields):
    image: UploadFile = Field(..., description="the image to edit (PNG, JPEG or WebP)")


@router.post("/images/generations", response_model=ImagesResponse, summary="OpenAI: create image")
async def create_image(body: ImageGenerationRequest, request: Request, service: Service, jobs: Jobs, owner: Owner):
    _check_links(body, jobs)
    tasks = service.tasks_for(body.image_params(), body.n, request_id_of(request), names=FIELD_NAMES)
    return await _response(await service.generate(tasks), body, service.model, _Linker(request, jobs, owner, "txt2img"))


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    summary="OpenAI: edit image (image-to-image)",
    description="multipart/form-data with `image` and `prompt`; `strength` (0-1, default 0.75) is an extension.",
)
async def edit_image(
    # FastAPI describes a form model as urlencoded even when it holds a file: say multipart.
    form: Annotated[ImageEditForm, Form(media_type="multipart/form-data")],
    request: Request,
    service: Service,
    jobs: Jobs,
    owner: Owner,
):
    _check_links(form, jobs)
    params = form.image_params()
    init_image = await service.init_image(await form.image.read(), params, "image", form.image.content_type)
    tasks = service.tasks_for(params, form.n, request_id_of(request), init_image=init_image, names=FIELD_NAMES)
    return await _response(await service.generate(tasks), form, service.model, _Linker(request, jobs, owner, "img2img"))


@router.get("/models", response_model=ModelList, summary="OpenAI: list models")
async def list_models(service: Service):
    return ModelList(data=[ModelObject(id=model, created=service.started_at) for model in service.models.ids])


@router.get("/models/{model_id:path}", response_model=ModelObject, summary="OpenAI: retrieve model")
async def get_model(model_id: str, service: Service):
    if model_id not in service.models.ids:
        raise ApiError(
            404,
            "model_not_found",
            f"the model '{model_id}' does not exist; available: {', '.join(service.models.ids)}",
            "model",
        )
    return ModelObject(id=model_id, created=service.started_at)


class _Linker:
    """Who asked, and where: what storing an answer's images as a job and linking to them needs."""

    def __init__(self, request: Request, jobs: JobService, owner: str | None, kind: str):
        self.request, self.jobs, self.owner, self.kind = request, jobs, owner, kind

    async def links(self, images: list[ImageResult], body: ImageGenerationRequest) -> list[ImageLink]:
        quality = body.output_compression or 90
        record = await self.jobs.store_answer(
            images, request_id_of(self.request), self.owner, self.kind, (body.output_format, quality)
        )
        base = str(self.request.base_url).rstrip("/")
        links = await self.jobs.links(record, base, body.output_format)
        return [
            ImageLink(url=url, expires_at=expires, seed=image.seed, job_id=record.id)
            for image, (url, expires) in zip(images, links)
        ]


def _check_links(body: ImageGenerationRequest, jobs: JobService) -> None:
    """Before any work: links need a store to keep the images in."""
    if body.response_format == "url" and jobs.store is None:
        raise ApiError.invalid(
            "response_format", "'url' needs a job store to keep the images in, and this app has none; use 'b64_json'"
        )


async def _response(
    images: list[ImageResult], body: ImageGenerationRequest, model: str, linker: _Linker
) -> ImagesResponse:
    if body.response_format == "url":
        data = await linker.links(images, body)
    else:
        encoded = await encode_results(images, body.output_format, body.output_compression or 90, model)
        data = [ImageObject(b64_json=b64(item), seed=image.seed) for image, item in zip(images, encoded)]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        size=f"{images[0].params.width}x{images[0].params.height}",
    )
