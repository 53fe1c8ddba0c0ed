"""One record of an image's parameters, with the bounds of every field written once.

`ImageParams` is what every API family turns its request into, what the engines
read, and what a finished image carries back (with the model's defaults filled
in). Its field types are the `Annotated` aliases below: the protocol models of
each API family, the config's `defaults` and bulk inputs use the same ones, so a
bound changes in one place. The deployment's own, usually tighter, limits are
applied on top by the serving layer (`service.generation.check_limits`).

Torch-free: the ingress validates requests with these on CPU-only nodes.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .schedulers import ALL_SCHEDULER_NAMES

SEED_MAX = 2**32 - 1


def new_seed() -> int:
    """A seed for an image whose request left it out (reported back, so the image can be made again)."""
    return secrets.randbelow(SEED_MAX + 1)


def seed_at(base: int, offset: int) -> int:
    """The seed `offset` places after `base`, wrapping past SEED_MAX: image i of a request gets seed_at(seed, i)."""
    return (base + offset) % (SEED_MAX + 1)


Prompt = Annotated[str, Field(min_length=1, description="what to draw")]
NegativePrompt = Annotated[
    str,
    Field(
        description="what to steer away from (ignored without guidance: guidance_scale <= 1; FLUX.1: true_cfg_scale unset)"
    ),
]
ImageSide = Annotated[int, Field(ge=8, le=4096, multiple_of=8, description="pixels, a multiple of 8")]
Steps = Annotated[int, Field(ge=1, le=1000, description="denoising steps")]
GuidanceScale = Annotated[
    float,
    Field(
        ge=0,
        le=100,
        description="classifier-free guidance (<= 1: none); FLUX.1 [dev]: the guidance embedding's value, "
        "[schnell]: ignored",
    ),
]
TrueCfgScale = Annotated[
    float,
    Field(
        ge=1,
        le=100,
        description="FLUX.1 only: real classifier-free guidance with the negative prompt (an empty one if none is "
        "given) at this scale, as FluxPipeline's true_cfg_scale: a second transformer pass per step; 1: none",
    ),
]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="the seed that reproduces the image")]
Strength = Annotated[float, Field(gt=0, le=1, description="how far to move from the init image (1 = ignore it)")]
ImageCount = Annotated[int, Field(ge=1, le=64, description="images of this prompt, image i with seed + i")]
SchedulerName = Literal[ALL_SCHEDULER_NAMES]  # type: ignore[valid-type]
ModelId = Annotated[
    str,
    Field(
        min_length=1, max_length=200, description="which of the deployment's models (GET /models); unset: its default"
    ),
]
AdapterName = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[\w.+-]+$", description="a LoRA adapter (GET /loras)")
]
LORA_SCALE_MAX = 10.0


class LoraWeight(BaseModel):
    """One LoRA adapter applied to an image, at `scale` (0: not at all, 1: as trained)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AdapterName
    scale: float = Field(1.0, ge=-LORA_SCALE_MAX, le=LORA_SCALE_MAX, description="strength of the adapter")


REFINER_DENOISING_START = 0.8  # SDXL's ensemble of experts: the base runs 80% of the schedule


class RefinerParams(BaseModel):
    """Finish (text to image) or redo (image to image) the image with the model's refiner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    denoising_start: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="text to image: the share of the schedule the base model runs before the refiner takes over "
        f"(default {REFINER_DENOISING_START}); image to image: leave unset (the refiner runs the img2img at strength)",
    )


FillMode = Literal["original", "noise", "blurred"]
MaskBlur = Annotated[
    int,
    Field(
        ge=0,
        le=64,
        description="Gaussian blur radius in pixels of the mask's edge (0: a hard edge); the blurred mask is what "
        "the model reads (at >= 50%) and what paste_back blends with",
    ),
]


class InpaintParams(BaseModel):
    """How an image with a mask is repainted. The mask itself (white = repaint) travels with the task; inverting
    it and outpainting's border are applied before it gets there (`service.encoding.prepare_mask`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_blur: MaskBlur = 4
    invert_mask: bool = Field(False, description="repaint the black of the mask instead of the white")
    fill: FillMode = Field(
        "original",
        description="what the masked area starts from: original (the image), noise (random pixels drawn from the "
        "seed), blurred (the colours around it, blurred in: AUTOMATIC1111's 'fill')",
    )
    paste_back: bool = Field(
        True,
        description="pixels outside the mask are the input's exactly (the model's VAE round trip would move them); "
        "with mask_blur, blended along the blurred edge",
    )
    only_masked: bool = Field(
        False,
        description="repaint only the masked region at full resolution: crop around it (plus only_masked_padding), "
        "repaint at the output size, paste it back (AUTOMATIC1111's inpaint_full_res)",
    )
    only_masked_padding: int = Field(32, ge=0, le=1024, description="pixels kept around the masked region's box")


class Outpaint(BaseModel):
    """Pixels added on each side of the image (multiples of 8); the new border is the area to paint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    left: int = Field(0, ge=0, le=2048, multiple_of=8)
    right: int = Field(0, ge=0, le=2048, multiple_of=8)
    top: int = Field(0, ge=0, le=2048, multiple_of=8)
    bottom: int = Field(0, ge=0, le=2048, multiple_of=8)

    @model_validator(mode="after")
    def _some_margin(self) -> Outpaint:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("give at least one of left, right, top, bottom (pixels, multiples of 8)")
        return self


LATENT_UPSCALERS = {
    # AUTOMATIC1111's latent upscale modes: torch.nn.functional.interpolate(mode, antialias) of the latents.
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers built in: the first pass decoded, resized with PIL, encoded again. "None" is A1111's plain resize.
PIXEL_UPSCALERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST", "None": "LANCZOS"}
UPSCALER_NAMES: tuple[str, ...] = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
UpscalerName = Literal[UPSCALER_NAMES]  # type: ignore[valid-type]


class HiresParams(BaseModel):
    """Hires fix (AUTOMATIC1111's): make the image at width x height, upscale it (its latents or its pixels), then
    an image-to-image second pass at the new size, as a second phase of the same image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(2.0, ge=1, le=8, description="the second pass's size: width and height times this")
    width: ImageSide | None = Field(None, description="the second pass's width instead of scale (height follows)")
    height: ImageSide | None = Field(None, description="the second pass's height instead of scale (width follows)")
    upscaler: UpscalerName = Field(
        "Latent", description="Latent* modes resize the latents; Lanczos, Nearest, None resize the decoded pixels"
    )
    steps: Steps | None = Field(None, description="second-pass steps (unset: the first pass's num_inference_steps)")
    denoising_strength: Strength = Field(0.7, description="how far the second pass moves from the upscaled image")
    prompt: str | None = Field(None, description="the second pass's prompt (unset: the image's)")
    negative_prompt: str | None = Field(None, description="the second pass's negative prompt (unset: the image's)")
    scheduler: SchedulerName | None = Field(None, description="the second pass's sampler (unset: the image's)")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's (width, height) for a first pass of width x height, in multiples of 8: scaled, or the
        width or height asked for with the aspect ratio kept (both: they must keep it)."""
        if self.width is None and self.height is None:
            return _multiple_of_8(width * self.scale), _multiple_of_8(height * self.scale)
        if self.height is None:
            return self.width, _multiple_of_8(self.width * height / width)
        if self.width is None:
            return _multiple_of_8(self.height * width / height), self.height
        return self.width, self.height

    def second_pass(self, steps: int) -> tuple[int, int]:
        """(schedule length, steps run) of the second pass, as AUTOMATIC1111 counts them: exactly `self.steps` (or
        the first pass's `steps`) steps, the tail of a schedule of int(steps / min(denoising_strength, 0.999))."""
        run = self.steps or steps
        return max(run, int(run / min(self.denoising_strength, 0.999))), run


def _multiple_of_8(value: float) -> int:
    return max(8, int(value) // 8 * 8)


ControlNetName = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[\w.+-]+$", description="a ControlNet (GET /controlnets)")
]
# How a unit's residuals weigh against the prompt (AUTOMATIC1111's control_mode): balanced (both halves of
# classifier-free guidance, as diffusers' ControlNet pipelines), prompt ("My prompt is more important": the
# residuals of each level scaled down from 1 at the deepest to 0.1 at the shallowest, logspace(-1, 0), on both
# halves), control ("ControlNet is more important": diffusers' guess_mode, those scales on the conditional half
# only).
ControlMode = Literal["balanced", "prompt", "control"]
# Preprocessors that run on the CPU without weights (`preprocessors.py`): none (the image is the map already),
# canny (OpenCV's edges), invert (white background and black lines made black and white), scribble_xdog
# (AUTOMATIC1111's difference-of-Gaussians scribble).
PREPROCESSOR_NAMES = ("none", "canny", "invert", "scribble_xdog")
PreprocessorName = Literal[PREPROCESSOR_NAMES]  # type: ignore[valid-type]
# How a control image is fitted to the output size: resize (stretched), crop (its aspect kept, cropped to the
# output's, then resized: AUTOMATIC1111's "Crop and Resize"), fill (its aspect kept, fitted inside, the edges
# extended: "Resize and Fill").
ResizeMode = Literal["resize", "crop", "fill"]
MAX_CONTROLNET_UNITS = 4


class ControlNetUnit(BaseModel):
    """One ControlNet applied to an image: which, how strongly, over which part of the schedule, and how its
    control image was made. The control image itself travels with the task (`ImageTask.control_images`), already
    preprocessed and at the output size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ControlNetName
    scale: float = Field(1.0, ge=0, le=2, description="conditioning scale: how strongly the map steers (0: not at all)")
    start: float = Field(0.0, ge=0, lt=1, description="share of the schedule done before the ControlNet starts")
    end: float = Field(1.0, gt=0, le=1, description="share of the schedule done when the ControlNet stops")
    control_mode: ControlMode = Field(
        "balanced",
        description="balanced; prompt (the prompt matters more: residuals scaled down by level, both halves of "
        "guidance); control (the ControlNet matters more: diffusers' guess mode, conditional half only)",
    )
    preprocess: PreprocessorName = Field(
        "none", description="what makes the map from the image: none (it is the map), canny, invert, scribble_xdog"
    )
    threshold_a: float | None = Field(
        None, ge=0, le=1024, description="canny: the low edge threshold (100); scribble_xdog: the line threshold (32)"
    )
    threshold_b: float | None = Field(None, ge=0, le=1024, description="canny: the high edge threshold (200)")
    processor_res: int | None = Field(
        None,
        ge=64,
        le=2048,
        description="the preprocessor runs on the image resized to this short side, its map then fitted to the "
        "output; unset: at the output size",
    )
    resize_mode: ResizeMode = Field(
        "resize", description="fitting the image to the output size: resize (stretch), crop, fill"
    )

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and start >= end:
            raise ValueError(f"must be after start ({start:g}); got {end:g}")
        return end

    @property
    def key(self) -> tuple:
        """What the engines read (the preprocessing is done by then): images with equal keys share diffusers'
        per-call ControlNet arguments."""
        return (self.name, float(self.scale), float(self.start), float(self.end), self.control_mode)


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
    true_cfg_scale: TrueCfgScale | None = None
    scheduler: SchedulerName = "default"
    seed: Seed | None = None
    strength: Strength | None = Field(None, description="image-to-image only")
    model: ModelId | None = None
    loras: tuple[LoraWeight, ...] = Field(
        (), max_length=16, description="LoRA adapters to apply, each with its scale; an adapter may appear once"
    )

    refiner: RefinerParams | None = Field(None, description="use the model's refiner (GET /models says which have one)")
    inpaint: InpaintParams | None = Field(
        None, description="image-to-image with a mask: how the masked area is repainted"
    )
    outpaint: Outpaint | None = Field(None, description="image-to-image: pixels added around the image, to be painted")
    hires: HiresParams | None = Field(None, description="text-to-image: a second, upscaled pass (hires fix)")
    controlnet: tuple[ControlNetUnit, ...] = Field(
        (),
        max_length=MAX_CONTROLNET_UNITS,
        description="ControlNets steering the image's structure, each with its control image (several: "
        "multi-ControlNet, their residuals summed in this order)",
    )

    @field_validator("loras")
    @classmethod
    def _each_adapter_once(cls, loras: tuple[LoraWeight, ...]) -> tuple[LoraWeight, ...]:
        names = [lora.name for lora in loras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"adapter {', '.join(repeated)} named more than once; give each adapter one scale")
        return loras

    @field_validator("controlnet")
    @classmethod
    def _one_control_mode(cls, units: tuple[ControlNetUnit, ...]) -> tuple[ControlNetUnit, ...]:
        modes = {unit.control_mode for unit in units}
        if len(modes) > 1:
            raise ValueError(
                f"units of one image share one control_mode (got {', '.join(sorted(modes))}): diffusers' "
                "multi-ControlNet pipelines take one guess mode per call"
            )
        return units

    @property
    def controlnet_key(self) -> tuple:
        """The ControlNet units as the engines read them (names, scales, windows, mode), in order."""
        return tuple(unit.key for unit in self.controlnet)

    @property
    def adapter_key(self) -> tuple[tuple[str, float], ...]:
        """The adapters as a hashable, order-free key (scale-0 adapters change nothing and are left out)."""
        return tuple(sorted((lora.name, float(lora.scale)) for lora in self.loras if lora.scale != 0))

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


_LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, str | None]]]:
    """AUTOMATIC1111's `<lora:name:scale>` tags out of a prompt: the text the model reads (tags removed,
    spaces tidied) and each tag's (name, scale text or None)."""
    tags = [(m.group(1).strip(), m.group(2)) for m in _LORA_TAG.finditer(prompt)]
    if not tags:
        return prompt, []
    text = " ".join(_LORA_TAG.sub(" ", prompt).split())
    return re.sub(r"\s+([,.;:])", r"\1", text).strip(" ,"), tags
