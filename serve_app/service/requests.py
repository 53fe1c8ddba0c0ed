"""The generation request every API family builds on: one prompt's parameters, how many images, how to
encode them. The native API takes these as they are; the JobManager's jobs and bulk rows are checked by
them, so every bound and refusal is the same everywhere.

Torch- and FastAPI-free: the Python client reads responses with models built on these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..pipeline.fairness import Priority
from ..pipeline.params import (
    MAX_CONTROLNET_UNITS,
    ControlNetUnit,
    FillMode,
    ImageCount,
    ImageParams,
    InpaintParams,
    MaskBlur,
)
from .errors import ApiError

OutputFormat = Literal["png", "jpeg", "webp"]


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_format: OutputFormat = Field(
        "png", description="png embeds the generation parameters; jpeg/webp are smaller"
    )
    quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality")


class ControlNetInput(ControlNetUnit):
    """A ControlNet unit of a request: which ControlNet, how, and its control image."""

    image: str = Field(
        ...,
        min_length=1,
        description="the control image (with `preprocess`: the picture it reads): base64 PNG, JPEG or WebP, or a "
        "data: URL; fitted to the output size (`resize_mode`); with no width and height given it sets the size",
    )


class ImageRequest(ImageParams):
    """One prompt's parameters, how many images of it to make, and how urgently."""

    controlnet: tuple[ControlNetInput, ...] = Field(
        (),
        max_length=MAX_CONTROLNET_UNITS,
        description="ControlNets steering the image's structure (GET /controlnets), each with its control image; "
        "several: multi-ControlNet, their residuals summed in this order",
    )
    num_images: ImageCount = 1
    priority: Priority | None = Field(
        None,
        description="high, normal or low: which of the caller's own waiting images go first (other callers keep "
        "their fair share); default normal (bulk runs: low); above the caller's max_priority: 403",
    )

    def image_params(self) -> ImageParams:
        """The shared record (the control images travel beside it: `control_images`)."""
        fields = self.model_dump(include=set(ImageParams.model_fields))
        fields["controlnet"] = [{k: v for k, v in unit.items() if k != "image"} for unit in fields["controlnet"]]
        return ImageParams.model_validate(fields)

    def control_images(self) -> list[str]:
        """Each ControlNet unit's image, as sent (base64)."""
        return [unit.image for unit in self.controlnet]


class TextToImageRequest(ImageRequest):
    @field_validator("strength", "outpaint")
    @classmethod
    def _no_strength(cls, value: object) -> None:
        if value is not None:
            raise ValueError("applies to image-to-image only (POST /img2img)")
        return None

    @field_validator("inpaint")
    @classmethod
    def _no_inpaint(cls, inpaint: InpaintParams | None) -> None:
        if inpaint is not None:
            raise ValueError("applies to image-to-image with a mask only (POST /img2img with mask)")
        return None


class EditFields(BaseModel):
    """How an image-to-image request with a `mask` repaints it, as flat fields (a multipart form has no nesting);
    `inpaint_params` turns them into the shared record's `inpaint`."""

    mask_blur: MaskBlur | None = Field(None, description="with mask: blur radius of its edge in pixels (default 4)")
    invert_mask: bool | None = Field(None, description="with mask: repaint its black instead of its white")
    fill: FillMode | None = Field(
        None, description="with mask: what the masked area starts from: original (default), noise, blurred"
    )
    paste_back: bool | None = Field(
        None, description="with mask: keep every pixel outside the (blurred) mask exactly the input's (default true)"
    )
    only_masked: bool | None = Field(
        None, description="with mask: repaint only its region, cropped and at full resolution, then paste it back"
    )
    only_masked_padding: int | None = Field(None, ge=0, le=1024, description="with only_masked: pixels around it")

    def inpaint_params(self, has_mask: bool, outpaint: bool = False) -> InpaintParams | None:
        """The `inpaint` record of a request with a mask (or outpainting, which makes one); without: None, and
        any of these fields is a 422 naming it."""
        given = {name: getattr(self, name) for name in EditFields.model_fields if getattr(self, name) is not None}
        if has_mask or outpaint:
            return InpaintParams(**given)
        if given:
            field = next(iter(given))
            raise ApiError.invalid(field, "applies with a mask: send one (white = repaint)")
        return None

    @field_validator("inpaint", check_fields=False)
    @classmethod
    def _flat_fields_only(cls, inpaint: InpaintParams | None) -> None:
        if inpaint is not None:
            raise ValueError("send the flat fields mask_blur, invert_mask, fill, paste_back, only_masked instead")
        return None
