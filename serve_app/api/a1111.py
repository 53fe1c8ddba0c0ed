"""AUTOMATIC1111 web UI API compatibility: /sdapi/v1/txt2img, /sdapi/v1/img2img and the probes tools call.

Supported: prompt, negative_prompt, steps, cfg_scale, width, height, seed (-1 =
random), batch_size, n_iter, sampler_name (+ scheduler "Karras"),
denoising_strength, init_images. The response has `images` (base64 PNG),
`parameters` (the request) and `info` (a JSON string with seed/all_seeds,
infotexts, ...). Anything else A1111 accepts (hires fix, face restoration,
scripts, inpainting masks, override_settings) is ignored, except `mask`, which
is refused: silently ignoring a mask would return the wrong picture.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..pipeline.jobs import SEED_MAX, GeneratedImage
from ..pipeline.schedulers import SCHEDULERS
from .encoding import b64, decode_init_image, parameters_text
from .errors import ApiError, request_id_of
from .jobs import build_jobs, params_from
from .native import Service, encode_all
from .protocol import ImageParams, OutputOptions

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])

_NAMES = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
}
_BY_A1111_NAME = {spec.a1111_name.lower(): name for name, spec in SCHEDULERS.items()}


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"prompt": "a castle", "steps": 20, "cfg_scale": 7, "seed": -1, "batch_size": 2}]
        },
    )

    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=1000)
    cfg_scale: float | None = Field(None, ge=0, le=100)
    width: int | None = Field(None, ge=8, le=4096)
    height: int | None = Field(None, ge=8, le=4096)
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="-1: random")
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M'; our names work too")
    sampler_index: str | None = Field(None, description="older alias of sampler_name")
    scheduler: str | None = Field(None, description="'Karras' selects Karras sigmas where the sampler has them")


class Img2ImgRequest(Txt2ImgRequest):
    model_config = ConfigDict(extra="ignore")

    init_images: list[str] = Field(..., min_length=1, description="base64 images; the first is used")
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask: str | None = None


class GenerationResult(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


@router.post("/txt2img", response_model=GenerationResult, summary="AUTOMATIC1111: text to image")
async def txt2img(body: Txt2ImgRequest, request: Request, service: Service):
    params = _params(body)
    jobs = build_jobs(params, service.limits, request_id_of(request), names=_NAMES)
    return await _result(await service.generate(jobs), body, service.model)


@router.post("/img2img", response_model=GenerationResult, summary="AUTOMATIC1111: image to image")
async def img2img(body: Img2ImgRequest, request: Request, service: Service):
    if body.mask:
        raise ApiError.invalid("mask", "inpainting is not supported by this server")
    params = _params(body)
    init_image = await run_in_threadpool(
        decode_init_image, body.init_images[0], service.limits, params.width, params.height, "init_images.0"
    )
    jobs = build_jobs(
        params,
        service.limits,
        request_id_of(request),
        init_image=init_image,
        strength=body.denoising_strength,
        names=_NAMES,
    )
    return await _result(await service.generate(jobs), body, service.model)


@router.get("/samplers", summary="AUTOMATIC1111: samplers this server knows")
async def samplers():
    return [{"name": spec.a1111_name, "aliases": [name], "options": {}} for name, spec in SCHEDULERS.items()]


@router.get("/sd-models", summary="AUTOMATIC1111: the served model")
async def sd_models(service: Service):
    model = service.model
    return [{"title": model, "model_name": model, "hash": None, "sha256": None, "filename": model, "config": None}]


@router.get("/options", summary="AUTOMATIC1111: the settings tools read")
async def options(service: Service):
    return {"sd_model_checkpoint": service.model, "samples_format": "png"}


def sampler(name: str | None, scheduler: str | None) -> str:
    """Our scheduler name for an A1111 sampler name (or one of ours)."""
    if not name:
        return "default"
    key = name.strip().lower()
    if scheduler and scheduler.strip().lower() == "karras" and f"{key} karras" in _BY_A1111_NAME:
        key = f"{key} karras"
    if key in _BY_A1111_NAME:
        return _BY_A1111_NAME[key]
    if key in SCHEDULERS or key == "default":
        return key
    known = ", ".join(spec.a1111_name for spec in SCHEDULERS.values())
    raise ApiError.invalid("sampler_name", f"unknown sampler {name!r}; choose one of {known}")


def _params(body: Txt2ImgRequest) -> ImageParams:
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "seed": None if body.seed == -1 else body.seed,
        "scheduler": sampler(body.sampler_name or body.sampler_index, body.scheduler),
        "num_images": body.batch_size * body.n_iter,
    }
    return params_from(fields, _NAMES)


async def _result(images: list[GeneratedImage], body: Txt2ImgRequest, model: str) -> GenerationResult:
    encoded = await encode_all(images, OutputOptions(), model)
    first = images[0]
    info = {
        "prompt": first.prompt,
        "all_prompts": [i.prompt for i in images],
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [i.negative_prompt for i in images],
        "seed": first.seed,
        "all_seeds": [i.seed for i in images],
        "subseed": -1,
        "all_subseeds": [-1] * len(images),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": SCHEDULERS[first.scheduler].a1111_name if first.scheduler in SCHEDULERS else first.scheduler,
        "cfg_scale": first.guidance_scale,
        "steps": first.num_inference_steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "denoising_strength": first.strength,
        "sd_model_name": model,
        "sd_model_hash": None,
        "restore_faces": False,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [parameters_text(i, model) for i in images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
    }
    parameters = body.model_dump(exclude={"init_images"})
    return GenerationResult(images=[b64(data) for data in encoded], parameters=parameters, info=json.dumps(info))
