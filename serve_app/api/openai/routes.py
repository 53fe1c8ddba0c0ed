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
from ..dependencies import Service
from ..errors import ApiError, request_id_of
from .protocol import (
    FIELD_NAMES,
    ImageEditFields,
    ImageGenerationRequest,
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
async def create_image(body: ImageGenerationRequest, request: Request, service: Service):
    tasks = service.tasks_for(body.image_params(), body.n, request_id_of(request), names=FIELD_NAMES)
    return await _response(await service.generate(tasks), body, service.model)


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
):
    params = form.image_params()
    init_image = await service.init_image(await form.image.read(), params, "image", form.image.content_type)
    tasks = service.tasks_for(params, form.n, request_id_of(request), init_image=init_image, names=FIELD_NAMES)
    return await _response(await service.generate(tasks), form, service.model)


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


async def _response(images: list[ImageResult], body: ImageGenerationRequest, model: str) -> ImagesResponse:
    encoded = await encode_results(images, body.output_format, body.output_compression or 90, model)
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageObject(b64_json=b64(data), seed=image.seed) for image, data in zip(images, encoded)],
        output_format=body.output_format,
        size=f"{images[0].params.width}x{images[0].params.height}",
    )
