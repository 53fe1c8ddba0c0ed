"""The contract between the serving layer and the engines: one task in, one image (or an error) out.

Torch-free on purpose: the ingress builds `ImageTask`s and reads
`ImageResult`s on CPU-only nodes without importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidTaskError
from .fairness import DEFAULT_PRIORITY, SHARED_TENANT, Claim, Priority
from .params import GenerationDefaults, ImageParams, InpaintParams


@dataclass(frozen=True)
class ImageTask:
    """One image to make: its parameters (seed set), an init image for image-to-image, who asked."""

    params: ImageParams
    # Image-to-image: an RGB uint8 array (height, width, 3) already at the output size.
    init_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Inpainting: a uint8 array (height, width) the init image's size; >= 128 (white) is repainted. Inverted and
    # outpainting's border added already; `params.inpaint` says how (blur, fill, paste back, only masked).
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    # ControlNet: one RGB uint8 array (height, width, 3) per unit of `params.controlnet`, in order: the control map
    # already preprocessed and at the output size.
    control_images: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    # Engine-internal: latents an image-to-image start takes instead of an init image (hires fix's second phase
    # from upscaled latents). A torch tensor; typed loosely to keep this module torch-free.
    init_latents: object | None = field(default=None, repr=False, compare=False)
    request_id: str = ""
    # Wall-clock time (time.time()) the ingress handed the task on: queue wait is measured from here.
    submitted_at: float | None = field(default=None, compare=False)
    # Wall-clock time by which its caller needs the image; a task that cannot make it is refused at admission.
    deadline: float | None = field(default=None, compare=False)
    # A small preview of the latents with the progress every this many steps (0: none; step engine only).
    preview_every: int = field(default=0, compare=False)
    # Who asked (a hashed id, never a key), at what priority, and that tenant's weight: the engines admit
    # waiting tasks by weighted fair share across tenants, then priority, then arrival (`fairness.py`).
    tenant: str = field(default=SHARED_TENANT, compare=False)
    priority: Priority = field(default=DEFAULT_PRIORITY, compare=False)
    weight: float = field(default=1.0, compare=False)

    @property
    def kind(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None or self.init_latents is not None else "txt2img"

    @property
    def seed(self) -> int:
        return self.params.seed

    @property
    def denoising_steps(self) -> float:
        """The denoising steps it runs (defaults filled): image-to-image runs only its strength's share."""
        params = self.params
        steps = params.num_inference_steps * (params.strength if self.init_image is not None else 1.0)
        if params.hires is not None:
            steps += params.hires.second_pass(params.num_inference_steps)[1]
        return steps

    @property
    def denoiser_rows(self) -> int:
        """Rows it takes in each denoiser call: two with classifier-free guidance (guidance_scale > 1, or FLUX.1's
        true_cfg_scale > 1), else one. Counted from its parameters, the same way for every tenant."""
        params = self.params
        guided = (params.guidance_scale or 0) > 1 or (params.true_cfg_scale or 0) > 1
        return 2 if guided else 1

    def claim(self) -> Claim:
        """What the fair admission weighs: its tenant, priority, weight and cost (denoiser rows x steps)."""
        steps = self.denoising_steps
        return Claim(self.tenant, self.priority, self.denoiser_rows * steps, self.weight, steps)

    def check_denoises(self) -> None:
        """Refuse image-to-image whose strength x steps leaves no step (diffusers would return the input)."""
        params = self.params
        if self.init_image is not None and int(params.num_inference_steps * params.strength) < 1:
            raise InvalidTaskError(
                f"strength {params.strength} x num_inference_steps {params.num_inference_steps} leaves no "
                "denoising step; raise one of them",
                "strength",
            )

    def with_defaults(self, defaults: GenerationDefaults) -> ImageTask:
        """The task with every unset parameter filled from `defaults` (an init image fixes the size)."""
        init_size = None if self.init_image is None else (self.init_image.shape[1], self.init_image.shape[0])
        params = self.params
        if init_size is None and self.control_images and params.width is None and params.height is None:
            # As diffusers' ControlNet pipelines: an unset size is the control image's.
            height, width = self.control_images[0].shape[:2]
            params = params.model_copy(update={"width": width, "height": height})
        params = params.with_defaults(defaults, init_size)
        if self.mask is not None and params.inpaint is None:
            params = params.model_copy(update={"inpaint": InpaintParams()})
        return dataclasses.replace(self, params=params)


@dataclass
class ImageResult:
    """An image, the parameters it was made with (defaults filled in) and the facts of its making."""

    pixels: np.ndarray  # uint8, (height, width, 3)
    params: ImageParams
    batch_size: int  # images in the largest model call this image took part in
    generation_time_s: float  # wall time from its work starting to the image being ready
    warnings: list[str] = field(default_factory=list)
    replica: str = ""

    @property
    def seed(self) -> int:
        return self.params.seed


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8, rounded as diffusers rounds when it makes PIL images."""
    return (np.nan_to_num(images) * 255).round().clip(0, 255).astype(np.uint8)


def call_key(task: ImageTask, split_empty_negative: bool = False, split_adapters: bool = False) -> Hashable:
    """Tasks with equal keys can share one whole-pipeline call (the request-level engine).

    Everything that is a scalar argument of the diffusers call is in the key;
    prompt, negative prompt and seed are per image and stay out of it.
    `split_empty_negative`: keep empty and non-empty negative prompts apart, for
    models (SDXL) that encode an empty one as zeros instead of through the text encoders.
    LoRA adapters apply per image (`adapters.LoraMixer`); `split_adapters` keeps adapter sets apart anyway.
    `task` must already have its defaults filled in.
    """
    p = task.params
    return (
        task.kind,
        p.width,
        p.height,
        p.num_inference_steps,
        float(p.guidance_scale),
        p.true_cfg_scale,
        p.scheduler,
        p.strength,
        split_empty_negative and not p.negative_prompt,
        p.adapter_key if split_adapters else (),
        p.refiner,
        p.inpaint,
        # "Only masked" crops around each image's own mask: a call of its own.
        id(task) if p.inpaint is not None and p.inpaint.only_masked else None,
        p.hires,
        p.controlnet_key,
    )


def group_by_call_key(
    tasks: list[ImageTask], split_empty_negative: bool = False, split_adapters: bool = False
) -> list[list[int]]:
    """Indices of `tasks` grouped by `call_key`, groups in order of first arrival."""
    groups: dict[Hashable, list[int]] = {}
    for index, task in enumerate(tasks):
        groups.setdefault(call_key(task, split_empty_negative, split_adapters), []).append(index)
    return list(groups.values())
