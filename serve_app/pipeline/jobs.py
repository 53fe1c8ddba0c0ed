"""The contract between the HTTP side and the pipeline: one job in, one image out.

Torch-free on purpose: the ingress builds `GenerationJob`s and reads
`GeneratedImage`s on CPU-only nodes without importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class GenerationJob:
    """One image to make. Unset parameters take the model's defaults."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str = "default"
    # Image-to-image: an RGB uint8 array (height, width, 3) already at the output size.
    init_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    strength: float | None = None
    request_id: str = ""
    # Wall-clock time (time.time()) the ingress handed the job on: queue wait is measured from here.
    submitted_at: float | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return "img2img" if self.init_image is not None else "txt2img"

    def with_defaults(self, defaults: GenerationDefaults) -> GenerationJob:
        """The job with every unset parameter filled from `defaults`."""
        if self.init_image is not None:
            height, width = self.init_image.shape[:2]
        else:
            width = self.width if self.width is not None else defaults.width
            height = self.height if self.height is not None else defaults.height
        return dataclasses.replace(
            self,
            width=width,
            height=height,
            num_inference_steps=_first_set(self.num_inference_steps, defaults.num_inference_steps),
            guidance_scale=_first_set(self.guidance_scale, defaults.guidance_scale),
            strength=_first_set(self.strength, defaults.strength) if self.init_image is not None else None,
        )


@dataclass(frozen=True)
class GenerationDefaults:
    """What a job gets for the parameters it leaves out."""

    width: int = 512
    height: int = 512
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    strength: float = 0.75


def _first_set(value, default):
    return default if value is None else value


def batch_key(job: GenerationJob, split_empty_negative: bool = False) -> Hashable:
    """Jobs with equal keys can share one pipeline call.

    Everything that is a scalar argument of the diffusers call is in the key;
    prompt, negative prompt and seed are per image and stay out of it.
    `split_empty_negative`: keep empty and non-empty negative prompts apart, for
    models (SDXL) that encode an empty one as zeros instead of through the text encoders.
    `job` must already have its defaults filled in.
    """
    return (
        job.kind,
        job.width,
        job.height,
        job.num_inference_steps,
        float(job.guidance_scale),
        job.scheduler,
        job.strength,
        split_empty_negative and not job.negative_prompt,
    )


def group_by_key(jobs: list[GenerationJob], split_empty_negative: bool = False) -> list[list[int]]:
    """Indices of `jobs` grouped by `batch_key`, groups in order of first arrival."""
    groups: dict[Hashable, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(batch_key(job, split_empty_negative), []).append(index)
    return list(groups.values())


@dataclass
class GeneratedImage:
    """An image and how it was made, as the pipeline actually ran it."""

    pixels: np.ndarray  # uint8, (height, width, 3)
    seed: int
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    strength: float | None
    batch_size: int  # images in the pipeline call that made this one
    generation_time_s: float  # wall time of that pipeline call
    warnings: list[str] = field(default_factory=list)
    replica: str = ""
