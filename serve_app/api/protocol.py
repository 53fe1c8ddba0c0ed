"""Request and response models of the native API (`/generate`).

Hard bounds live in the field definitions (they appear in /openapi.json);
the deployment's own, usually tighter, limits are checked by `check_limits`
so that a config change never needs a code change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import RequestLimits
from ..pipeline.jobs import SEED_MAX
from ..pipeline.schedulers import SCHEDULER_NAMES
from .errors import ApiError

SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dawn, oil painting", "seed": 42},
                {
                    "prompt": "a red fox in snow",
                    "negative_prompt": "blurry",
                    "width": 512,
                    "height": 512,
                    "num_inference_steps": 20,
                    "guidance_scale": 7.0,
                    "response_format": "json",
                },
            ]
        },
    )

    prompt: str = Field(..., min_length=1, description="what to draw")
    negative_prompt: str = Field("", description="what to steer away from (ignored when guidance_scale <= 1)")
    width: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="pixels, multiple of 8; default: the model's"
    )
    height: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="pixels, multiple of 8; default: the model's"
    )
    num_inference_steps: int | None = Field(None, ge=1, le=1000, description="denoising steps; default: the model's")
    guidance_scale: float | None = Field(
        None, ge=0, le=100, description="classifier-free guidance; default: the model's"
    )
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="random if left out; reported in X-Seed / metadata")
    scheduler: SchedulerName = Field("default", description="sampler; 'default' is the model's own")
    response_format: Literal["image", "json"] = Field(
        "image", description="image: the encoded image bytes; json: base64 images with generation metadata"
    )


class ImageData(BaseModel):
    b64: str = Field(..., description="the encoded image, base64")
    seed: int
    batch_size: int = Field(..., description="images in the pipeline call that made this one")


class GenerationMetadata(BaseModel):
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    model: str
    batch_size: int = Field(..., description="largest pipeline call among this request's images")
    generation_time_s: float = Field(..., description="wall time of the pipeline call")
    request_id: str
    warnings: list[str] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    images: list[ImageData]
    metadata: GenerationMetadata


def check_limits(request: GenerateRequest, limits: RequestLimits) -> None:
    """Apply the deployment's limits; 422 names the field and the allowed range."""
    for field, value, upper in (
        ("width", request.width, limits.max_width),
        ("height", request.height, limits.max_height),
    ):
        if value is not None and not limits.min_size <= value <= upper:
            raise ApiError.invalid(field, f"must be between {limits.min_size} and {upper} (got {value})")
    if request.width and request.height and request.width * request.height > limits.max_pixels:
        raise ApiError.invalid(
            "width", f"width x height must be at most {limits.max_pixels} pixels (got {request.width * request.height})"
        )
    if request.num_inference_steps is not None and request.num_inference_steps > limits.max_steps:
        raise ApiError.invalid(
            "num_inference_steps", f"must be between 1 and {limits.max_steps} (got {request.num_inference_steps})"
        )
    if request.guidance_scale is not None and request.guidance_scale > limits.max_guidance_scale:
        raise ApiError.invalid(
            "guidance_scale", f"must be between 0 and {limits.max_guidance_scale} (got {request.guidance_scale})"
        )
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(request, field))
        if length > limits.max_prompt_chars:
            raise ApiError.invalid(field, f"must be at most {limits.max_prompt_chars} characters (got {length})")
