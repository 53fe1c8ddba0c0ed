"""Model families: what a loaded pipeline is, and what follows from that. The one place to add a family.

A family is a kind of denoiser with its own way of being called: its samplers, its
sizes, its text conditioning, its stepper. Every module that must know which
kind of model it serves asks `family_of(pipe)` and reads the answer here, never
the pipeline's class name:

  unet  UNet2DConditionModel under StableDiffusion(XL)Pipeline and kin: noise-prediction
        samplers (euler, dpmpp_2m, ...), classifier-free guidance with the negative prompt.
  sd3   Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT over 2x2 patches of 16-channel
        latents, flow-matching samplers, CLIP-L + OpenCLIP bigG + T5 text (`max_sequence_length` T5
        tokens), classifier-free guidance with the negative prompt as SD3 defines it (guidance_scale > 1).
  flux  FLUX.1 (`FluxPipeline`): 2x2-packed latents, flow-matching samplers with a schedule that depends on the
        image size (dev), CLIP-L pooled + T5 text. No classifier-free guidance by default: [dev] takes
        `guidance_scale` as an embedding, [schnell] ignores it; `true_cfg_scale` > 1 adds real guidance with the
        negative prompt (a second transformer pass per step), as `FluxPipeline` defines it.

Adding a family: a `Family` entry below (its pipeline classes, samplers, stepper), and its stepper module
under `steppers/` (see `steppers/__init__.py`). Torch-free: the HTTP side may read names without diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .controlnets import check_control
from .errors import InvalidTaskError
from .params import LATENT_UPSCALERS, PIXEL_UPSCALERS, GenerationDefaults, ImageParams
from .schedulers import FLOW_SCHEDULER_NAMES, UNET_SCHEDULER_NAMES
from .tasks import ImageTask


@dataclass(frozen=True)
class Family:
    name: str
    # Text-to-image pipeline classes of this family (their image-to-image twins come from `loading.image_to_image`).
    pipelines: tuple[str, ...]
    # Samplers its models may accept (a model may accept fewer: `LoadedModel.samplers`).
    samplers: tuple[str, ...]
    # The step engine's mechanics for it, "module:Class" under serve_app.pipeline.steppers; None: whole calls only.
    stepper: str | None
    # What a task gets for parameters that neither the config nor a synthetic preset sets.
    fallback_defaults: GenerationDefaults
    # Whether its pipelines read prompts through T5 (and take `max_sequence_length`).
    reads_t5: bool = False


UNET = Family(
    name="unet",
    pipelines=("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
    samplers=UNET_SCHEDULER_NAMES,
    stepper="unet:UNetStepper",
    fallback_defaults=GenerationDefaults(num_inference_steps=25, guidance_scale=7.5, strength=0.75),
)
SD3 = Family(
    name="sd3",
    pipelines=("StableDiffusion3Pipeline",),
    samplers=FLOW_SCHEDULER_NAMES,
    stepper="flow:FlowStepper",
    # StableDiffusion3Pipeline's own defaults (28 steps, guidance 7); its img2img's strength 0.6.
    fallback_defaults=GenerationDefaults(num_inference_steps=28, guidance_scale=7.0, strength=0.6),
    reads_t5=True,
)
FLUX = Family(
    name="flux",
    pipelines=("FluxPipeline",),
    samplers=FLOW_SCHEDULER_NAMES,
    stepper="flow:FlowStepper",
    # FluxPipeline's own defaults ([dev]: 28 steps, guidance 3.5); [schnell] is refined in `fallback_defaults`.
    fallback_defaults=GenerationDefaults(num_inference_steps=28, guidance_scale=3.5, strength=0.6),
    reads_t5=True,
)
# Pipelines of no known family: run whole diffusers calls with their own scheduler only.
OTHER = Family(
    name="other",
    pipelines=(),
    samplers=("default",),
    stepper=None,
    fallback_defaults=GenerationDefaults(num_inference_steps=25, guidance_scale=7.5, strength=0.75),
)

FAMILIES: dict[str, Family] = {family.name: family for family in (UNET, SD3, FLUX)}
_BY_PIPELINE = {pipeline: family for family in FAMILIES.values() for pipeline in family.pipelines}


def family_of(pipe) -> Family:
    """The family of a loaded text-to-image pipeline: by its class, else any pipeline with a UNet is `unet`
    (its samplers apply; the stepper says for itself whether it can step it), else `other`."""
    family = _BY_PIPELINE.get(type(pipe).__name__)
    if family is not None:
        return family
    return UNET if getattr(pipe, "unet", None) is not None else OTHER


def samples_by_flow(family_name: str | None) -> bool:
    """Whether models of this family (by name) take the flow-matching samplers."""
    family = FAMILIES.get(family_name or "")
    return family is not None and family.samplers == FLOW_SCHEDULER_NAMES


def family_of_source(source: str, cache_dir: str | None = None) -> str | None:
    """The family name of a model source, read without loading it (torch-free, for the HTTP side): a
    synthetic preset's pipeline, a directory's or a cached Hub repo's model_index.json; None when that
    cannot be known before the model loads (a Hub repo not in the cache)."""
    import json
    from pathlib import Path

    from .loading import ModelSource

    parsed = ModelSource.parse(source)
    if parsed.kind == "synthetic":
        from .synthetic import load_preset

        class_name = load_preset(parsed.location)["pipeline"]
    else:
        index: str | Path | None = Path(parsed.location) / "model_index.json"
        if parsed.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(parsed.location, "model_index.json", cache_dir=cache_dir)
        if not isinstance(index, (str, Path)) or not Path(index).is_file():
            return None
        class_name = json.loads(Path(index).read_text()).get("_class_name", "")
    family = _BY_PIPELINE.get(class_name)
    return family.name if family is not None else (UNET.name if "StableDiffusion" in class_name else OTHER.name)


def fallback_defaults(pipe, family: Family) -> GenerationDefaults:
    """The family's fallbacks, refined by what the model says of itself: FLUX.1 [schnell] (no guidance
    embedding) is distilled to 4 steps without guidance."""
    if family is FLUX and not pipe.transformer.config.guidance_embeds:
        return GenerationDefaults(num_inference_steps=4, guidance_scale=0.0).over(family.fallback_defaults)
    return family.fallback_defaults


def native_size(pipe) -> int:
    """The image side the model was trained at: its default sample size (latent side) x the VAE's scale factor."""
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None:
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        sample = denoiser.config.sample_size
    return int(sample) * int(pipe.vae_scale_factor)


def size_multiple(pipe, family: Family) -> int:
    """Width and height must be multiples of this: the VAE's scale factor, times the transformer's patch
    (SD3) or Flux's 2x2 packing."""
    factor = int(pipe.vae_scale_factor)
    if family is SD3:
        return factor * int(pipe.transformer.config.patch_size)
    if family is FLUX:
        return factor * 2
    return factor


def default_max_sequence_length(pipe, family: Family) -> int | None:
    """T5 tokens a prompt is read as when neither the options nor the preset say: the pipeline's own default
    (SD3 256, FLUX.1 [dev] 512), and 256 for FLUX.1 [schnell] (its training length: BFL's reference code)."""
    if family is SD3:
        return 256
    if family is FLUX:
        return 512 if pipe.transformer.config.guidance_embeds else 256
    return None


def uses_true_cfg(params: ImageParams) -> bool:
    """FLUX.1: whether an image runs true classifier-free guidance (true_cfg_scale > 1) with its negative prompt."""
    return params.true_cfg_scale is not None and params.true_cfg_scale > 1


def check_task(task: ImageTask, family: Family, schedulers, multiple: int, inpainting_model: bool = False) -> None:
    """What a model of `family` refuses of a task (defaults filled in), as an InvalidTaskError naming the field:
    what its pipeline's check_inputs refuses, samplers of another family or that cannot do this kind of task on
    this model (`schedulers`: its SchedulerTemplates), sizes that are not multiples of `multiple`
    (`size_multiple`), another family's parameters, image-to-image that would run no step, masks that repaint
    nothing, a mask or hires fix where they cannot apply; an inpainting model (`inpainting_model`: its denoiser
    reads the mask) takes only tasks with a mask. A task whose defaults were never filled in is a ValueError
    (the caller's bug, not the request's)."""
    p = task.params
    needed = ("width", "height", "num_inference_steps", "guidance_scale", "seed")
    unset = [name for name in needed if getattr(p, name) is None]
    if task.init_image is not None and p.strength is None:
        unset.append("strength")
    if unset:
        raise ValueError(f"task {task.request_id!r} has no {', '.join(unset)}: call task.with_defaults(...) first")
    if p.width % multiple or p.height % multiple:
        raise InvalidTaskError(
            f"width and height must be multiples of {multiple} for this model ({family.name} family), "
            f"not {p.width}x{p.height}",
            "width" if p.width % multiple else "height",
        )
    schedulers.check(p.scheduler, task.init_image is not None)
    if uses_true_cfg(p) and family is not FLUX:
        raise InvalidTaskError(
            f"true_cfg_scale applies to FLUX.1 models; this model ({family.name} family) guides with "
            "guidance_scale and the negative prompt",
            "true_cfg_scale",
        )
    if task.init_image is not None:
        image = task.init_image
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise InvalidTaskError("init_image must be an RGB uint8 array (height, width, 3)", "init_image")
    if not family.reads_t5:
        # SD3's and FLUX.1's image-to-image run n - int(n - n * strength) steps: at least one at any strength.
        task.check_denoises()
    check_edits(task, family, schedulers, multiple, inpainting_model)
    check_control(task, family.name)


def check_edits(task: ImageTask, family: Family, schedulers, multiple: int, inpainting_model: bool) -> None:
    """Masks, outpainting and hires fix: where they apply, and that they do something."""
    from .masks import check_mask

    p = task.params
    if task.mask is not None:
        if task.init_image is None:
            raise InvalidTaskError("a mask needs an init image to repaint", "mask")
        check_mask(task.mask, task.init_image.shape, p.inpaint)
    elif p.inpaint is not None:
        raise InvalidTaskError("inpainting options apply with a mask: send one", "mask")
    if inpainting_model and task.mask is None:
        raise InvalidTaskError(
            "this is an inpainting model (its denoiser reads the mask): send an init image and a mask", "mask"
        )
    if p.refiner is not None and (task.mask is not None or p.hires is not None):
        raise InvalidTaskError("the refiner does not take a mask or hires fix", "refiner")
    if p.hires is None:
        return
    if task.init_image is not None:
        raise InvalidTaskError("hires fix applies to text to image", "hires")
    if family.reads_t5 and p.hires.upscaler in LATENT_UPSCALERS:
        raise InvalidTaskError(
            f"{p.hires.upscaler!r} resizes latents, which this model's ({family.name} family) image-to-image pipeline "
            f"does not take back; choose one of {', '.join(PIXEL_UPSCALERS)}",
            "hires.upscaler",
        )
    width, height = p.hires.target_size(p.width, p.height)
    if p.hires.width and p.hires.height and p.hires.width * p.height != p.hires.height * p.width:
        raise InvalidTaskError(
            f"hires fix to {width}x{height} would change the aspect ratio of {p.width}x{p.height}; give its width "
            "or its height (the other follows) or a scale",
            "hires",
        )
    if max(width, height) > 4096:
        raise InvalidTaskError(f"hires fix would make {width}x{height}; at most 4096 pixels a side", "hires")
    if width % multiple or height % multiple:
        raise InvalidTaskError(
            f"hires fix would make {width}x{height}; this model needs multiples of {multiple}", "hires"
        )
    if (width, height) == (p.width, p.height):
        raise InvalidTaskError(f"hires fix to {width}x{height} does not enlarge the image; raise its scale", "hires")
    try:
        schedulers.check(p.hires.scheduler or p.scheduler, image_to_image=True)
    except InvalidTaskError as exc:
        field = "hires.scheduler" if p.hires.scheduler else "scheduler"
        raise InvalidTaskError(f"the second pass: {exc.message}", field) from None
    length, _ = p.hires.second_pass(p.num_inference_steps)
    if length > 1000:
        raise InvalidTaskError("hires fix's second pass would take over 1000 steps; raise its strength", "hires")
