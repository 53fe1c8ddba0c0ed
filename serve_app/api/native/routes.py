"""The native API's routes: /generate, /img2img, /generate/prompts (/generate/batch: its old name)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, UploadFile
from fastapi.responses import Response
from pydantic import Field, model_validator

from ...pipeline.tasks import ImageResult
from ...service.encoding import MEDIA_TYPES, b64, encode_results, zip_archive
from ..dependencies import Jobs, Owner, Service
from ..errors import ApiError, request_id_of, validate_or_422
from ..responses import accepted, event_stream
from .protocol import (
    GenerateRequest,
    GenerateResponse,
    GenerationMetadata,
    ImageData,
    Img2ImgFields,
    Img2ImgRequest,
    MultiPromptRequest,
    MultiPromptResponse,
    OutputOptions,
)

router = APIRouter(tags=["Native"])


class Img2ImgForm(Img2ImgFields):
    """/img2img as multipart/form-data: the init image as a file, the other fields as form fields."""

    init_image: UploadFile = Field(..., description="the starting image file (PNG, JPEG or WebP)")
    mask: UploadFile | None = Field(None, description="inpainting: the area to repaint, white on black (a file)")

    @model_validator(mode="before")
    @classmethod
    def _nested_fields_as_json(cls, data):
        """A form has no nesting: outpaint, loras, refiner and controlnet come as JSON text."""
        if isinstance(data, dict):
            data = dict(data)
            for name in ("outpaint", "loras", "refiner", "controlnet"):
                if isinstance(data.get(name), str):
                    try:
                        data[name] = json.loads(data[name])
                    except ValueError:
                        pass  # validation names the field
        return data


_IMAGE_RESPONSE = {
    200: {
        "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/zip": {}},
        "description": "the image bytes (one image; X-Seed and X-Batch-Size headers), JSON with base64 images and "
        "metadata, or a zip of images and metadata.json, as response_format / Accept ask",
    },
    422: {"description": "a parameter is out of range; error.field names it"},
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses=_IMAGE_RESPONSE,
    summary="Text to image",
    description="`Prefer: respond-async` makes it a job (202, as POST /jobs); `Accept: text/event-stream` streams "
    "progress events, then the JSON response as the `succeeded` event.",
)
async def generate(body: GenerateRequest, request: Request, service: Service, jobs: Jobs, owner: Owner):
    return await _generate(request, service, jobs, owner, body)


async def _generate(
    request: Request,
    service: Service,
    jobs: Jobs,
    owner: str | None,
    body: Img2ImgFields | GenerateRequest,
    init_image=None,
    mask=None,
):
    """What /generate and /img2img share once the request is read: a job, an event stream, or the images."""
    request_id = request_id_of(request)
    size = None if init_image is None else (init_image.shape[1], init_image.shape[0])
    params, controls = await service.control_images(body.image_params(), body.control_images(), size=size)
    images = {"init_image": init_image, "mask": mask, "control_images": controls}
    if "respond-async" in request.headers.get("prefer", ""):
        record = await jobs.submit(params, body.num_images, request_id, owner, **images, priority=body.priority)
        return accepted(record)
    accept = request.headers.get("accept", "")
    tasks = service.tasks_for(params, body.num_images, request_id, **images, priority=body.priority)
    if "text/event-stream" in accept:
        return event_stream(_events(service, tasks, body, request_id))
    form = choose_response_format(body.response_format, body.num_images, accept)
    images = await service.generate(tasks)
    return await respond(images, body, form, request_id, service.model)


async def _events(service: Service, tasks, options: OutputOptions, request_id: str):
    """progress events, then `succeeded` with the JSON response, or `failed` with the error."""
    try:
        async for update in service.generate_events(tasks):
            if isinstance(update, dict):
                yield {"event": "progress", "data": update}
            else:
                encoded = await encode_results(update, options.output_format, options.quality, service.model)
                response = json_response(update, encoded, options, service.model, request_id)
                yield {"event": "succeeded", "data": response.model_dump(mode="json")}
    except ApiError as exc:  # the status line is long gone: the error travels as the last event
        yield {"event": "failed", "data": {"error": {"code": exc.code, "message": exc.message, "field": exc.field}}}


@router.post(
    "/img2img",
    response_model=GenerateResponse,
    responses=_IMAGE_RESPONSE,
    summary="Image to image",
    description="JSON with `init_image` as base64, or multipart/form-data with the image file in `init_image` "
    "and the other fields as form fields.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": Img2ImgRequest.model_json_schema()},
                "multipart/form-data": {"schema": Img2ImgForm.model_json_schema()},
            },
        }
    },
)
async def img2img(request: Request, service: Service, jobs: Jobs, owner: Owner):
    body, (image, mask), media_types = await _read_img2img(request)
    init_image, mask = await service.edit(image, mask, body.image_params(), media_types=media_types)
    return await _generate(request, service, jobs, owner, body, init_image, mask)


@router.post(
    "/generate/prompts",
    response_model=MultiPromptResponse,
    responses={200: {"content": {"application/zip": {}}}},
    summary="Many prompts in one request",
    description="Every image goes through the same engine as single requests, submitted together.",
)
@router.post(
    "/generate/batch",
    response_model=MultiPromptResponse,
    summary="Many prompts in one request (deprecated name of /generate/prompts)",
    deprecated=True,
)
async def generate_prompts(body: MultiPromptRequest, request: Request, service: Service):
    request_id = request_id_of(request)
    entries = body.entries()
    most = service.published_limits.max_prompts_per_request
    if len(entries) > most:
        raise ApiError.invalid(body.list_field, f"must have at most {most} entries (got {len(entries)})")
    task_lists = []
    for i, entry in enumerate(entries):
        prefix = f"{body.list_field}.{i}"
        names = {f: f"{prefix}.{f}" for f in type(entry).model_fields}
        names.update({f"controlnet.{j}.name": f"{prefix}.controlnet.{j}.name" for j in range(len(entry.controlnet))})
        fields = [f"{prefix}.controlnet.{j}.image" for j in range(len(entry.controlnet))]
        params, controls = await service.control_images(
            entry.image_params(), entry.control_images(), fields, names=names
        )
        task_lists.append(
            service.tasks_for(
                params, entry.num_images, request_id, control_images=controls, names=names, priority=entry.priority
            )
        )
    results = await service.generate_each(task_lists)
    wants_zip = body.response_format == "zip" or (
        body.response_format is None and "application/zip" in request.headers.get("accept", "")
    )
    encoded = [await encode_results(images, body.output_format, body.quality, service.model) for images in results]
    if wants_zip:
        files = {
            f"{i:03d}-{j:02d}-{image.seed}.{body.output_format}": data
            for i, (images, datas) in enumerate(zip(results, encoded))
            for j, (image, data) in enumerate(zip(images, datas))
        }
        meta = [metadata(images, service.model, request_id).model_dump() for images in results]
        files["metadata.json"] = json.dumps(meta, indent=2).encode()
        return zip_response(files, request_id)
    return MultiPromptResponse(
        results=[
            json_response(images, datas, body, service.model, request_id) for images, datas in zip(results, encoded)
        ],
        request_id=request_id,
    )


# -- answers ------------------------------------------------------------------------------------


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


async def respond(
    images: list[ImageResult], options: OutputOptions, form: str, request_id: str, model: str
) -> Response | GenerateResponse:
    encoded = await encode_results(images, options.output_format, options.quality, model)
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
    images: list[ImageResult], encoded: list[bytes], options: OutputOptions, model: str, request_id: str
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


def image_headers(image: ImageResult) -> dict[str, str]:
    return {
        "X-Seed": str(image.seed),
        "X-Batch-Size": str(image.batch_size),
        "X-Generation-Time-S": f"{image.generation_time_s:.4f}",
        "X-Model": image.params.model or "",
        "X-Generator-Replica": image.replica,  # which replica made it: routing by model, seen from outside
    }


def metadata(images: list[ImageResult], model: str, request_id: str) -> GenerationMetadata:
    return GenerationMetadata(
        **images[0].params.model_dump(exclude={"model"}),
        seeds=[i.seed for i in images],
        model=images[0].params.model or model,
        batch_size=max(i.batch_size for i in images),
        generation_time_s=round(max(i.generation_time_s for i in images), 4),
        request_id=request_id,
        warnings=sorted({w for i in images for w in i.warnings}),
    )


async def _read_img2img(request: Request) -> tuple[Img2ImgFields, tuple, tuple]:
    """The request from JSON (init_image and mask as base64) or multipart (files, with their declared types):
    the fields, (image, mask or None) and their (media types)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=64)
        repeated = sorted({key for key, _ in form.multi_items() if len(form.getlist(key)) > 1})
        if repeated:
            raise ApiError(
                400,
                "malformed_request",
                f"more than one {repeated[0]!r}: send each field once (files: init_image, mask)",
            )
        body = validate_or_422(Img2ImgForm, dict(form))
        mask = body.mask
        images = (await body.init_image.read(), None if mask is None else await mask.read())
        return body, images, (body.init_image.content_type, None if mask is None else mask.content_type)
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(
            400, "malformed_request", "request body must be a JSON object (or multipart/form-data)"
        ) from None
    body = validate_or_422(Img2ImgRequest, payload)
    return body, (body.init_image, body.mask), (None, None)
