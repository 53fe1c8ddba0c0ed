"""Request and response models of the native API (/generate, /generate/batch, /img2img).

Hard bounds live in the field definitions (they appear in /openapi.json); the
deployment's own, usually tighter, limits are applied by `api.jobs.check_limits`
so that a config change never needs a code change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..pipeline.jobs import SEED_MAX
from ..pipeline.schedulers import SCHEDULER_NAMES

SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]

OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["image", "json", "zip"]


class ImageParams(BaseModel):
    """What to draw: the parameters every native endpoint shares."""

    model_config = ConfigDict(extra="forbid")

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
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="random if left out; image i of a request gets seed + i"
    )
    scheduler: SchedulerName = Field("default", description="sampler; 'default' is the model's own")
    num_images: int = Field(
        1, ge=1, le=64, description="images for this prompt, each with its own seed, batched together"
    )


class OutputOptions(BaseModel):
    output_format: OutputFormat = Field(
        "png", description="png embeds the generation parameters; jpeg/webp are smaller"
    )
    quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality")


class GenerateRequest(ImageParams, OutputOptions):
    response_format: ResponseFormat | None = Field(
        None,
        description="image: the encoded bytes (one image); json: base64 images with metadata; zip: images and "
        "metadata.json. Default: image for one image, json for several (or what the Accept header asks for).",
    )

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
                    "scheduler": "euler_a",
                    "num_images": 2,
                    "response_format": "json",
                },
            ]
        },
    )


class Img2ImgRequest(GenerateRequest):
    init_image: str = Field(..., description="the starting image: base64 (PNG, JPEG or WebP), or a data: URL")
    strength: float | None = Field(
        None, gt=0, le=1, description="how far to move from the init image (1 = ignore it); default: 0.75"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "the same scene at night", "init_image": "<base64 PNG>", "strength": 0.6, "seed": 1}
            ]
        },
    )


class SharedParams(BaseModel):
    """Batch fields that apply to every entry that leaves them out."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str | None = None
    width: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    height: int | None = Field(None, ge=8, le=4096, multiple_of=8)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="with 'prompts': entry i gets seed + i x num_images")
    scheduler: SchedulerName | None = None
    num_images: int | None = Field(None, ge=1, le=64)


class BatchItem(SharedParams):
    prompt: str = Field(..., min_length=1)


class BatchRequest(SharedParams, OutputOptions):
    prompts: list[str] | None = Field(None, min_length=1, description="one entry per prompt, shared parameters")
    requests: list[BatchItem] | None = Field(None, min_length=1, description="full entries; unset fields are shared")
    response_format: Literal["json", "zip"] | None = Field(
        None, description="json (default) or zip (also chosen by Accept: application/zip)"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompts": ["a cat", "a dog", "a bird"], "seed": 7, "width": 512, "height": 512},
                {
                    "requests": [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "num_images": 2}],
                    "num_inference_steps": 4,
                },
            ]
        },
    )

    @field_validator("prompts")
    @classmethod
    def _prompts_are_text(cls, prompts: list[str] | None) -> list[str] | None:
        # A top-level str field rejects lone surrogates ("\ud800"); strings inside a list are not checked.
        for index, prompt in enumerate(prompts or []):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"entry {index} is not valid Unicode text") from None
        return prompts

    @model_validator(mode="after")
    def _one_list(self) -> BatchRequest:
        if (self.prompts is None) == (self.requests is None):
            raise ValueError("give exactly one of 'prompts' (a list of strings) or 'requests' (a list of objects)")
        if self.prompts is not None and not all(p.strip() for p in self.prompts):
            raise ValueError("'prompts' entries must not be empty")
        return self

    def items(self) -> list[ImageParams]:
        """Every entry as complete parameters: its own fields over the shared ones (null = not given)."""
        shared = {k: getattr(self, k) for k in SharedParams.model_fields if getattr(self, k) is not None}
        if self.requests is not None:
            return [ImageParams.model_validate({**shared, **r.model_dump(exclude_none=True)}) for r in self.requests]
        per_prompt = shared.get("num_images") or 1
        items = []
        for index, prompt in enumerate(self.prompts):
            entry = {**shared, "prompt": prompt}
            if "seed" in shared:  # distinct, reproducible seeds across the whole batch
                entry["seed"] = (shared["seed"] + index * per_prompt) % (SEED_MAX + 1)
            items.append(ImageParams.model_validate(entry))
        return items


class ImageData(BaseModel):
    b64: str = Field(..., description="the encoded image, base64")
    seed: int
    media_type: str
    batch_size: int = Field(..., description="images in the pipeline call that made this one")


class GenerationMetadata(BaseModel):
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    strength: float | None = None
    seeds: list[int]
    model: str
    batch_size: int = Field(..., description="largest pipeline call among this request's images")
    generation_time_s: float = Field(..., description="wall time of the (slowest) pipeline call")
    request_id: str
    warnings: list[str] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    images: list[ImageData]
    metadata: GenerationMetadata


class BatchResponse(BaseModel):
    results: list[GenerateResponse]
    request_id: str
