"""AUTOMATIC1111 web UI API routes: /sdapi/v1/txt2img, /sdapi/v1/img2img, /sdapi/v1/extra-single-image and the
probes tools call."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
from fastapi import APIRouter, Request

from ...pipeline.params import LATENT_UPSCALERS, PIXEL_UPSCALERS
from ...pipeline.preprocessors import A1111_MODULE_NAMES, MODULE_DETAIL, at_resolution, preprocess
from ...pipeline.schedulers import SCHEDULERS, a1111_name
from ...pipeline.tasks import ImageResult
from ...service.encoding import (
    b64,
    controlnet_infotext,
    decode_init_image,
    decode_picture,
    encode_image,
    encode_results,
    parameters_text,
)
from ..dependencies import Jobs, Owner, Service
from ..errors import ApiError, request_id_of
from .protocol import (
    FIELD_NAMES,
    A1111DetectRequest,
    A1111ExtraSingleImageRequest,
    A1111GenerationResult,
    A1111Img2ImgRequest,
    A1111Txt2ImgRequest,
)

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"])
# The ControlNet extension's own routes, at the host root as the extension serves them (webuiapi's controlnet_*).
controlnet_router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 compatible"])


@router.post("/txt2img", response_model=A1111GenerationResult, summary="AUTOMATIC1111: text to image")
async def txt2img(body: A1111Txt2ImgRequest, request: Request, service: Service):
    params = body.image_params(family=service.models.family(body.model_name))
    params, controls = await _controls(service, body, params)
    names = {**FIELD_NAMES, **body.controlnet_names()}
    tasks = service.tasks_for(params, body.num_images, request_id_of(request), control_images=controls, names=names)
    return await _result(await service.generate(tasks), body, service.model)


@router.post("/img2img", response_model=A1111GenerationResult, summary="AUTOMATIC1111: image to image, inpainting")
async def img2img(body: A1111Img2ImgRequest, request: Request, service: Service):
    params = body.image_params(family=service.models.family(body.model_name))
    init_image, mask = await service.edit(body.init_images[0], body.mask, params, fields=("init_images.0", "mask"))
    params, controls = await _controls(service, body, params, init_image)
    tasks = service.tasks_for(
        params,
        body.num_images,
        request_id_of(request),
        init_image=init_image,
        mask=mask,
        control_images=controls,
        names={**FIELD_NAMES, **body.controlnet_names()},
    )
    return await _result(await service.generate(tasks), body, service.model)


async def _controls(service: Service, body: A1111Txt2ImgRequest, params, init_image=None):
    """The ControlNet units' images (img2img: the init image for a unit without one, as the extension does)."""
    units = body.controlnet_units()
    if not units:
        return params, ()
    images = []
    for _, image, prefix in units:
        if image is None and init_image is None:
            raise ApiError.invalid(f"{prefix}.image", "send the unit's control image (base64)")
        images.append(image if image is not None else _png(init_image))
    size = None if init_image is None else (init_image.shape[1], init_image.shape[0])
    fields = [f"{prefix}.image" for _, _, prefix in units]
    return await service.control_images(params, images, fields, size, names=body.controlnet_names())


def _png(pixels) -> bytes:
    return encode_image(pixels, "png")


@router.get("/upscalers", summary="AUTOMATIC1111: the upscalers (built in; hr_upscaler, extra-single-image)")
async def upscalers():
    """A1111's built-in resizers; hires fix's latent modes are GET /latent-upscale-modes (hr_upscaler takes both)."""
    return [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in PIXEL_UPSCALERS
    ]


@router.get("/latent-upscale-modes", summary="AUTOMATIC1111: hires fix's latent upscale modes")
async def latent_upscale_modes():
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/scripts", summary="AUTOMATIC1111: scripts (none are offered)")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.post("/extra-single-image", summary="AUTOMATIC1111: upscale an image with a built-in upscaler")
async def extra_single_image(body: A1111ExtraSingleImageRequest, service: Service):
    body.refusals()
    limits = service.published_limits
    picture = await asyncio.to_thread(decode_init_image, body.image, limits, None, None, "image")
    height, width = picture.shape[:2]
    if body.resize_mode == 1:
        size = (body.upscaling_resize_w, body.upscaling_resize_h)
    else:
        size = (round(width * body.upscaling_resize), round(height * body.upscaling_resize))
    if size[0] * size[1] > limits.max_upload_pixels:
        raise ApiError.invalid(
            "upscaling_resize", f"would make {size[0]}x{size[1]}: at most {limits.max_upload_pixels} pixels"
        )
    upscaled = await asyncio.to_thread(_upscale, picture, body, size)
    data = await asyncio.to_thread(encode_image, upscaled, "png")
    return {"image": b64(data), "html_info": f"Upscaler: {body.upscaler_1}, Size: {size[0]}x{size[1]}"}


def _upscale(picture, body: A1111ExtraSingleImageRequest, size: tuple[int, int]):
    """A1111's extras resize: to the size with the upscaler's filter (resize_mode 1 with crop: fill, then crop)."""
    from PIL import Image, ImageOps

    resample = getattr(Image.Resampling, PIXEL_UPSCALERS[body.upscaler_1])
    image = Image.fromarray(picture)
    if body.resize_mode == 1 and body.upscaling_crop:
        image = ImageOps.fit(image, size, method=resample)
    else:
        image = image.resize(size, resample=resample)
    return np.asarray(image)


@router.get("/progress", summary="AUTOMATIC1111: progress of the caller's running job")
async def progress(jobs: Jobs, owner: Owner):
    """Maps onto the caller's most recently started job (see /jobs); sync txt2img/img2img calls have none."""
    job_id = await jobs.running_job_of(owner)
    record = await jobs.find(job_id, owner) if job_id else None
    live = await jobs.live_state(record) if record else None
    step = (live or {}).get("progress") or {}
    done, total = step.get("step", 0), step.get("total_steps", 0)
    fraction = done / total if total else 0.0
    eta = None
    if record and done:
        elapsed = time.time() - (record.started_at or record.created_at)
        eta = round(elapsed * (total - done) / done, 2)
    return {
        "progress": round(fraction, 4),
        "eta_relative": eta or 0.0,
        "state": {
            "skipped": False,
            "interrupted": False,
            "job": job_id or "",
            "job_count": 1 if job_id else 0,
            "job_no": 0,
            "sampling_step": done,
            "sampling_steps": total,
        },
        "current_image": (live or {}).get("preview"),  # with preview_every on the job
        "textinfo": None,
    }


@router.post("/interrupt", summary="AUTOMATIC1111: cancel the caller's running job")
async def interrupt(jobs: Jobs, owner: Owner):
    job_id = await jobs.running_job_of(owner)
    if job_id:
        await jobs.cancel(job_id, owner)
    return {"interrupted": job_id}


@router.get("/samplers", summary="AUTOMATIC1111: samplers this server knows")
async def samplers():
    return [{"name": spec.a1111_name, "aliases": [name], "options": {}} for name, spec in SCHEDULERS.items()]


@router.get("/sd-models", summary="AUTOMATIC1111: the served models (override_settings.sd_model_checkpoint)")
async def sd_models(service: Service):
    return [
        {
            "title": model,
            "model_name": model,
            "hash": None,
            "sha256": None,
            "filename": model,
            "config": None,
            "family": service.models.family(model),
        }
        for model in service.models.ids
    ]


@router.get("/loras", summary="AUTOMATIC1111: LoRA adapters (<lora:name:scale> in the prompt)")
async def loras(service: Service):
    return [
        {"name": entry["name"], "alias": entry["name"], "path": entry.get("path"), "metadata": {}}
        for entry in service.models.adapters.describe()
    ]


@router.get("/options", summary="AUTOMATIC1111: the settings tools read")
async def options(service: Service):
    return {"sd_model_checkpoint": service.model, "samples_format": "png"}


async def _result(images: list[ImageResult], body: A1111Txt2ImgRequest, model: str) -> A1111GenerationResult:
    encoded = await encode_results(images, "png", 90, model)
    first = images[0].params
    info = {
        "prompt": first.prompt,
        "all_prompts": [i.params.prompt for i in images],
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [i.params.negative_prompt for i in images],
        "seed": first.seed,
        "all_seeds": [i.seed for i in images],
        "subseed": -1,
        "all_subseeds": [-1] * len(images),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": a1111_name(first.scheduler),
        "cfg_scale": first.guidance_scale,
        "steps": first.num_inference_steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "denoising_strength": first.strength,
        "sd_model_name": first.model or model,
        "sd_model_hash": None,
        "restore_faces": False,
        "extra_generation_params": _extra_generation_params(first),
        "index_of_first_image": 0,
        "infotexts": [parameters_text(i.params, model) for i in images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": first.inpaint is not None,
    }
    parameters = body.model_dump(exclude={"init_images"})
    return A1111GenerationResult(images=[b64(data) for data in encoded], parameters=parameters, info=json.dumps(info))


def _extra_generation_params(params) -> dict:
    """What A1111's infotext adds for hires fix, inpainting and ControlNet units."""
    extra: dict = {}
    if params.hires is not None:
        hires = params.hires
        width, height = hires.target_size(params.width, params.height)
        extra.update(
            {
                "Hires upscale": hires.scale if hires.width is None and hires.height is None else None,
                "Hires resize": f"{width}x{height}",
                "Hires upscaler": hires.upscaler,
                "Hires steps": hires.steps,
                "Denoising strength": hires.denoising_strength,
            }
        )
        if hires.prompt:
            extra["Hires prompt"] = hires.prompt
    if params.inpaint is not None:
        extra.update(
            {
                "Mask blur": params.inpaint.mask_blur,
                "Inpaint area": "Only masked" if params.inpaint.only_masked else "Whole picture",
            }
        )
    extra.update({f"ControlNet {i}": controlnet_infotext(unit) for i, unit in enumerate(params.controlnet)})
    return {k: v for k, v in extra.items() if v is not None}


# -- the ControlNet extension's routes --------------------------------------------------------------


@controlnet_router.get("/version", summary="ControlNet extension: its API version")
async def controlnet_version():
    return {"version": 2}


@controlnet_router.get("/model_list", summary="ControlNet extension: the ControlNets units may name (`model`)")
async def controlnet_model_list(service: Service):
    """Every model's ControlNets (GET /controlnets says which model serves which)."""
    names = sorted({entry["name"] for entries in service.models.controlnets.values() for entry in entries})
    return {"model_list": names}


@controlnet_router.get("/module_list", summary="ControlNet extension: the preprocessors units may name (`module`)")
async def controlnet_module_list(alias_names: bool = False):
    """The preprocessors that run here without weights (depth, pose and line-art models are not configured)."""
    return {"module_list": list(A1111_MODULE_NAMES), "module_detail": MODULE_DETAIL}


@controlnet_router.post("/detect", summary="ControlNet extension: run a preprocessor on images")
async def controlnet_detect(body: A1111DetectRequest, service: Service):
    """Each image's map, made at `controlnet_processor_res` on its short side, as base64 PNGs."""
    module = body.preprocessor()
    threshold_a, threshold_b = body.thresholds()
    limits = service.published_limits
    if not body.images():
        raise ApiError.invalid("controlnet_input_images", "send at least one image (base64)")

    def detect(image: str, field: str) -> str:
        picture = decode_picture(image, limits, field)
        if body.controlnet_processor_res > 0:
            picture = at_resolution(picture, min(body.controlnet_processor_res, 2048))
        return b64(encode_image(preprocess(np.asarray(picture), module, threshold_a, threshold_b), "png"))

    images = [await asyncio.to_thread(detect, image, field) for image, field in body.images()]
    return {"images": images, "info": "Success"}
