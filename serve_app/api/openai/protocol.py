"""OpenAI Images API request and response models, plus this server's extensions.

Fields OpenAI defines that mean nothing here (quality, style, user, ...) are accepted and
ignored (`extra="ignore"`: new OpenAI fields must not break old servers). `seed`,
`negative_prompt`, `num_inference_steps`, `guidance_scale`, `true_cfg_scale` (FLUX.1), `scheduler` (and `strength`,
`mask_blur`, `fill`, `paste_back` for edits and variations) are extensions, sent with the openai package's
`extra_body`. `stream` with `partial_images` (0-3) answers as OpenAI's server-sent events, the partial images
from the engine's latent previews.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ...pipeline.params import (
    FillMode,
    GuidanceScale,
    ImageParams,
    InpaintParams,
    MaskBlur,
    Prompt,
    SchedulerName,
    Seed,
    Steps,
    Strength,
    TrueCfgScale,
)
from ..errors import ApiError

_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Model names OpenAI's own clients send by default: they get this server's default model.
_OPENAI_MODELS = ("dall-e-", "gpt-image-")

# Our field names as OpenAI callers know them, for error messages.
FIELD_NAMES = {"width": "size", "height": "size", "num_images": "n"}


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"prompt": "a watercolor fox", "n": 2, "size": "256x256"}]}
    )

    prompt: Prompt
    model: str | None = Field(
        None,
        description="one of GET /v1/models; unset, or OpenAI's own names (dall-e-*, gpt-image-*): the default model",
    )
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 8) or 'auto' (the model's default)")
    response_format: Literal["b64_json", "url"] | None = Field(
        None,
        description="b64_json (the default): the images in the answer; url: links to them, kept as a job of the "
        "caller's (this server's /jobs/{id}/images/{n}, or presigned object-store URLs with jobs.presign_s)",
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality")
    stream: bool = Field(False, description="server-sent events: partial images, then each image when completed")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="with stream: latent previews sent while the image is made (0-3)"
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; transparent is refused (the models make opaque images)"
    )
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Extensions
    seed: Seed | None = None
    negative_prompt: str = ""
    num_inference_steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    true_cfg_scale: TrueCfgScale | None = None
    scheduler: SchedulerName = "default"

    def image_params(self, strength: float | None = None) -> ImageParams:
        if self.background == "transparent":
            raise ApiError.invalid("background", "transparent backgrounds are not offered: the images are opaque")
        if self.stream and self.response_format == "url":
            raise ApiError.invalid("response_format", "a stream carries the images themselves: use b64_json")
        width, height = self._size()
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale,
            scheduler=self.scheduler,
            seed=self.seed,
            strength=strength,
            model=None if self.model is None or self.model.startswith(_OPENAI_MODELS) else self.model,
        )

    def _size(self) -> tuple[int | None, int | None]:
        if self.size in (None, "auto"):
            return None, None
        match = _SIZE.match(self.size)
        if not match:
            raise ApiError.invalid("size", f"must look like '256x256' or be 'auto' (got {self.size!r})")
        width, height = int(match[1]), int(match[2])
        if width % 8 or height % 8:
            raise ApiError.invalid("size", f"width and height must be multiples of 8 (got {self.size})")
        return width, height


class MaskExtensions(BaseModel):
    """Extensions of edits with a mask (OpenAI's own edits keep the unmasked pixels and blend nothing)."""

    mask_blur: MaskBlur = Field(0, description="extension, with mask: blur radius of its edge in pixels")
    fill: FillMode = Field("original", description="extension, with mask: what the area to edit starts from")
    paste_back: bool = Field(True, description="extension, with mask: keep every other pixel exactly the input's")

    def inpaint_params(self) -> InpaintParams:
        return InpaintParams(mask_blur=self.mask_blur, fill=self.fill, paste_back=self.paste_back)


class ImageEditFields(ImageGenerationRequest, MaskExtensions):
    """POST /v1/images/edits (multipart/form-data) without the files: its routes add `image` and `mask` (a PNG the
    image's size whose fully transparent pixels mark the area to edit)."""

    strength: Strength | None = Field(None, description="extension: how far to move from the image (default 0.75)")

    def image_params(self, has_mask: bool = False) -> ImageParams:  # type: ignore[override]
        params = super().image_params(strength=self.strength)
        return params.model_copy(update={"inpaint": self.inpaint_params() if has_mask else None})


class ImageVariationFields(BaseModel):
    """POST /v1/images/variations (multipart/form-data) without the file: image to image of `image` with no prompt
    of the caller's (extension `prompt`; else the prompt a PNG of this server's carries in its parameters; else
    none), at `strength` (extension, default 0.6)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="'WIDTHxHEIGHT' (multiples of 8); unset: the image's own")
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    # Extensions
    prompt: str | None = Field(None, description="extension: what the variations show")
    strength: Strength = Field(0.6, description="extension: how far a variation moves from the image")
    seed: Seed | None = None
    negative_prompt: str = ""
    num_inference_steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    scheduler: SchedulerName = "default"

    def generation_request(self, prompt: str) -> ImageGenerationRequest:
        """The same fields as an image request of `prompt` (what the routes answer with)."""
        fields = self.model_dump(exclude={"prompt", "strength"})
        return ImageGenerationRequest.model_validate({**fields, "prompt": prompt})


class ImageObject(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImageLink(BaseModel):
    """An image answered as a link (`response_format: "url"`); `job_id` and `expires_at` are extensions."""

    url: str
    revised_prompt: str | None = None
    seed: int
    job_id: str = Field(..., description="the job holding the image: GET /jobs/{id}, POST /jobs/{id}/refine")
    expires_at: float | None = Field(None, description="a presigned URL works until then; else kept as a job is")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject | ImageLink]
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
