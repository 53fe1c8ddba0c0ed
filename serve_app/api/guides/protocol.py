"""The request shapes of the tutorials people copy, so their clients and curl lines work unchanged.

* The SD 3.5 Large Turbo guide: `GET /generate?prompt=...` answers a PNG; `POST /generate_images`
  with `{"prompts": [...], "chunk_size": 4}` answers a zip of PNGs.
* The GTX 1060 guide's `GET /health`; the job-queue guides' `GET /status/{job_id}` and
  `GET /download/{job_id}` (over this server's jobs API).

Their parameter names map onto `ImageParams`; anything a guide's server would have taken that changes
the picture either works here or is refused with a 422 naming it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ...pipeline.params import GuidanceScale, ImageParams, ImageSide, Prompt, SchedulerName, Seed, Steps, seed_at

# Our field names as the guides' callers know them, for error messages.
FIELD_NAMES = {"num_inference_steps": "steps"}


class _GuideFields(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    negative_prompt: str = ""
    num_inference_steps: Steps | None = Field(None, alias="steps", description="denoising steps (also `steps`)")
    guidance_scale: GuidanceScale | None = None
    width: ImageSide | None = None
    height: ImageSide | None = None
    seed: Seed | None = None
    scheduler: SchedulerName = "default"
    model: str | None = None

    def image_params(self, prompt: str, index: int = 0) -> ImageParams:
        """The parameters of image `index` (with a seed, image i gets seed + i: distinct images)."""
        fields = self.model_dump(include=set(_GuideFields.model_fields), exclude_none=True)
        if self.seed is not None:
            fields["seed"] = seed_at(self.seed, index)
        return ImageParams(**{**fields, "prompt": prompt})


class GenerateQuery(_GuideFields):
    """GET /generate's query string."""

    prompt: Prompt

    def params(self) -> ImageParams:
        return self.image_params(self.prompt)


class GenerateImagesRequest(_GuideFields):
    """POST /generate_images: several prompts, one image each, answered as one zip."""

    prompts: list[Prompt] = Field(..., min_length=1, description="one image per prompt")
    chunk_size: int = Field(
        4,
        ge=1,
        le=64,
        description="accepted for the guide's clients; this server batches every image with all others in flight, "
        "so the chunking does not change the pictures or how they are batched",
    )
