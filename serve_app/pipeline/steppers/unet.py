"""Step-level batching: images at different denoising steps share one UNet call per tick.

The request-level engine runs whole diffusers pipeline calls, so every image
in a call must share steps, guidance, scheduler and strength, and a request
that arrives mid-call waits for the call to end. Here the pipeline's
`__call__` is taken apart into its named steps:

  start   check inputs, encode prompts (one batched call), make each image's
          generator, scheduler and timesteps (img2img: from the strength),
          prepare its latents and its SDXL added conditioning
  step    ONE UNet call over the rows of every given image: per-row
          timesteps, classifier-free-guidance rows only for images that use
          guidance, each image's own guidance scale, then each image's
          scheduler step on its own rows
  decode  one batched VAE decode, as the pipeline decodes

Each step replicates what `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`,
`StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` (diffusers 0.42)
do, in the same order, so an image stepped alone is bit-identical to the plain
pipeline's for the same parameters and seed; stepped beside others it differs
only as ordinary batching does (kernels round differently by batch size: at
most 1/255 per pixel).

Cohorts. A scheduler keeps per-image history (step index, PNDM's `ets`, DPM++'s
`model_outputs`, Heun's previous derivative), so every image needs its own.
Stepping one scheduler per image costs 50-700 µs of Python per image per tick,
which for small or fast models is a real share of the UNet call. Images
started together with the same sampler, step count, strength and latent shape
run in lockstep, and their schedulers would hold identical history row by row:
they share ONE scheduler over their stacked latents (a cohort), exactly as one
pipeline call over a batch does, with a list of per-image generators. When the
caller steps only some of a cohort (one was cancelled, failed, or is left for a
later tick) the cohort splits: each part gets a copy of the scheduler with its
own rows of every per-image tensor. Splitting is exact for the scheduler classes
in `COHORT_SCHEDULERS` (tested); any other class runs one scheduler per image.

Which images run in which tick (admission, cancellation, fairness) is the
caller's policy; this module is the mechanics. No Ray, no HTTP.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..controlnets import check_names
from ..errors import GenerationError, InvalidTaskError
from ..families import UNET, check_task
from ..hires import second_phase_task
from ..loading import reads_mask
from ..masks import masked_inputs
from ..schedulers import SchedulerTemplates
from ..tasks import ImageTask, to_uint8
from .common import (
    GuidanceRows,
    MaskedRows,
    NoAdapters,
    SteppedImage,
    Stepper,
    check_step_batch,
    decode_by_key,
    encode_each_alone_on_failure,
    latent_preview_png,
    mark_non_finite,
    pasted_back,
    start_failure,
    step_failure,
)
from .control import ControlNetRows, ControlUnitRows

logger = logging.getLogger(__name__)

# Pipeline classes whose __call__ this module replicates step by step (with their img2img and inpaint variants;
# the inpaint classes as loaded for inpainting models, whose UNet reads the mask).
STEPPABLE_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLInpaintPipeline",
)

# Scheduler classes whose per-image state is exactly their tensors shaped like the latents
# (verified for each, see tests/unit/test_unet_stepper.py): a cohort of them splits exactly.
COHORT_SCHEDULERS = frozenset(
    {
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DDIMScheduler",
        "UniPCMultistepScheduler",
        "LCMScheduler",
    }
)


class DenoisingState(SteppedImage):
    """One image in flight. Created by `UNetStepper.start`, advanced by `UNetStepper.step`.

    Its latents, scheduler, timesteps and step index live in its cohort (see the
    module docstring): while the images of a cohort stay in lockstep they share
    one scheduler instance over their stacked latents; `latents` is this image's row.
    """

    def __init__(self, task: ImageTask, generator: torch.Generator, conditioning: _Conditioning):
        self.task = task
        self.generator = generator  # CPU, seeded with task.seed: latents, VAE sample, ancestral noise
        self.guidance_scale = float(task.params.guidance_scale)
        self.cond = conditioning.cond  # (1, tokens, dim) prompt embeddings
        self.uncond = conditioning.uncond  # negative prompt embeddings; None when it runs without guidance
        # SDXL added conditioning, (1, dim) each; None for SD 1.x/2.x.
        self.text_embeds = conditioning.text_embeds
        self.uncond_text_embeds = conditioning.uncond_text_embeds
        self.time_ids = conditioning.time_ids
        self.uncond_time_ids = conditioning.uncond_time_ids
        self.timestep_cond = conditioning.timestep_cond  # guidance embedding for UNets distilled with one (LCM)
        self.error: GenerationError | None = None
        # Its LoRA adapters when images group by adapter set (`UNetStepper(group_by_adapters=True)`); else ().
        self.adapter_group: tuple = ()
        # Inpainting: its mask, image latents and start noise at latent resolution (and the masked image's
        # latents for models that read them); None for images without a mask.
        self.masked: MaskedRows | None = None
        # ControlNet: its units with their conditioning embeddings (`control.py`); [] for images without.
        self.control: list[ControlUnitRows] = []
        # Its ControlNet units when images group by ControlNet set (`UNetStepper(group_by_controlnets=True)`).
        self.control_group: tuple = ()
        self._cohort: _Cohort | None = None
        self._row = 0

    @property
    def scheduler(self):
        """Its scheduler (shared with the rest of its cohort while they run in lockstep)."""
        return self._cohort.scheduler

    @property
    def timesteps(self) -> torch.Tensor:
        """The timesteps it runs (img2img: the tail its strength leaves)."""
        return self._cohort.timesteps

    @property
    def step_index(self) -> int:
        """UNet evaluations done."""
        return self._cohort.step_index

    @property
    def total_steps(self) -> int:
        """UNet evaluations it needs: len(timesteps), not num_inference_steps (PNDM N+1, Heun 2N-1)."""
        return self._cohort.total_steps

    @property
    def latents(self) -> torch.Tensor:
        """Its current latents, (1, C, h, w): a view of its cohort's rows."""
        return self._cohort.latents[self._row : self._row + 1]

    @latents.setter
    def latents(self, value: torch.Tensor) -> None:
        # Replacing one image's latents takes it out of lockstep: give it a cohort of its own first.
        with torch.inference_mode():
            if len(self._cohort.members) > 1:
                self._cohort.partition([self])
            self._cohort.latents = value.to(self._cohort.latents)

    @property
    def uses_guidance(self) -> bool:
        """Whether it takes an unconditional (negative prompt) row besides its conditional one."""
        return self.uncond is not None

    @property
    def rows(self) -> int:
        """UNet rows it takes in a tick."""
        return 2 if self.uses_guidance else 1

    @property
    def shape_key(self) -> tuple:
        """Only states with equal keys may share a UNet call."""
        latents = self._cohort.latents
        return (*latents.shape[1:], latents.dtype, latents.device, self.adapter_group, self.control_group)


@dataclass
class _Conditioning:
    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    uncond_text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    uncond_time_ids: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None


class _Cohort:
    """Images in lockstep: one scheduler over their stacked latents, one row each."""

    def __init__(self, scheduler, timesteps: torch.Tensor, members: list[DenoisingState], latents: torch.Tensor):
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.step_index = 0
        self.latents = latents
        self._timestep_list = list(timesteps)  # 0-dim tensors, as the pipeline's `for t in timesteps` gives
        # The UNet's time embedding calls .float() on timesteps: float32 values are exact for every scheduler.
        self._timestep_values = timesteps.to(torch.float32).tolist()
        self.members: list[DenoisingState] = []
        self._set_members(members)

    def _set_members(self, members: list[DenoisingState]) -> None:
        self.members = list(members)
        for row, state in enumerate(self.members):
            state._cohort, state._row = self, row
        self.step_kwargs = prepare_extra_step_kwargs(self.scheduler, [state.generator for state in self.members])
        self._blend_rows: tuple | None = None

    @property
    def blends(self) -> bool:
        """Whether its images are masked and the UNet does not read masks: the unmasked area is put back after
        each step (every member of a cohort is masked or none is: the cohort key holds the kind)."""
        first = self.members[0].masked
        return first is not None and first.image_latents is not None

    def blend(self, latents: torch.Tensor) -> torch.Tensor:
        """After the scheduler step of step `step_index`: the unmasked area replaced by the image latents noised
        to the next timestep (the image latents themselves after the last), as the inpaint pipelines do with a
        UNet that does not read the mask. Before anything else touches the scheduler: Euler-family `add_noise`
        reads the step index that `step()` just advanced."""
        if self._blend_rows is None:
            rows = [state.masked for state in self.members]
            stacked = (
                [rows[0].mask, rows[0].image_latents, rows[0].noise]
                if len(rows) == 1
                else [torch.cat([getattr(r, name) for r in rows]) for name in ("mask", "image_latents", "noise")]
            )
            self._blend_rows = tuple(stacked)
        mask, image_latents, noise = self._blend_rows
        init = image_latents
        if self.step_index < self.total_steps - 1:
            init = self.scheduler.add_noise(
                image_latents, noise, torch.tensor([self._timestep_list[self.step_index + 1]])
            )
        return (1 - mask) * init + mask * latents

    @property
    def total_steps(self) -> int:
        return len(self._timestep_list)

    @property
    def timestep(self):
        return self._timestep_list[self.step_index]

    @property
    def timestep_value(self) -> float:
        return self._timestep_values[self.step_index]

    def partition(self, selected: list[DenoisingState]) -> _Cohort:
        """Split into a cohort of `selected` (returned) and one of the rest, each with its rows of history."""
        chosen = {id(s) for s in selected}
        rest = [s for s in self.members if id(s) not in chosen]
        taken = self._take([s for s in self.members if id(s) in chosen])
        if rest:
            self._take(rest)
        return taken

    def _take(self, members: list[DenoisingState]) -> _Cohort:
        rows = torch.tensor([s._row for s in members], device=self.latents.device)
        n = len(self.members)
        # Every tensor of the scheduler shaped like the latents is per-image history: copy the scheduler
        # with those tensors replaced by their rows (deepcopy's memo substitutes them wherever they occur).
        memo: dict = {}
        for tensor in _per_image_tensors(self.scheduler, self.latents.shape, n):
            memo[id(tensor)] = tensor.index_select(0, rows)
        scheduler = copy.deepcopy(self.scheduler, memo)
        cohort = _Cohort.__new__(_Cohort)
        cohort.scheduler = scheduler
        cohort.timesteps = self.timesteps
        cohort.step_index = self.step_index
        cohort.latents = self.latents.index_select(0, rows)
        cohort._timestep_list = self._timestep_list
        cohort._timestep_values = self._timestep_values
        cohort._set_members(members)
        return cohort


class UNetStepper(Stepper):
    """The mechanics of step-level batching over one loaded diffusers pipeline.

    Not thread-safe (neither is the pipeline): call from one thread at a time.
    """

    def __init__(
        self,
        pipe,
        schedulers=None,
        img2img_pipe=None,
        adapters=None,
        group_by_adapters=False,
        controlnets=None,
        group_by_controlnets=False,
    ):
        reason = self.unsupported_reason(pipe)
        if reason:
            raise ValueError(f"{type(pipe).__name__} cannot be stepped: {reason}")
        self.pipe = pipe
        self.device = pipe._execution_device
        # Samplers, built from the config of the scheduler the model shipped with (shared with the model).
        self.schedulers = schedulers if schedulers is not None else SchedulerTemplates(pipe.scheduler, self.device)
        self._img2img = img2img_pipe
        # LoRA adapters, applied per row (adapters.LoraMixer); group_by_adapters: only images with the
        # same adapters and scales share a UNet call (to measure what mixing them saves).
        self.adapters = adapters if adapters is not None else NoAdapters()
        self.group_by_adapters = group_by_adapters
        self.is_sdxl = type(pipe).__name__ in ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline")
        # An inpainting model's UNet reads the mask and the masked image's latents beside the latents (9 channels).
        self.reads_mask = reads_mask(pipe)
        self.latent_channels = int(pipe.vae.config.latent_channels)
        self._inpaint = None
        # diffusers' do_classifier_free_guidance is False for UNets distilled with a guidance
        # embedding (time_cond_proj_dim): they take the scale as conditioning instead.
        self.guidance_embedding_dim = pipe.unet.config.time_cond_proj_dim
        self._rows_cache: tuple[list[DenoisingState], dict] | None = None
        # ControlNets by name, applied per row (`control.py`); group_by_controlnets: only images with the same
        # units share a UNet call (to measure what mixing them saves).
        self.controlnets = dict(controlnets or {})
        self.control = ControlNetRows(self.controlnets, pipe.vae_scale_factor, self.device) if controlnets else None
        self.group_by_controlnets = group_by_controlnets

    @classmethod
    def model_options(cls, model) -> dict:
        return {
            "controlnets": model.controlnets,
            "group_by_controlnets": model.options.controlnet_batching == "grouped",
        }

    def group_key(self, task: ImageTask) -> tuple:
        """Tasks with different keys never share a UNet call: one latent shape (size) per call, and one adapter
        set (ControlNet set) when adapter sets (ControlNet sets) are kept apart."""
        p = task.params
        adapters = p.adapter_key if self.group_by_adapters else ()
        control = p.controlnet_key if self.group_by_controlnets else ()
        return (p.width, p.height, adapters, control)

    # -- what can be stepped ----------------------------------------------------------

    @staticmethod
    def unsupported_reason(pipe) -> str | None:
        """None if this pipeline can be stepped here; else why not, in one sentence (run it request-level)."""
        name = type(pipe).__name__
        if name not in STEPPABLE_PIPELINES:
            return (
                f"step-level batching is built over a text-to-image {' or '.join(STEPPABLE_PIPELINES)} "
                f"(img2img included), and {name} is neither"
            )
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(unet, "config") or not hasattr(unet.config, "time_cond_proj_dim"):
            return "its denoiser is not a UNet2DConditionModel"
        if unet.config.in_channels != pipe.vae.config.latent_channels and not reads_mask(pipe):
            return (
                f"its UNet takes {unet.config.in_channels} input channels, neither the VAE's "
                f"{pipe.vae.config.latent_channels} nor an inpainting model's (a depth or other conditioned model)"
            )
        if getattr(unet, "encoder_hid_proj", None) is not None:
            return "an IP-adapter is loaded, and its image embeddings are not replicated here"
        return None

    @staticmethod
    def unsupported_scheduler_reason(scheduler) -> str | None:
        """None if this scheduler instance can be stepped here; else why not."""
        missing = [m for m in ("set_timesteps", "scale_model_input", "step", "add_noise") if not hasattr(scheduler, m)]
        if missing:
            return f"{type(scheduler).__name__} has no {', '.join(missing)}"
        return None

    # -- start --------------------------------------------------------------------------

    def start_encoded(self, tasks: list[ImageTask], encoded: list, results: list) -> None:
        """States for checked tasks with their prompts encoded (`Stepper.start`), in cohorts: tasks in lockstep
        share a scheduler."""
        cohorts: dict[tuple, list[tuple[int, ImageTask, _Conditioning]]] = {}
        for index, (task, conditioning) in enumerate(zip(tasks, encoded)):
            if isinstance(conditioning, GenerationError):
                results[index] = conditioning
                continue
            try:
                key = self._cohort_key(task, index)
            except GenerationError as exc:
                results[index] = exc
                continue
            cohorts.setdefault(key, []).append((index, task, conditioning))
        for members in cohorts.values():
            for index, result in zip([m[0] for m in members], self._start_cohort(members)):
                results[index] = result

    def check_inputs(self, task: ImageTask) -> None:
        """What the pipeline's check_inputs (and the request-level engine) refuse, as a task error."""
        check_task(task, UNET, self.schedulers, int(self.pipe.vae_scale_factor), inpainting_model=self.reads_mask)
        check_names(task.params.controlnet, sorted(self.controlnets))

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Whether an image gets unconditional rows: diffusers' do_classifier_free_guidance."""
        return guidance_scale > 1 and self.guidance_embedding_dim is None

    def encode_prompts(self, tasks: list[ImageTask]) -> list[_Conditioning | GenerationError]:
        """Prompt embeddings for every task from one encode_prompt call; if that fails, one call per task,
        so that only a task whose prompt cannot be encoded fails."""
        return encode_each_alone_on_failure(tasks, self._encode_batch)

    def _encode_batch(self, tasks: list[ImageTask]) -> list[_Conditioning]:
        pipe = self.pipe
        guided = [self.uses_guidance(task.params.guidance_scale) for task in tasks]
        do_cfg = any(guided)
        prompts = [task.params.prompt for task in tasks]
        negatives = [task.params.negative_prompt for task in tasks]
        # All-empty negatives go as None, as the request-level engine passes them (SDXL then uses zeros).
        negative_prompt = negatives if any(negatives) else None
        adapters = self.adapters.applied([task.params.adapter_key for task in tasks])
        if self.is_sdxl:
            with adapters:
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    prompt=prompts,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg,
                    negative_prompt=negative_prompt,
                )
            # Mixed empty and non-empty negatives went through the text encoders together; an empty
            # one alone would have been zeros (force_zeros_for_empty_prompt): give it zeros.
            zero_empty = negative_prompt is not None and bool(pipe.config.force_zeros_for_empty_prompt)
        else:
            with adapters:
                cond, uncond = pipe.encode_prompt(prompts, self.device, 1, do_cfg, negative_prompt)
            pooled = uncond_pooled = None
            zero_empty = False
        encoded = []
        for i, (task, with_cfg) in enumerate(zip(tasks, guided)):
            row = slice(i, i + 1)
            item = _Conditioning(cond=cond[row], uncond=uncond[row] if with_cfg else None)
            if pooled is not None:
                item.pooled = pooled[row]
                item.uncond_pooled = uncond_pooled[row] if with_cfg else None
                if with_cfg and zero_empty and not task.params.negative_prompt:
                    item.uncond = torch.zeros_like(item.uncond)
                    item.uncond_pooled = torch.zeros_like(item.uncond_pooled)
            encoded.append(item)
        return encoded

    def _cohort_key(self, task: ImageTask, index: int) -> tuple:
        """Tasks with equal keys start in lockstep and may share a scheduler."""
        p = task.params
        if task.mask is not None:
            kind: tuple = ("inpaint", p.width, p.height, p.strength)
        elif task.init_latents is not None:
            kind = ("latents", tuple(task.init_latents.shape), p.strength)
        elif task.init_image is None:
            kind = ("txt2img", p.width, p.height)
        else:
            kind = ("img2img", task.init_image.shape, p.strength)
        scheduler_class = self._template(p.scheduler, p.num_inference_steps).__class__.__name__
        alone = None if scheduler_class in COHORT_SCHEDULERS else index
        return (p.scheduler, p.num_inference_steps, *kind, alone)

    def _template(self, name: str, steps: int):
        """The cached scheduler of `name` at `steps` (never stepped itself: cohorts step copies)."""
        template = self.schedulers.template(name, steps)
        reason = self.unsupported_scheduler_reason(template)
        if reason:
            raise InvalidTaskError(f"scheduler {name!r} cannot be used here: {reason}", "scheduler")
        return template

    def _start_cohort(self, members: list[tuple[int, ImageTask, _Conditioning]]) -> list:
        """States for tasks that share a cohort key; an error in place of any task that fails."""
        first = members[0][1]
        try:
            scheduler = copy.deepcopy(self._template(first.params.scheduler, first.params.num_inference_steps))
            timesteps = self.prepare_timesteps(scheduler, first)
        except GenerationError as exc:
            return [exc] * len(members)
        results: list = []
        states, latents = [], []
        for _, task, conditioning in members:
            try:
                generator = torch.Generator("cpu").manual_seed(task.params.seed)
                dtype = conditioning.cond.dtype
                masked = None
                if task.mask is not None:
                    image_latents, masked = self.prepare_masked_latents(scheduler, task, timesteps, dtype, generator)
                elif task.init_latents is not None:
                    image_latents = self.noise_latents(scheduler, task.init_latents, timesteps, dtype, generator)
                elif task.init_image is None:
                    image_latents = self.prepare_latents(
                        scheduler, task.params.width, task.params.height, dtype, generator
                    )
                else:
                    image_latents = self.prepare_image_latents(scheduler, task.init_image, timesteps, dtype, generator)
                if self.is_sdxl:
                    self.prepare_added_conditioning(task, conditioning, image_latents.shape)
                if self.guidance_embedding_dim is not None:
                    conditioning.timestep_cond = self.prepare_guidance_embedding(task.params.guidance_scale, dtype)
                control = self.control.prepare(task, conditioning.uncond is not None) if task.params.controlnet else []
            except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others
                results.append(start_failure(task, exc))
                continue
            state = DenoisingState(task, generator, conditioning)
            state.masked = masked
            state.control = control
            if self.group_by_controlnets:
                state.control_group = task.params.controlnet_key
            if self.group_by_adapters:
                state.adapter_group = task.params.adapter_key
            states.append(state)
            latents.append(image_latents)
            results.append(state)
        if states:
            if self.is_sdxl and first.kind == "txt2img" and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)  # StableDiffusionXLPipeline does this; StableDiffusionPipeline does not
            _Cohort(scheduler, timesteps, states, torch.cat(latents) if len(latents) > 1 else latents[0])
        return results

    def prepare_timesteps(self, scheduler, task: ImageTask) -> torch.Tensor:
        """The scheduler's timesteps (set by the template); for img2img, get_timesteps: start
        t_start * order steps in, with the scheduler's begin index set there."""
        timesteps = scheduler.timesteps
        if task.kind != "txt2img":
            t_start = image_to_image_start(task.params.num_inference_steps, task.params.strength)
            timesteps = timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps

    def prepare_latents(self, scheduler, width: int, height: int, dtype, generator) -> torch.Tensor:
        """Text-to-image: noise from the image's generator, scaled by the scheduler's initial sigma."""
        from diffusers.utils.torch_utils import randn_tensor

        factor = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, int(height) // factor, int(width) // factor)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    def prepare_image_latents(self, scheduler, init_image: np.ndarray, timesteps, dtype, generator) -> torch.Tensor:
        """Image-to-image: preprocess as a PIL image is, VAE-encode (sampling with the image's generator),
        scale, then noise to the first timestep."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor
        from PIL import Image

        vae = self.pipe.vae
        image = self.img2img.image_processor.preprocess(Image.fromarray(init_image))
        image = image.to(device=self.device, dtype=dtype)
        # SDXL's img2img encodes in float32 when a float16 VAE would overflow (force_upcast); SD's does
        # not. (The pipeline then casts the VAE to the prompt dtype; here it gets its own dtype back.)
        vae_dtype = vae.dtype
        upcast = self.is_sdxl and vae.config.force_upcast
        if upcast:
            image = image.float()
            if vae_dtype != torch.float32:
                vae.to(dtype=torch.float32)
        try:
            init_latents = retrieve_latents(vae.encode(image), generator=generator)
        finally:
            if upcast and vae_dtype != torch.float32:
                vae.to(dtype=vae_dtype)
        if self.is_sdxl:
            init_latents = init_latents.to(dtype)
            mean, std = _latents_mean_std(vae)
            if mean is not None:
                mean, std = mean.to(device=self.device, dtype=dtype), std.to(device=self.device, dtype=dtype)
                init_latents = (init_latents - mean) * vae.config.scaling_factor / std
            else:
                init_latents = vae.config.scaling_factor * init_latents
        else:
            init_latents = vae.config.scaling_factor * init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=self.device, dtype=dtype)
        return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(1))

    def prepare_masked_latents(
        self, scheduler, task: ImageTask, timesteps, dtype, generator
    ) -> tuple[torch.Tensor, MaskedRows]:
        """Inpainting: the inpaint pipeline's own helpers in its order (the generator draws: the image encoded,
        the noise, the masked image encoded): the image and mask preprocessed (cropped around the mask for
        "only masked"), the start latents (pure noise at strength 1), the mask at latent resolution, the
        image latents and the noise the unmasked area is re-noised from, the masked image's latents."""
        pipe, p = self.inpaint, task.params
        inputs = masked_inputs(task)
        resize_mode = "default" if inputs.crop is None else "fill"
        shape = {"height": p.height, "width": p.width, "crops_coords": inputs.crop, "resize_mode": resize_mode}
        init_image = pipe.image_processor.preprocess(inputs.image, **shape).to(dtype=torch.float32)
        pipe.scheduler = scheduler  # prepare_latents noises with the pipeline's scheduler
        blend = not self.reads_mask
        latents, noise, *image_latents = pipe.prepare_latents(
            1,
            self.latent_channels,
            p.height,
            p.width,
            dtype,
            self.device,
            generator,
            None,
            image=init_image,
            timestep=timesteps[:1].repeat(1),
            is_strength_max=p.strength == 1.0,
            return_noise=True,
            return_image_latents=blend,
        )
        mask_condition = pipe.mask_processor.preprocess(inputs.mask, **shape)
        masked_image = init_image * (mask_condition < 0.5)
        mask, masked_image_latents = pipe.prepare_mask_latents(
            mask_condition, masked_image, 1, p.height, p.width, dtype, self.device, generator, False
        )
        rows = MaskedRows(mask, image_latents[0] if blend else None, noise, masked_image_latents, inputs)
        return latents, rows

    def noise_latents(self, scheduler, latents: torch.Tensor, timesteps, dtype, generator) -> torch.Tensor:
        """Image-to-image from latents (hires fix's second phase from upscaled latents): the image-to-image
        pipelines take 4-channel latents as they are, then noise them to the first timestep."""
        from diffusers.utils.torch_utils import randn_tensor

        latents = latents.to(device=self.device, dtype=dtype)
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=dtype)
        return scheduler.add_noise(latents, noise, timesteps[:1].repeat(1))

    def prepare_added_conditioning(self, task: ImageTask, conditioning: _Conditioning, latents_shape) -> None:
        """SDXL: pooled text embeddings and size conditioning (img2img: its aesthetic-score variant)."""
        pipe = self.pipe
        dtype = conditioning.cond.dtype
        if pipe.text_encoder_2 is None:
            projection_dim = int(conditioning.pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        factor = pipe.vae_scale_factor
        size = (latents_shape[-2] * factor, latents_shape[-1] * factor)  # (height, width), as the pipelines derive it
        crop = (0, 0)
        if task.kind == "txt2img":
            time_ids = pipe._get_add_time_ids(size, crop, size, dtype=dtype, text_encoder_projection_dim=projection_dim)
            uncond_time_ids = time_ids
        else:
            # The img2img and inpaint pipelines' defaults: aesthetic_score 6.0, negative 2.5 (when the model asks).
            twin = self.inpaint if task.kind == "inpaint" else self.img2img
            time_ids, uncond_time_ids = twin._get_add_time_ids(
                size, crop, size, 6.0, 2.5, size, crop, size, dtype=dtype, text_encoder_projection_dim=projection_dim
            )
        conditioning.text_embeds = conditioning.pooled.to(self.device)
        conditioning.time_ids = time_ids.to(self.device)
        if conditioning.uncond is not None:
            conditioning.uncond_text_embeds = conditioning.uncond_pooled.to(self.device)
            conditioning.uncond_time_ids = uncond_time_ids.to(self.device)

    def prepare_guidance_embedding(self, guidance_scale: float, dtype) -> torch.Tensor:
        """For UNets with time_cond_proj_dim: the guidance scale as an embedding, per image."""
        scale = torch.tensor(guidance_scale - 1).repeat(1)
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=self.guidance_embedding_dim)
        return embedding.to(device=self.device, dtype=dtype)

    # -- step ---------------------------------------------------------------------------

    def step(self, states: list[DenoisingState]) -> list[GenerationError | None]:
        """Advance every state by one UNet evaluation, all in ONE UNet call; per state, None or its error.

        States must be unfinished and share a `shape_key`. If the UNet call itself raises
        (out of memory, say) no state has advanced, and the caller may retry with fewer.
        """
        check_step_batch(states)
        if not states:
            return []
        with torch.inference_mode():
            cohorts = self._cohorts_of(states)
            ordered = [state for cohort in cohorts for state in cohort.members]
            noise_pred = self.predict_noise(cohorts, ordered)
            errors = self._scheduler_steps(cohorts, noise_pred)
        by_state = {id(state): error for state, error in zip(ordered, errors)}
        return [by_state[id(state)] for state in states]

    def _cohorts_of(self, states: list[DenoisingState]) -> list[_Cohort]:
        """The cohorts to step, in order of first appearance; a cohort only partly here splits."""
        present: dict[int, tuple[_Cohort, list[DenoisingState]]] = {}
        for state in states:
            present.setdefault(id(state._cohort), (state._cohort, []))[1].append(state)
        cohorts = []
        for cohort, members in present.values():
            if len(members) != len(cohort.members):
                cohort = cohort.partition(members)
            cohorts.append(cohort)
        return cohorts

    def predict_noise(self, cohorts: list[_Cohort], ordered: list[DenoisingState]) -> torch.Tensor:
        """One UNet call; the guided noise prediction for each row of `ordered` (the cohorts' members)."""
        rows = self.rows_for(ordered, self._conditioning_rows)
        scaled = [cohort.scheduler.scale_model_input(cohort.latents, cohort.timestep) for cohort in cohorts]
        scaled = scaled[0] if len(scaled) == 1 else torch.cat(scaled)
        values = [cohort.timestep_value for cohort in cohorts for _ in cohort.members]
        guidance: GuidanceRows = rows["guidance"]
        # Rows: the unconditional ones of guided states, then the conditional ones of all states,
        # as the pipeline lays out cat([latents] * 2) beside cat([negative_embeds, prompt_embeds]).
        if guidance.count:
            model_input = torch.cat([scaled[guidance.index], scaled])
            values = [values[i] for i in guidance.positions] + values
        else:
            model_input = scaled
        t = torch.tensor(values, dtype=torch.float32, device=self.device)
        # ControlNet residuals of the rows inside their units' windows (None: no row is controlled this tick).
        control = None if self.control is None else self.control.residuals(ordered, guidance, model_input, t, rows)
        if self.reads_mask:
            # An inpainting UNet reads cat([scaled latents, mask, masked image latents]) per row.
            model_input = torch.cat([model_input, rows["mask_channels"]], dim=1)
        adapters = [state.task.params.adapter_key for state in ordered]
        with self.adapters.applied(adapters, row_tasks=guidance.positions + list(range(len(ordered)))):
            out = self.pipe.unet(
                model_input,
                t,
                encoder_hidden_states=rows["encoder_hidden_states"],
                timestep_cond=rows["timestep_cond"],
                cross_attention_kwargs=None,
                added_cond_kwargs=rows["added_cond_kwargs"],
                down_block_additional_residuals=None if control is None else control[0],
                mid_block_additional_residual=None if control is None else control[1],
                return_dict=False,
            )[0]
        return guidance.combine(out[: guidance.count], out[guidance.count :])

    def _conditioning_rows(self, ordered: list[DenoisingState]) -> dict:
        """Embeddings and added conditioning for the rows of these states (`rows_for` keeps them)."""
        guidance = GuidanceRows([s.guidance_scale if s.uses_guidance else None for s in ordered], self.device)
        guided_states = [ordered[i] for i in guidance.positions]
        rows: dict = {
            "guidance": guidance,
            "encoder_hidden_states": torch.cat([s.uncond for s in guided_states] + [s.cond for s in ordered]),
            "added_cond_kwargs": None,
            "timestep_cond": None,
        }
        if self.is_sdxl:
            rows["added_cond_kwargs"] = {
                "text_embeds": torch.cat(
                    [s.uncond_text_embeds for s in guided_states] + [s.text_embeds for s in ordered]
                ),
                "time_ids": torch.cat([s.uncond_time_ids for s in guided_states] + [s.time_ids for s in ordered]),
            }
        if self.guidance_embedding_dim is not None:
            rows["timestep_cond"] = torch.cat([s.timestep_cond for s in ordered])  # no guided rows here
        if self.reads_mask:
            extra = [torch.cat([s.masked.mask, s.masked.masked_image_latents], dim=1) for s in ordered]
            extra = extra[0] if len(extra) == 1 else torch.cat(extra)
            rows["mask_channels"] = torch.cat([extra[guidance.index], extra]) if guidance.count else extra
        return rows

    def _scheduler_steps(self, cohorts: list[_Cohort], noise_pred: torch.Tensor) -> list[GenerationError | None]:
        """Each cohort's scheduler step on its rows; errors per row of `noise_pred`."""
        errors: list[GenerationError | None] = []
        stepped: list[tuple[_Cohort, torch.Tensor, int]] = []
        offset = 0
        for cohort in cohorts:
            n = len(cohort.members)
            try:
                latents = cohort.scheduler.step(
                    noise_pred[offset : offset + n],
                    cohort.timestep,
                    cohort.latents,
                    **cohort.step_kwargs,
                    return_dict=False,
                )[0]
                if cohort.blends:
                    latents = cohort.blend(latents)
            except Exception as exc:  # noqa: BLE001 - one scheduler failing must not stop the others
                errors.extend([step_failure(cohort.members, exc)] * n)
            else:
                stepped.append((cohort, latents, len(errors)))
                errors.extend([None] * n)
            offset += n
        for cohort, latents, _ in stepped:
            cohort.latents = latents
            cohort.step_index += 1
        mark_non_finite(
            [state for cohort, _, _ in stepped for state in cohort.members],
            [latents for _, latents, _ in stepped],
            errors,
            [first + row for cohort, _, first in stepped for row in range(len(cohort.members))],
        )
        return errors

    # -- hires fix: the second phase ----------------------------------------------------

    def second_phase_steps(self, task: ImageTask) -> int:
        """UNet evaluations of a hires task's second pass (the image's progress counts both phases)."""
        second = second_phase_task(task, flow=False)
        p = second.params
        template = self._template(p.scheduler, p.num_inference_steps)
        return len(template.timesteps) - image_to_image_start(p.num_inference_steps, p.strength) * template.order

    def second_phase(self, states: list[DenoisingState]) -> list:
        """Hires fix: finished first passes upscaled (latents resized, or decoded, resized and encoded again by the
        start) and started again as image to image at the new size; per state its new state or its error."""
        from ..hires import upscale_latents, upscale_pixels, upscales_latents

        factor = int(self.pipe.vae_scale_factor)
        tasks: list[ImageTask | None] = [None] * len(states)
        by_pixels = [i for i, s in enumerate(states) if not upscales_latents(s.task.params.hires)]
        with torch.inference_mode():
            for i, state in enumerate(states):
                if i not in by_pixels:
                    p = state.task.params
                    width, height = p.hires.target_size(p.width, p.height)
                    latents = upscale_latents(state.latents, p.hires, width, height, factor)
                    tasks[i] = second_phase_task(state.task, flow=False, init_latents=latents)
        if by_pixels:
            images = self.decode([states[i] for i in by_pixels])
            for i, pixels in zip(by_pixels, images):
                p = states[i].task.params
                width, height = p.hires.target_size(p.width, p.height)
                upscaled = upscale_pixels(pixels, p.hires, width, height)
                tasks[i] = second_phase_task(states[i].task, flow=False, init_image=upscaled)
        return self.start(tasks)

    # -- preview ------------------------------------------------------------------------

    def preview(self, state: DenoisingState) -> bytes | None:
        """A PNG of the image's current latents at latent resolution (one eighth of the image's side),
        through a fixed linear map from latent channels to RGB: cheap (no VAE), roughly what the
        image is becoming. None for latent spaces the map does not know."""
        factors = _PREVIEW_FACTORS.get((self.is_sdxl, self.latent_channels))
        if factors is None:
            return None
        return latent_preview_png(state.latents[0], factors)

    # -- decode -------------------------------------------------------------------------

    def decode(self, states: list[DenoisingState]) -> list[np.ndarray]:
        """uint8 (height, width, 3) images of finished states: one VAE decode per latent shape."""
        images = decode_by_key(states, lambda group: self.decode_latents(_stacked_latents(group)))
        return pasted_back(states, images, lambda: self.inpaint.image_processor)

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """The pipeline's decode (safety checker and watermark included), then the engine's uint8 conversion."""
        pipe, vae = self.pipe, self.pipe.vae
        if not self.is_sdxl:
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = pipe.run_safety_checker(image, self.device, latents.dtype)
            do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
            return to_uint8(pipe.image_processor.postprocess(image, output_type="np", do_denormalize=do_denormalize))
        # SDXL: a float16 VAE that would overflow (force_upcast) decodes in float32.
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        try:
            mean, std = _latents_mean_std(vae)
            if mean is not None:
                mean, std = mean.to(latents.device, latents.dtype), std.to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return to_uint8(pipe.image_processor.postprocess(image, output_type="np"))


# Latent channels to RGB: the approximate linear maps that latent previewers commonly use for these
# latent spaces. A preview of the composition and colours, not of the image: only the VAE makes that.
_PREVIEW_FACTORS = {
    (False, 4): [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    (True, 4): [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
}


def image_to_image_start(steps: int, strength: float) -> int:
    """The UNet image-to-image pipelines' get_timesteps: steps skipped (times the scheduler's order) at `strength`."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def prepare_extra_step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """The pipelines' prepare_extra_step_kwargs: eta (their default, 0) and the generators, where this
    scheduler's step() takes them. A list draws each row from its own generator, as a pipeline call does."""
    accepted = _step_parameters(type(scheduler))
    kwargs: dict = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    return kwargs


def _stacked_latents(states: list[DenoisingState]) -> torch.Tensor:
    cohort = states[0]._cohort
    if len(states) == len(cohort.members) and all(s._cohort is cohort and s._row == i for i, s in enumerate(states)):
        return cohort.latents  # a whole cohort in row order: no copy
    return torch.cat([state.latents for state in states])


def _latents_mean_std(vae):
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)


def _per_image_tensors(scheduler, latents_shape: torch.Size, n: int) -> list[torch.Tensor]:
    """The scheduler's tensors shaped like the cohort's latents (attributes, and inside lists/tuples/dicts)."""
    found = []

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() == len(latents_shape) and value.shape[0] == n and value.shape[1:] == latents_shape[1:]:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for value in vars(scheduler).values():
        visit(value)
    return found


_STEP_PARAMETERS: dict[type, frozenset[str]] = {}


def _step_parameters(scheduler_class: type) -> frozenset[str]:
    if scheduler_class not in _STEP_PARAMETERS:
        _STEP_PARAMETERS[scheduler_class] = frozenset(inspect.signature(scheduler_class.step).parameters)
    return _STEP_PARAMETERS[scheduler_class]
