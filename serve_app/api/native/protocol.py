"""Request and response models of the native API (/generate, /img2img, /generate/prompts).

Every model here is built on the shared record `ImageParams` (its fields and bounds are not
repeated) and turns into it with `image_params()`. The deployment's own, usually tighter, limits
are applied by `service.generation.check_limits`, so a config change never needs a code change.
Torch- and FastAPI-free: the Python client reads its responses with these same models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ...pipeline.params import SEED_MAX, ImageParams, Prompt, seed_at
from ...service.requests import EditFields, ImageRequest, OutputOptions, TextToImageRequest


class GenerateRequest(TextToImageRequest, OutputOptions):
    response_format: Literal["image", "json", "zip"] | None = Field(
        None,
        description="image: the encoded bytes (one image); json: base64 images with metadata; zip: images and "
        "metadata.json. Default: image for one image, json for several (or what the Accept header asks for).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dawn, oil painting", "seed": 42},
                {
                    "prompt": "a red fox in snow",
                    "negative_prompt": "blurry",
                    "num_inference_steps": 20,
                    "guidance_scale": 7.0,
                    "scheduler": "euler_a",
                    "num_images": 2,
                    "response_format": "json",
                },
            ]
        },
    )


class Img2ImgFields(ImageRequest, EditFields, OutputOptions):
    """/img2img's fields but the init image and the mask, whose types depend on the content type."""

    response_format: Literal["image", "json", "zip"] | None = GenerateRequest.model_fields["response_format"]

    def image_params(self) -> ImageParams:
        """The shared record, with `inpaint` from the flat fields when a mask (or outpainting) is sent."""
        has_mask = getattr(self, "mask", None) is not None
        inpaint = self.inpaint_params(has_mask, outpaint=self.outpaint is not None)
        return super().image_params().model_copy(update={"inpaint": inpaint})


class Img2ImgRequest(Img2ImgFields):
    """/img2img as JSON: the init image as base64 (or a data: URL)."""

    init_image: str = Field(
        ..., min_length=1, description="the starting image: base64 (PNG, JPEG or WebP), or a data: URL"
    )
    mask: str | None = Field(
        None,
        min_length=1,
        description="inpainting: the area to repaint, white on black, the image's size (base64 or a data: URL; "
        "a PNG with transparency is read by its alpha: opaque = repaint)",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "the same scene at night", "init_image": "<base64 PNG>", "strength": 0.6, "seed": 1},
                {"prompt": "a red door", "init_image": "<base64 PNG>", "mask": "<base64 PNG>", "mask_blur": 8},
                {"prompt": "a wider beach", "init_image": "<base64 PNG>", "outpaint": {"left": 64, "right": 64}},
            ]
        }
    )


class _SharedFields(TextToImageRequest):
    """The batch-wide fields: every ImageRequest field, the prompt aside, optional."""

    prompt: Prompt | None = Field(None, exclude=True)
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="with 'prompts': entry i gets seed + i x num_images (distinct seeds)"
    )


class MultiPromptRequest(_SharedFields, OutputOptions):
    """Many prompts in one request: `prompts` sharing the other fields, or full `requests` entries."""

    prompts: list[Prompt] | None = Field(None, min_length=1, description="one entry per prompt, shared parameters")
    requests: list[TextToImageRequest] | None = Field(
        None, min_length=1, description="full entries; fields they leave out come from the shared ones"
    )
    response_format: Literal["json", "zip"] | None = Field(
        None, description="json (default) or zip (also chosen by Accept: application/zip)"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompts": ["a cat", "a dog", "a bird"], "seed": 7},
                {
                    "requests": [{"prompt": "a cat", "seed": 1}, {"prompt": "a dog", "num_images": 2}],
                    "num_inference_steps": 4,
                },
            ]
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_not_given(cls, data):
        """null, at the top or in an entry, means "not given": the shared value (or the default) applies."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
            if isinstance(data.get("requests"), list):
                data["requests"] = [_without_nulls(e) if isinstance(e, dict) else e for e in data["requests"]]
        return data

    @field_validator("prompts")
    @classmethod
    def _prompts_are_not_blank(cls, prompts: list[str] | None) -> list[str] | None:
        for index, prompt in enumerate(prompts or []):
            if not prompt.strip():
                raise ValueError(f"entry {index} must not be empty")
        return prompts

    @model_validator(mode="after")
    def _one_list(self) -> MultiPromptRequest:
        if (self.prompts is None) == (self.requests is None):
            raise ValueError("give exactly one of 'prompts' (a list of strings) or 'requests' (a list of objects)")
        return self

    @property
    def list_field(self) -> str:
        return "prompts" if self.prompts is not None else "requests"

    def entries(self) -> list[ImageRequest]:
        """Every entry as a complete request: its own fields over the shared ones."""
        shared = self.model_dump(
            exclude_unset=True, exclude=set(OutputOptions.model_fields) | {"prompts", "requests", "response_format"}
        )
        if self.requests is not None:
            return [
                TextToImageRequest.model_validate({**shared, **entry.model_dump(exclude_unset=True)})
                for entry in self.requests
            ]
        per_prompt = shared.get("num_images", 1)
        entries = []
        for index, prompt in enumerate(self.prompts):
            entry = {**shared, "prompt": prompt}
            if "seed" in shared:
                entry["seed"] = seed_at(shared["seed"], index * per_prompt)
            entries.append(TextToImageRequest.model_validate(entry))
        return entries


def _without_nulls(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


# -- responses ----------------------------------------------------------------------------------


class ImageData(BaseModel):
    b64: str = Field(..., description="the encoded image, base64")
    seed: int
    media_type: str
    batch_size: int = Field(..., description="images in the largest model call that made this one")


class GenerationMetadata(ImageParams):
    """How a request's images were made: the parameters as run (defaults filled; `seed` is the first
    image's) and the facts of the run."""

    # A response model: a client must keep reading it when a newer server adds fields.
    model_config = ConfigDict(extra="ignore")

    seeds: list[int]
    model: str
    batch_size: int = Field(..., description="largest model call among this request's images")
    generation_time_s: float = Field(..., description="wall time of the (slowest) image's generation")
    request_id: str
    warnings: list[str] = Field(default_factory=list)


class GenerateResponse(BaseModel):
    images: list[ImageData]
    metadata: GenerationMetadata


class MultiPromptResponse(BaseModel):
    results: list[GenerateResponse]
    request_id: str
