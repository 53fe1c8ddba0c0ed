"""AUTOMATIC1111 web UI API models (/sdapi/v1/txt2img, /sdapi/v1/img2img, /sdapi/v1/extra-single-image).

Supported: prompt, negative_prompt, steps, cfg_scale, width, height, seed (-1 = random),
batch_size, n_iter, sampler_name (+ scheduler "Karras"), denoising_strength, init_images.
`override_settings.sd_model_checkpoint` picks the model (GET /sdapi/v1/sd-models) and
`<lora:name:scale>` in the prompt applies an adapter (GET /sdapi/v1/loras). On FLUX.1, Forge's
fields: `distilled_cfg_scale` is [dev]'s guidance embedding and `cfg_scale` above 1 real
(negative-prompt) guidance; on SD3 and FLUX.1 a plain sampler name means its flow twin ("Euler" is
flow Euler), as in Forge.

Hires fix (txt2img): enable_hr, hr_scale or hr_resize_x/y, hr_upscaler (the built-in ones of GET
/sdapi/v1/upscalers), hr_second_pass_steps, denoising_strength, hr_prompt, hr_negative_prompt,
hr_sampler_name (+ hr_scheduler). Inpainting (img2img): mask, mask_blur, inpainting_mask_invert,
inpainting_fill (0 fill = blurred, 1 original, 2 latent noise = noise; 3 latent nothing is refused),
inpaint_full_res (+ inpaint_full_res_padding). A1111's upscaler models, face restoration, tiling,
subseeds, styles, scripts, sigma/eta overrides, other override_settings and
img2img resize modes other than "just resize" change the picture and are not offered: sent with anything
but their neutral value (what `webuiapi` sends by default) they are a 422 naming the field, never ignored.

ControlNet (the sd-webui-controlnet extension's API, as `webuiapi`'s ControlNetUnit sends it): units in
`alwayson_scripts.ControlNet.args` with image (or input_image; img2img: the init image when none), module
(GET /controlnet/module_list), model (GET /controlnet/model_list), weight, guidance_start, guidance_end,
control_mode, resize_mode, processor_res, threshold_a, threshold_b, pixel_perfect (the map made at the output
size); low_vram and hr_option change nothing here; a unit's own mask is refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...pipeline.families import samples_by_flow
from ...pipeline.params import (
    MAX_CONTROLNET_UNITS,
    PIXEL_UPSCALERS,
    UPSCALER_NAMES,
    ControlNetUnit,
    GuidanceScale,
    HiresParams,
    ImageCount,
    ImageParams,
    ImageSide,
    InpaintParams,
    Prompt,
    Seed,
    Steps,
    Strength,
)
from ...pipeline.preprocessors import A1111_MODULES
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
    "hires": "enable_hr",
    "outpaint": "mask",
}
# A1111's inpainting_fill: 0 fill (the colours around, blurred in), 1 original, 2 latent noise, 3 latent nothing.
INPAINTING_FILL = {0: "blurred", 1: "original", 2: "noise"}
# Fields that change the picture in A1111 and are not offered here, with the values that leave it unchanged
# (what A1111 and webuiapi send by default): anything else is refused by name.
NEUTRAL = {
    "restore_faces": (None, False),
    "tiling": (None, False),
    "subseed_strength": (None, 0, 0.0),
    "seed_resize_from_h": (None, 0, -1),
    "seed_resize_from_w": (None, 0, -1),
    "eta": (None, 1, 1.0),
    "s_churn": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0),
    "s_tmin": (None, 0, 0.0),
    "s_noise": (None, 1, 1.0),
    "styles": (None, []),
    "script_name": (None, ""),
    "firstphase_width": (None, 0),
    "firstphase_height": (None, 0),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "refiner_checkpoint": (None, ""),
    "initial_noise_multiplier": (None, 1, 1.0),
    "resize_mode": (None, 0),
    "latent_mask": (None, ""),
}
_NOT_OFFERED = {
    "restore_faces": "face restoration is not offered",
    "tiling": "tiling is not offered",
    "subseed_strength": "variation seeds (subseeds) are not offered",
    "seed_resize_from_h": "seed resizing is not offered",
    "seed_resize_from_w": "seed resizing is not offered",
    "eta": "the samplers run with their own noise (eta 1 for ancestral samplers)",
    "s_churn": "sigma churn is not offered",
    "s_tmax": "sigma churn is not offered",
    "s_tmin": "sigma churn is not offered",
    "s_noise": "the sampler's noise multiplier is not offered",
    "styles": "styles are not stored on this server; put their text in the prompt",
    "script_name": "scripts are not offered",
    "firstphase_width": "the old hires fix fields are not offered; use hr_scale or hr_resize_x/y",
    "firstphase_height": "the old hires fix fields are not offered; use hr_scale or hr_resize_x/y",
    "hr_checkpoint_name": "the second pass runs on the same model",
    "refiner_checkpoint": "A1111's refiner switch is not offered (models with a refiner: native `refiner`)",
    "initial_noise_multiplier": "the initial noise multiplier is not offered",
    "resize_mode": "only 0 (just resize) is offered",
    "latent_mask": "a separate latent mask is not offered",
}
# The ControlNet extension's unit fields: control_mode and resize_mode by name or number, and the keys that change
# nothing about the picture here.
CONTROL_MODES = {
    "balanced": "balanced",
    "my prompt is more important": "prompt",
    "controlnet is more important": "control",
    0: "balanced",
    1: "prompt",
    2: "control",
}
RESIZE_MODES = {
    "just resize": "resize",
    "crop and resize": "crop",
    "scale to fit (inner fit)": "crop",
    "resize and fill": "fill",
    "envelope (outer fit)": "fill",
    0: "resize",
    1: "crop",
    2: "fill",
}
_UNIT_FIELDS = {"model": "name", "weight": "scale", "guidance_start": "start", "guidance_end": "end"}
_HARMLESS_UNIT_KEYS = {"enabled", "low_vram", "hr_option", "save_detected_map", "is_ui", "image", "input_image"}
CONTROLNET_ARGS = "alwayson_scripts.ControlNet.args"
# Settings that change nothing about the picture, accepted in override_settings beside the model.
_HARMLESS_SETTINGS = {"sd_model_checkpoint", "samples_format", "save_images", "grid_save", "samples_save"}


class A1111Txt2ImgRequest(BaseModel):
    # Extra fields are kept to be checked: one that changes the picture is refused by name, never dropped.
    model_config = ConfigDict(
        extra="allow",
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
    # Hires fix
    enable_hr: bool = Field(False, description="hires fix: a second, upscaled image-to-image pass")
    hr_scale: float = Field(2.0, ge=1, le=8, description="hires fix: the second pass's size, times this")
    hr_resize_x: int = Field(0, ge=0, le=4096, description="hires fix: the second pass's width instead (0: scale)")
    hr_resize_y: int = Field(0, ge=0, le=4096, description="hires fix: the second pass's height instead (0: scale)")
    hr_upscaler: str | None = Field(None, description=f"hires fix: one of {', '.join(UPSCALER_NAMES)} (Latent)")
    hr_second_pass_steps: int = Field(0, ge=0, le=1000, description="hires fix: its steps (0: steps)")
    hr_prompt: str = Field("", description="hires fix: the second pass's prompt (empty: prompt)")
    hr_negative_prompt: str = Field("", description="hires fix: its negative prompt (empty: negative_prompt)")
    hr_sampler_name: str | None = Field(None, description="hires fix: its sampler (unset: sampler_name)")
    hr_scheduler: str | None = Field(None, description="hires fix: 'Karras' for its sampler's Karras variant")
    denoising_strength: Strength | None = Field(None, description="hires fix: the second pass's strength (0.7)")
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="scripts are not offered: an entry with arguments is refused by name"
    )

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    def image_params(self, strength: float | None = None, family: str | None = None) -> ImageParams:
        """Our parameters; `family`: the family of the model asked for (GET /models), where names differ. Fields
        that change the picture and are not offered are refused by name (`NEUTRAL`)."""
        self._refuse_what_is_not_offered()
        guidance, true_cfg = self.cfg_scale, None
        if self.distilled_cfg_scale is not None:
            guidance = self.distilled_cfg_scale
            true_cfg = self.cfg_scale if self.cfg_scale is not None and self.cfg_scale > 1 else None
        flow = samples_by_flow(family)
        return ImageParams(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=self.width,
            height=self.height,
            num_inference_steps=self.steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            seed=None if self.seed == -1 else self.seed,
            scheduler=self._scheduler(flow),
            strength=strength,
            model=self.model_name,
            hires=self._hires(flow) if strength is None else None,
            controlnet=[unit for unit, _, _ in self.controlnet_units()],
        )

    def controlnet_units(self) -> list[tuple[ControlNetUnit, str | None, str]]:
        """The enabled units of `alwayson_scripts.ControlNet.args`: each as our unit, its image (None: none sent)
        and the field prefix errors name (`alwayson_scripts.ControlNet.args.<i>`)."""
        name, script = next(((k, v) for k, v in self.alwayson_scripts.items() if k.lower() == "controlnet"), ("", None))
        units = []
        for index, arg in enumerate(_script_args(name, script)):
            prefix = f"{CONTROLNET_ARGS}.{index}"
            if arg is False or (isinstance(arg, dict) and arg.get("enabled") is False):
                continue
            if not isinstance(arg, dict):
                raise ApiError.invalid(prefix, "a ControlNet unit is an object (webuiapi's ControlNetUnit.to_dict())")
            units.append((*_controlnet_unit(arg, prefix), prefix))
        if len(units) > MAX_CONTROLNET_UNITS:
            raise ApiError.invalid(CONTROLNET_ARGS, f"at most {MAX_CONTROLNET_UNITS} enabled units")
        for unit, _, prefix in units[1:]:
            if unit.control_mode != units[0][0].control_mode:
                raise ApiError.invalid(
                    f"{prefix}.control_mode",
                    "the units of one request share one control_mode (one guess mode per call)",
                )
        return units

    def controlnet_names(self) -> dict[str, str]:
        """Our unit field names as this request's units are named (for errors)."""
        return {
            f"controlnet.{i}.{ours}": f"{prefix}.{theirs}"
            for i, (_, _, prefix) in enumerate(self.controlnet_units())
            for ours, theirs in (("name", "model"), ("image", "image"))
        }

    def _refuse_what_is_not_offered(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in NEUTRAL.items():
            value = extra.get(name)
            if value not in neutral:
                raise ApiError.invalid(name, f"{_NOT_OFFERED[name]} (got {value!r})")
        for name, script in self.alwayson_scripts.items():
            args = _script_args(name, script)
            if not args or args == [False] or all(isinstance(a, dict) and a.get("enabled") is False for a in args):
                continue  # an empty or disabled entry, as webuiapi sends for extensions it saw installed
            if name.lower() == "controlnet":
                continue  # its units: `controlnet_units`
            raise ApiError.invalid(f"alwayson_scripts.{name}", "scripts are not offered on this server")
        unknown = sorted(set(self.override_settings) - _HARMLESS_SETTINGS)
        if unknown:
            raise ApiError.invalid(
                f"override_settings.{unknown[0]}",
                "only sd_model_checkpoint is taken from override_settings; other settings change the picture",
            )

    def _hires(self, flow: bool) -> HiresParams | None:
        """Hires fix's record from the hr_* fields (None when enable_hr is off)."""
        if not self.enable_hr:
            return None
        upscaler = self.hr_upscaler or "Latent"
        if upscaler not in UPSCALER_NAMES:
            raise ApiError.invalid(
                "hr_upscaler",
                f"unknown upscaler {upscaler!r}; built in: {', '.join(UPSCALER_NAMES)} (GET /sdapi/v1/upscalers)",
            )
        scheduler = None
        if self.hr_sampler_name not in (None, "", "Use same sampler"):
            scheduler = self._sampler(self.hr_sampler_name, self.hr_scheduler, "hr_sampler_name", flow)
        for name in ("hr_resize_x", "hr_resize_y"):
            if getattr(self, name) % 8:
                raise ApiError.invalid(name, f"must be a multiple of 8 (got {getattr(self, name)})")
        try:
            return HiresParams(
                scale=self.hr_scale,
                width=self.hr_resize_x or None,
                height=self.hr_resize_y or None,
                upscaler=upscaler,
                steps=self.hr_second_pass_steps or None,
                denoising_strength=0.7 if self.denoising_strength is None else self.denoising_strength,
                prompt=self.hr_prompt or None,
                negative_prompt=self.hr_negative_prompt or None,
                scheduler=scheduler,
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ApiError.invalid("enable_hr", f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None

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
        return self._sampler(sampler, self.scheduler, "sampler_name", flow)

    @staticmethod
    def _sampler(sampler: str, schedule: str | None, field: str, flow: bool) -> str:
        """Our sampler for an A1111 sampler name and schedule type ("Karras" picks the Karras variant)."""
        schedule_field = "hr_scheduler" if field.startswith("hr_") else "scheduler"
        kind = (schedule or "").strip().lower()
        if kind not in ("", "automatic", "karras"):
            raise ApiError.invalid(
                schedule_field, f"schedule type {schedule!r} is not offered; use Automatic or Karras"
            )
        name = from_a1111_name(sampler, kind == "karras")
        if name is None:
            known = ", ".join(spec.a1111_name for spec in SCHEDULERS.values())
            raise ApiError.invalid(field, f"unknown sampler {sampler!r}; choose one of {known}")
        if flow:
            name = FLOW_TWINS.get(name, name)
            if kind == "karras" and f"{name}_karras" in SCHEDULERS:
                name = f"{name}_karras"
        if kind == "karras" and "karras" not in name:
            raise ApiError.invalid(schedule_field, f"sampler {sampler!r} has no Karras schedule here")
        return name


def _script_args(name: str, script: Any) -> list:
    """An `alwayson_scripts` entry's argument list: `{"args": [...]}` or the bare list; none is an empty list."""
    args = script.get("args") if isinstance(script, dict) else script
    if args is None:
        return []
    if not isinstance(args, list):
        raise ApiError.invalid(f"alwayson_scripts.{name}.args", f"is a list of arguments (got {type(args).__name__})")
    return args


def _controlnet_unit(arg: dict, prefix: str) -> tuple[ControlNetUnit, str | None]:
    """One ControlNet extension unit as our unit, and its image (None when it has none)."""
    image = arg.get("image") if arg.get("image") not in (None, "") else arg.get("input_image")
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        if image.get("mask"):
            raise ApiError.invalid(f"{prefix}.image.mask", "a ControlNet unit's own mask is not offered")
        image = image.get("image")
    if arg.get("mask") not in (None, ""):
        raise ApiError.invalid(f"{prefix}.mask", "a ControlNet unit's own mask is not offered; send none")
    known = {"module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode"}
    known |= {"processor_res", "threshold_a", "threshold_b", "pixel_perfect", "mask", "guessmode"}
    unknown = sorted(set(arg) - known - _HARMLESS_UNIT_KEYS)
    if unknown:
        raise ApiError.invalid(f"{prefix}.{unknown[0]}", "not offered here (it would change the picture)")
    model = arg.get("model")
    if not isinstance(model, str) or model.strip() in ("", "None"):
        raise ApiError.invalid(f"{prefix}.model", "name a ControlNet (GET /controlnet/model_list)")
    module = str(arg.get("module") or "none").strip().lower()
    if module not in A1111_MODULES:
        raise ApiError.invalid(
            f"{prefix}.module",
            f"unknown module {arg.get('module')!r}; offered: {', '.join(A1111_MODULES)} (GET /controlnet/module_list)",
        )
    mode = arg.get("control_mode", arg.get("guessmode", 0))
    mode = mode.strip().lower() if isinstance(mode, str) else int(mode) if isinstance(mode, (bool, int)) else mode
    if mode not in CONTROL_MODES:
        raise ApiError.invalid(f"{prefix}.control_mode", f"one of {', '.join(repr(k) for k in CONTROL_MODES)}")
    resize = arg.get("resize_mode", "Crop and Resize")
    resize = resize.strip().lower() if isinstance(resize, str) else resize
    if resize not in RESIZE_MODES:
        raise ApiError.invalid(f"{prefix}.resize_mode", f"one of {', '.join(repr(k) for k in RESIZE_MODES)}")
    resolution = arg.get("processor_res")
    numeric = (int, float)
    fields = {
        "name": model.split(" [", 1)[0].strip(),  # A1111 lists "name [hash]"; clients echo it back
        "scale": arg.get("weight", 1.0),
        "start": arg.get("guidance_start", 0.0),
        "end": arg.get("guidance_end", 1.0),
        "control_mode": CONTROL_MODES[mode],
        "preprocess": A1111_MODULES[module],
        "resize_mode": RESIZE_MODES[resize],
        # -1 (or pixel perfect): the map is made at the output size
        "processor_res": None
        if arg.get("pixel_perfect") or not resolution or (isinstance(resolution, numeric) and resolution < 0)
        else resolution,
    }
    for name in ("threshold_a", "threshold_b"):
        value = arg.get(name)
        negative = isinstance(value, numeric) and value < 0
        fields[name] = None if value is None or negative or fields["preprocess"] == "none" else value
    try:
        unit = ControlNetUnit(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        ours = str(error["loc"][0]) if error["loc"] else ""
        theirs = {v: k for k, v in _UNIT_FIELDS.items()}.get(ours, ours)
        raise ApiError.invalid(f"{prefix}.{theirs}", error["msg"]) from None
    return unit, image if isinstance(image, str) and image else None


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, description="base64 images; the first is used")
    denoising_strength: Strength = 0.75
    mask: str | None = Field(None, description="inpainting: base64 image, white = repaint (alpha, if it has one)")
    mask_blur: int = Field(4, ge=0, le=64, description="blur radius of the mask's edge")
    inpainting_mask_invert: Literal[0, 1] | bool = Field(0, description="1: repaint the black of the mask")
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="the masked area's start: 0 fill (blurred), 1 original, 2 latent noise"
    )
    inpaint_full_res: bool | Literal[0, 1] = Field(
        True, description="'only masked': repaint the mask's region at full resolution, then paste it back"
    )
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024, description="'only masked': pixels around the region")

    def image_params(self, family: str | None = None) -> ImageParams:  # type: ignore[override]
        params = super().image_params(strength=self.denoising_strength, family=family)
        if self.enable_hr:
            raise ApiError.invalid("enable_hr", "hires fix applies to txt2img")
        if not self.mask:
            return params
        if self.inpainting_fill not in INPAINTING_FILL:
            raise ApiError.invalid(
                "inpainting_fill", "3 (latent nothing) is not offered; use 0 (fill), 1 (original) or 2 (latent noise)"
            )
        inpaint = InpaintParams(
            mask_blur=self.mask_blur,
            invert_mask=bool(self.inpainting_mask_invert),
            fill=INPAINTING_FILL[self.inpainting_fill],
            paste_back=True,  # A1111 always puts the unmasked pixels back
            only_masked=bool(self.inpaint_full_res),
            only_masked_padding=self.inpaint_full_res_padding,
        )
        return params.model_copy(update={"inpaint": inpaint})


class A1111ExtraSingleImageRequest(BaseModel):
    """POST /sdapi/v1/extra-single-image: upscale an image with a built-in upscaler (no model weights)."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(..., min_length=1, description="base64 image")
    resize_mode: Literal[0, 1] = Field(0, description="0: by upscaling_resize, 1: to upscaling_resize_w x _h")
    upscaling_resize: float = Field(2.0, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=8192)
    upscaling_resize_h: int = Field(512, ge=1, le=8192)
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description="Lanczos, Nearest or None (plain Lanczos resize)")
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscale_first: bool = False
    show_extras_results: bool = True

    def refusals(self) -> None:
        """What changes the picture and is not offered: face restorers, a second upscaler, weight-based ones."""
        for name in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(self, name):
                raise ApiError.invalid(name, "face restoration is not offered")
        if self.extras_upscaler_2_visibility and self.upscaler_2 != "None":
            raise ApiError.invalid("upscaler_2", "a second upscaler is not offered")
        if self.upscaler_1 not in PIXEL_UPSCALERS:
            raise ApiError.invalid(
                "upscaler_1", f"built in here: {', '.join(PIXEL_UPSCALERS)} (model-based upscalers are not configured)"
            )


class A1111DetectRequest(BaseModel):
    """POST /controlnet/detect: run a preprocessor (module) on images, as the ControlNet extension does."""

    model_config = ConfigDict(extra="allow")

    controlnet_module: str = Field("none", description="a module of GET /controlnet/module_list")
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_images: list[str] = Field(default_factory=list, description="older clients' name (data: URLs)")
    controlnet_processor_res: int = Field(512, description="the short side the map is made at (<= 0: as sent)")
    controlnet_threshold_a: float = Field(
        -1, description="canny: low threshold; scribble_xdog: threshold (-1: default)"
    )
    controlnet_threshold_b: float = Field(-1, description="canny: high threshold (-1: default)")

    def images(self) -> list[tuple[str, str]]:
        """(image, its field) for every image sent."""
        name = "controlnet_input_images" if self.controlnet_input_images else "controlnet_images"
        return [(image, f"{name}.{i}") for i, image in enumerate(getattr(self, name))]

    def preprocessor(self) -> str:
        module = self.controlnet_module.strip().lower()
        if module not in A1111_MODULES:
            raise ApiError.invalid(
                "controlnet_module", f"unknown module {self.controlnet_module!r}; offered: {', '.join(A1111_MODULES)}"
            )
        return A1111_MODULES[module]

    def thresholds(self) -> tuple[float | None, float | None]:
        return tuple(
            None if value < 0 else value for value in (self.controlnet_threshold_a, self.controlnet_threshold_b)
        )


class A1111GenerationResult(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str
