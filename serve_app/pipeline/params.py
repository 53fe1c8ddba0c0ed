"""One record of an image's parameters, with the bounds of every field written once.

`ImageParams` is what every API family turns its request into, what the engines
read, and what a finished image carries back (with the model's defaults filled
in). Its field types are the `Annotated` aliases below: the protocol models of
each API family, the config's `defaults` and bulk inputs use the same ones, so a
bound changes in one place. The deployment's own, usually tighter, limits are
applied on top by the serving layer (`api.serving.check_limits`).

Torch-free: the ingress validates requests with these on CPU-only nodes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schedulers import SCHEDULER_NAMES

SEED_MAX = 2**32 - 1

Prompt = Annotated[str, Field(min_length=1, description="what to draw")]
NegativePrompt = Annotated[str, Field(description="what to steer away from (ignored when guidance_scale <= 1)")]
ImageSide = Annotated[int, Field(ge=8, le=4096, multiple_of=8, description="pixels, a multiple of 8")]
Steps = Annotated[int, Field(ge=1, le=1000, description="denoising steps")]
GuidanceScale = Annotated[float, Field(ge=0, le=100, description="classifier-free guidance (<= 1: none)")]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="the seed that reproduces the image")]
Strength = Annotated[float, Field(gt=0, le=1, description="how far to move from the init image (1 = ignore it)")]
ImageCount = Annotated[int, Field(ge=1, le=64, description="images of this prompt, image i with seed + i")]
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]


class GenerationDefaults(BaseModel):
    """What an image gets for parameters its request leaves out (config `args.defaults`; unset: the model's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: ImageSide | None = None
    height: ImageSide | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    strength: Strength | None = None

    def over(self, base: GenerationDefaults) -> GenerationDefaults:
        """These defaults, falling back to `base` where unset."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class ImageParams(BaseModel):
    """One image's parameters. Unset (None) ones take the model's defaults (`with_defaults`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: ImageSide | None = None
    height: ImageSide | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: GuidanceScale | None = None
    scheduler: SchedulerName = "default"
    seed: Seed | None = None
    strength: Strength | None = Field(None, description="image-to-image only")

    def with_defaults(self, defaults: GenerationDefaults, init_size: tuple[int, int] | None = None) -> ImageParams:
        """Every parameter set: from this record, else `defaults`. `init_size` (width, height) of an init
        image fixes the size and keeps strength; text-to-image has none."""
        width, height = init_size or (_first_set(self.width, defaults.width), _first_set(self.height, defaults.height))
        return self.model_copy(
            update={
                "width": width,
                "height": height,
                "num_inference_steps": _first_set(self.num_inference_steps, defaults.num_inference_steps),
                "guidance_scale": float(_first_set(self.guidance_scale, defaults.guidance_scale)),
                "strength": _first_set(self.strength, defaults.strength) if init_size else None,
            }
        )


def _first_set(value, default):
    return default if value is None else value
