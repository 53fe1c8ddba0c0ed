"""AUTOMATIC1111 web UI API models (/sdapi/v1/txt2img, /sdapi/v1/img2img).

Supported: prompt, negative_prompt, steps, cfg_scale, width, height, seed (-1 = random),
batch_size, n_iter, sampler_name (+ scheduler "Karras"), denoising_strength, init_images.
`override_settings.sd_model_checkpoint` picks the model (GET /sdapi/v1/sd-models) and
`<lora:name:scale>` in the prompt applies an adapter (GET /sdapi/v1/loras). On FLUX.1, Forge's
fields: `distilled_cfg_scale` is [dev]'s guidance embedding and `cfg_scale` above 1 real
(negative-prompt) guidance; on SD3 and FLUX.1 a plain sampler name means its flow twin ("Euler" is
flow Euler), as in Forge. Anything else A1111
accepts (hires fix, face restoration, scripts, other override_settings) is ignored, except `mask`,
which is refused: silently ignoring a mask would return the wrong picture.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...pipeline.families import samples_by_flow
from ...pipeline.params import GuidanceScale, ImageCount, ImageParams, ImageSide, Prompt, Seed, Steps, Strength
from ...pipeline.schedulers import FLOW_TWINS, SCHEDULERS, from_a1111_name
from ..errors import ApiError

# Our field names as A1111 callers know them, for error messages.
FIELD_NAMES = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "scheduler": "sampler_name",
    "strength": "denoising_strength",
    "model": "override_settings.sd_model_checkpoint",
    "true_cfg_scale": "cfg_scale",
}


class A1111Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"prompt": "a castle", "steps": 20, "cfg_scale": 7, "seed": -1, "batch_size": 2}]
        },
    )

    prompt: Prompt
    negative_prompt: str = ""
    steps: Steps | None = None
    cfg_scale: GuidanceScale | None = None
    distilled_cfg_scale: GuidanceScale | None = Field(
        None, description="FLUX.1 [dev] (Forge): the guidance embedding; cfg_scale then means real guidance"
    )
    width: ImageSide | None = None
    height: ImageSide | None = None
    seed: Seed | Literal[-1] = Field(-1, description="-1: random")
    batch_size: ImageCount = 1
    n_iter: ImageCount = 1
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M'; our names work too")
    sampler_index: str | None = Field(None, description="older alias of sampler_name")
    scheduler: str | None = Field(None, description="'Karras' selects Karras sigmas where the sampler has them")
    override_settings: dict[str, Any] = Field(
        default_factory=dict, description="sd_model_checkpoint: the model (title or name from /sdapi/v1/sd-models)"
    )

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    def image_params(self, strength: float | None = None, family: str | None = None) -> ImageParams:
        """Our parameters; `family`: the family of the model asked for (GET /models), where names differ."""
        guidance, true_cfg = self.cfg_scale, None
        if self.distilled_cfg_scale is not None:
            guidance = self.distilled_cfg_scale
            true_cfg = self.cfg_scale if self.cfg_scale is not None and self.cfg_scale > 1 else None
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_inference_steps=self.steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            seed=None if self.seed == -1 else self.seed,
            scheduler=self._scheduler(samples_by_flow(family)),
            strength=strength,
            model=self.model_name,
        )

    @property
    def model_name(self) -> str | None:
        """The model named by override_settings.sd_model_checkpoint (None: the default)."""
        return self._model()

    def _model(self) -> str | None:
        checkpoint = self.override_settings.get("sd_model_checkpoint")
        if checkpoint is None:
            return None
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ApiError.invalid("override_settings.sd_model_checkpoint", "must be a model's name")
        # A1111 titles read "name [hash]"; ours have no hash, but clients echo the title back.
        return checkpoint.split(" [", 1)[0].strip()

    def _scheduler(self, flow: bool) -> str:
        sampler = self.sampler_name or self.sampler_index
        if not sampler:
            return "default"
        karras = (self.scheduler or "").strip().lower() == "karras"
        name = from_a1111_name(sampler, karras)
        if name is None:
            known = ", ".join(spec.a1111_name for spec in SCHEDULERS.values())
            raise ApiError.invalid("sampler_name", f"unknown sampler {sampler!r}; choose one of {known}")
        return FLOW_TWINS.get(name, name) if flow else name


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images; the first is used")
    denoising_strength: Strength = 0.75
    mask: Any = None

    def image_params(self, family: str | None = None) -> ImageParams:  # type: ignore[override]
        if self.mask:
            raise ApiError.invalid("mask", "inpainting is not supported by this server")
        return super().image_params(strength=self.denoising_strength, family=family)


class A1111GenerationResult(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str
