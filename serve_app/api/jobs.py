"""From validated request parameters to GenerationJobs: deployment limits, seeds, request ids.

Every endpoint family (native, OpenAI, AUTOMATIC1111) converts its request to
`ImageParams` and comes through here, so limits and seeding behave the same
everywhere. `names` maps our field names to the endpoint's own, so a 422 names
the field the caller actually sent (`size`, `steps`, `cfg_scale`, ...).
"""

from __future__ import annotations

import secrets

import numpy as np
from pydantic import ValidationError

from ..config import RequestLimits
from ..pipeline.jobs import SEED_MAX, GenerationJob
from .errors import ApiError
from .protocol import ImageParams


def new_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def check_limits(params: ImageParams, limits: RequestLimits, names: dict[str, str] | None = None) -> None:
    """Apply the deployment's limits; 422 names the field and the allowed range."""
    names = names or {}

    def invalid(field: str, problem: str) -> ApiError:
        return ApiError.invalid(names.get(field, field), problem)

    for field, value, upper in (
        ("width", params.width, limits.max_width),
        ("height", params.height, limits.max_height),
    ):
        if value is not None and not limits.min_size <= value <= upper:
            raise invalid(field, f"must be between {limits.min_size} and {upper} (got {value})")
    if params.width and params.height and params.width * params.height > limits.max_pixels:
        pixels = params.width * params.height
        raise invalid("width", f"width x height must be at most {limits.max_pixels} pixels (got {pixels})")
    if params.num_inference_steps is not None and params.num_inference_steps > limits.max_steps:
        raise invalid(
            "num_inference_steps", f"must be between 1 and {limits.max_steps} (got {params.num_inference_steps})"
        )
    if params.guidance_scale is not None and params.guidance_scale > limits.max_guidance_scale:
        raise invalid(
            "guidance_scale", f"must be between 0 and {limits.max_guidance_scale} (got {params.guidance_scale})"
        )
    if params.num_images > limits.max_num_images:
        raise invalid("num_images", f"must be between 1 and {limits.max_num_images} (got {params.num_images})")
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(params, field))
        if length > limits.max_prompt_chars:
            raise invalid(field, f"must be at most {limits.max_prompt_chars} characters (got {length})")


def build_jobs(
    params: ImageParams,
    limits: RequestLimits,
    request_id: str,
    *,
    init_image: np.ndarray | None = None,
    strength: float | None = None,
    names: dict[str, str] | None = None,
) -> list[GenerationJob]:
    """One job per image; image i gets seed + i (the base seed is drawn when left out)."""
    check_limits(params, limits, names)
    base_seed = params.seed if params.seed is not None else new_seed()
    return [
        GenerationJob(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            seed=(base_seed + i) % (SEED_MAX + 1),
            width=params.width,
            height=params.height,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            scheduler=params.scheduler,
            init_image=init_image,
            strength=strength,
            request_id=request_id,
        )
        for i in range(params.num_images)
    ]


def params_from(fields: dict, names: dict[str, str] | None = None) -> ImageParams:
    """ImageParams from a compatible API's fields; a 422 names the field as that API calls it."""
    names = names or {}
    try:
        return ImageParams.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error.get("loc") else "body"
        raise ApiError.invalid(names.get(field, field), error["msg"].removeprefix("Value error, ")) from None
