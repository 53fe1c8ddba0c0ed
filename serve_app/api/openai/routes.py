"""OpenAI Images API routes: /v1/images/generations, /v1/images/edits, /v1/images/variations, /v1/models.

The official `openai` Python package, pointed at this server's base URL
(`OpenAI(base_url="http://host:8000/v1", api_key="unused")`), works unmodified: b64_json or url answers,
`stream=True` with `partial_images` (server-sent events as OpenAI sends them), edits with a mask (its
transparent pixels are the area to edit), variations.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}} (see api/errors.py); inside a stream,
an `error` event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile
from pydantic import Field

from ...pipeline.tasks import ImageResult, ImageTask
from ...service.encoding import b64, encode_image, encode_results
from ...service.jobs import JobService
from ..dependencies import Jobs, Owner, Service
from ..errors import ApiError, request_id_of
from ..responses import event_stream
from .protocol import (
    FIELD_NAMES,
    ImageEditFields,
    ImageGenerationRequest,
    ImageLink,
    ImageObject,
    ImagesResponse,
    ImageVariationFields,
    ModelList,
    ModelObject,
)

PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, tags=["OpenAI compatible"])


class ImageEditForm(ImageEditFields):
    image: UploadFile = Field(..., description="the image to edit (PNG, JPEG or WebP)")
    mask: UploadFile | None = Field(
        None, description="a PNG the image's size: its fully transparent pixels are the area to edit"
    )


class ImageVariationForm(ImageVariationFields):
    image: UploadFile = Field(..., description="the image to vary (PNG, JPEG or WebP)")


_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "with stream: OpenAI's image events"}}


@router.post("/images/generations", response_model=ImagesResponse, responses=_STREAM, summary="OpenAI: create image")
async def create_image(body: ImageGenerationRequest, request: Request, service: Service, jobs: Jobs, owner: Owner):
    _check_links(body, jobs)
    tasks = service.tasks_for(body.image_params(), body.n, request_id_of(request), names=FIELD_NAMES)
    return await _answer(service, tasks, body, _Linker(request, jobs, owner, "txt2img"), "image_generation")


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    responses=_STREAM,
    summary="OpenAI: edit image (image to image; with a mask, inpainting)",
    description="multipart/form-data with `image`, `prompt` and optionally `mask` (a PNG the image's size whose "
    "fully transparent pixels are the area to edit); `strength` (0-1, default 0.75), `mask_blur`, `fill` and "
    "`paste_back` are extensions.",
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
    params = form.image_params(has_mask=form.mask is not None)
    mask = None if form.mask is None else await form.mask.read()
    init_image, mask = await service.edit(
        await form.image.read(),
        mask,
        params,
        fields=("image", "mask"),
        media_types=(form.image.content_type, None if form.mask is None else form.mask.content_type),
        meaning="transparent",
    )
    tasks = service.tasks_for(
        params, form.n, request_id_of(request), init_image=init_image, mask=mask, names=FIELD_NAMES
    )
    return await _answer(service, tasks, form, _Linker(request, jobs, owner, "img2img"), "image_edit")


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    summary="OpenAI: create image variation (image to image without a prompt)",
    description="multipart/form-data with `image`; `prompt` (default: the one a PNG of this server's carries, else "
    "none) and `strength` (default 0.6) are extensions.",
)
async def create_variation(
    form: Annotated[ImageVariationForm, Form(media_type="multipart/form-data")],
    request: Request,
    service: Service,
    jobs: Jobs,
    owner: Owner,
):
    data = await form.image.read()
    prompt = form.prompt or await asyncio.to_thread(_embedded_prompt, data) or " "
    body = form.generation_request(prompt)
    _check_links(body, jobs)
    params = body.image_params(strength=form.strength)
    init_image = await service.init_image(data, params, "image", form.image.content_type)
    tasks = service.tasks_for(params, body.n, request_id_of(request), init_image=init_image, names=FIELD_NAMES)
    return await _answer(service, tasks, body, _Linker(request, jobs, owner, "img2img"), "image_edit")


async def _answer(service, tasks: list[ImageTask], body: ImageGenerationRequest, linker, events: str):
    """The images in OpenAI's shape: streamed as `events` (`image_generation` or `image_edit`) when the body
    asks for a stream, else the whole answer (images or links)."""
    if body.stream:
        return event_stream(_image_events(service, tasks, body, events))
    return await _response(await service.generate(tasks), body, service.model, linker)


def _embedded_prompt(data: bytes) -> str | None:
    """The prompt a PNG made by this server (or an SD tool) carries in its `parameters` text, if any."""
    from PIL import Image

    try:
        text = Image.open(io.BytesIO(data)).info.get("parameters")
    except Exception:  # noqa: BLE001 - not an image: the decode that follows says so
        return None
    if not isinstance(text, str):
        return None
    return text.split("\n", 1)[0].strip() or None


async def _image_events(service, tasks: list[ImageTask], body: ImageGenerationRequest, kind: str):
    """OpenAI's image stream: `{kind}.partial_image` events from the engine's latent previews (at most
    `partial_images`, spread over the steps), then `{kind}.completed` for each image; an `error` event if it fails."""
    partials = body.partial_images or 0
    if partials:
        tasks = [dataclasses.replace(task, preview_every=1) for task in tasks]
    sent = 0
    quality = body.output_compression or 90
    common = {"background": "opaque", "output_format": body.output_format, "quality": "auto"}
    try:
        async for update in service.generate_events(tasks):
            if isinstance(update, dict):
                preview, total = update.get("preview"), update["total_steps"]
                if preview is None or sent >= partials or update["step"] * (partials + 1) < (sent + 1) * total:
                    continue
                data, size = await asyncio.to_thread(_partial_image, preview, body.output_format, quality)
                yield _event(f"{kind}.partial_image", b64_json=b64(data), partial_image_index=sent, size=size, **common)
                sent += 1
                continue
            encoded = await encode_results(update, body.output_format, quality, service.model)
            for image, data in zip(update, encoded):
                size = f"{image.params.width}x{image.params.height}"
                yield _event(f"{kind}.completed", b64_json=b64(data), size=size, usage=_NO_USAGE, **common)
    except ApiError as exc:
        yield {
            "event": "error",
            "data": {
                "error": {
                    "message": exc.message,
                    "type": "invalid_request_error" if exc.status < 500 else "server_error",
                    "param": exc.field,
                    "code": exc.code,
                }
            },
        }


_NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def _event(kind: str, **data) -> dict:
    return {"event": kind, "data": {"type": kind, "created_at": int(time.time()), **data}}


def _partial_image(preview_b64: str, output_format: str, quality: int) -> tuple[bytes, str]:
    """A latent preview (one eighth of the image's side) at the image's size, encoded as the answer's images are;
    and that size."""
    import base64

    import numpy as np
    from PIL import Image

    preview = Image.open(io.BytesIO(base64.b64decode(preview_b64))).convert("RGB")
    preview = preview.resize((preview.width * 8, preview.height * 8), Image.Resampling.NEAREST)
    return encode_image(np.asarray(preview), output_format, quality), f"{preview.width}x{preview.height}"


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
