"""OpenAI Images API compatibility: /v1/images/generations, /v1/images/edits, /v1/models.

The official `openai` Python package, pointed at this server's base URL
(`OpenAI(base_url="http://host:8000/v1", api_key="unused")`), works unmodified.
Fields OpenAI defines that mean nothing here (quality, style, user, ...) are
accepted and ignored; `seed`, `negative_prompt`, `num_inference_steps`,
`guidance_scale` and `scheduler` are accepted as extensions (`extra_body`).
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..pipeline.jobs import SEED_MAX, GeneratedImage
from .encoding import b64, decode_init_image
from .errors import ApiError, request_id_of, validate_or_422
from .jobs import build_jobs, params_from
from .native import Service, encode_all
from .protocol import ImageParams, OutputOptions, SchedulerName

PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, tags=["OpenAI compatible"])

_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Our field names as OpenAI callers know them, for error messages.
_NAMES = {"width": "size", "height": "size", "num_images": "n"}


class ImagesRequest(BaseModel):
    """OpenAI's image generation request, plus this server's extensions."""

    model_config = ConfigDict(
        extra="ignore",  # new OpenAI fields must not break old servers
        json_schema_extra={"examples": [{"prompt": "a watercolor fox", "n": 2, "size": "512x512"}]},
    )

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="accepted and ignored: this server serves one model")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 8) or 'auto' (the model's default)")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json is supported")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality")
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Extensions (send with extra_body=...)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    negative_prompt: str = ""
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    scheduler: SchedulerName = "default"


class ImageObject(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]
    output_format: str
    size: str


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ray-sd-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


@router.post("/images/generations", response_model=ImagesResponse, summary="OpenAI: create image")
async def create_image(body: ImagesRequest, request: Request, service: Service):
    params = _params(body)
    images = await service.generate(build_jobs(params, service.limits, request_id_of(request), names=_NAMES))
    return await _response(images, body, service.model)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    summary="OpenAI: edit image (image-to-image)",
    description="multipart/form-data with `image` and `prompt`; `strength` (0-1, default 0.75) is an extension.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image", "prompt"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "prompt": {"type": "string", "minLength": 1},
                            "n": {"type": "integer", "minimum": 1, "maximum": 10},
                            "size": {"type": "string"},
                            "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                            "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                            "seed": {"type": "integer", "minimum": 0, "maximum": SEED_MAX},
                        },
                    }
                }
            },
        }
    },
)
async def edit_image(request: Request, service: Service):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "malformed_request", "send multipart/form-data with an 'image' file and a 'prompt'")
    form = await request.form(max_files=2, max_fields=64)
    upload = form.get("image") or form.get("image[]")
    if not isinstance(upload, UploadFile):
        raise ApiError.invalid("image", "attach the image to edit as the 'image' file")
    fields = {k: v for k, v in form.items() if k not in ("image", "image[]", "mask")}
    strength = fields.pop("strength", None)
    body = validate_or_422(ImagesRequest, fields)
    params = _params(body)
    init_image = await run_in_threadpool(
        decode_init_image, await upload.read(), service.limits, params.width, params.height, "image"
    )
    strength_value = validate_or_422(_Strength, {"strength": strength}).strength if strength is not None else None
    jobs = build_jobs(
        params, service.limits, request_id_of(request), init_image=init_image, strength=strength_value, names=_NAMES
    )
    return await _response(await service.generate(jobs), body, service.model)


class _Strength(BaseModel):
    strength: float = Field(..., gt=0, le=1)


@router.get("/models", response_model=ModelList, summary="OpenAI: list models")
async def list_models(service: Service):
    return ModelList(data=[ModelObject(id=service.model, created=service.started_at)])


@router.get("/models/{model_id:path}", response_model=ModelObject, summary="OpenAI: retrieve model")
async def get_model(model_id: str, service: Service):
    if model_id != service.model:
        raise ApiError(
            404,
            "model_not_found",
            f"the model '{model_id}' does not exist; this server serves '{service.model}'",
            "model",
        )
    return ModelObject(id=service.model, created=service.started_at)


def _params(body: ImagesRequest) -> ImageParams:
    if body.response_format == "url":
        raise ApiError.invalid("response_format", "'url' is not supported: images are returned inline; use 'b64_json'")
    width = height = None
    if body.size not in (None, "auto"):
        match = _SIZE.match(body.size)
        if not match:
            raise ApiError.invalid("size", f"must look like '512x512' or be 'auto' (got {body.size!r})")
        width, height = int(match[1]), int(match[2])
        if width % 8 or height % 8:
            raise ApiError.invalid("size", f"width and height must be multiples of 8 (got {body.size})")
    fields = body.model_dump(
        include={"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler"}
    )
    return params_from({**fields, "width": width, "height": height, "num_images": body.n}, _NAMES)


async def _response(images: list[GeneratedImage], body: ImagesRequest, model: str) -> ImagesResponse:
    options = OutputOptions(output_format=body.output_format, quality=body.output_compression or 90)
    encoded = await encode_all(images, options, model)
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageObject(b64_json=b64(data), seed=image.seed) for image, data in zip(images, encoded)],
        output_format=body.output_format,
        size=f"{images[0].width}x{images[0].height}",
    )
