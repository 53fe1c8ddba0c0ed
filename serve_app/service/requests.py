"""The generation request every API family builds on: one prompt's parameters, how many images, how to
encode them. The native API takes these as they are; the JobManager's jobs and bulk rows are checked by
them, so every bound and refusal is the same everywhere.

Torch- and FastAPI-free: the Python client reads responses with models built on these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..pipeline.fairness import Priority
from ..pipeline.params import ImageCount, ImageParams

OutputFormat = Literal["png", "jpeg", "webp"]


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_format: OutputFormat = Field(
        "png", description="png embeds the generation parameters; jpeg/webp are smaller"
    )
    quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality")


class ImageRequest(ImageParams):
    """One prompt's parameters, how many images of it to make, and how urgently."""

    num_images: ImageCount = 1
    priority: Priority | None = Field(
        None,
        description="high, normal or low: which of the caller's own waiting images go first (other callers keep "
        "their fair share); default normal (bulk runs: low); above the caller's max_priority: 403",
    )

    def image_params(self) -> ImageParams:
        return ImageParams.model_validate(self.model_dump(include=set(ImageParams.model_fields)))


class TextToImageRequest(ImageRequest):
    @field_validator("strength")
    @classmethod
    def _no_strength(cls, strength: float | None) -> None:
        if strength is not None:
            raise ValueError("applies to image-to-image only (POST /img2img)")
        return None
