"""Step-level batching for flow-matching transformers: SD3 / SD3.5 and FLUX.1, one transformer call per tick.

The same contract as `UNetStepper` (see `common.py`), so the step engine, jobs, progress, previews and
cancellation work unchanged. `StableDiffusion3Pipeline`, `FluxPipeline` and their image-to-image twins
(diffusers 0.42) are taken apart into their named steps:

  start   check each task, encode prompts (one batched call per encoder pass), give each image its generator,
          its schedule (the pipeline's own recipe: SD3 `set_timesteps(n)` with its static shift; FLUX.1 sigmas
          `linspace(1, 1/n, n)` with `mu` from the image size, which [dev] shifts by), its start latents
          (img2img: the strength's tail of the schedule, the init image VAE-encoded and noised by
          `scale_noise`; FLUX.1: packed 2x2) and its guidance
  step    ONE transformer call over the rows of every given image, each row at its own timestep; then each
          image's sampler step on its rows
  decode  one VAE decode per size, with the VAE's scaling and shift factors (FLUX.1: unpacked first)

A row's state is an index into its own sigma table. The flow Euler step keeps no history, so images
need no cohorts: rows at any step, with any step count, sampler and guidance, share one call, and each
advances by `x + (sigma_next - sigma) * v`, computed as `FlowMatchEulerDiscreteScheduler.step` computes
it (in float32 from a 0-dim sigma difference, per distinct difference: bit-identical to one scheduler per
image on any device and dtype). The multistep flow samplers (flow_heun, flow_dpmpp_2m, flow_unipc) keep
history: each image has its own instance, stepped on its rows.

Guidance, as the pipelines define it:
  sd3   guidance_scale > 1: an unconditional row with the negative prompt (empty if none) in the same call,
        combined per image with its own scale. Skip-layer guidance (SD3.5) is not offered.
  flux  [dev] guidance_scale is the guidance embedding, per row; [schnell] has none. true_cfg_scale > 1:
        FluxPipeline's true CFG, the negative prompt's rows in a SECOND transformer call over just those
        images (FluxPipeline makes two calls, so an image alone is bit-identical to it).

One call holds one size (SD3 crops its position embedding to the call's size; FLUX.1 has one grid of
image ids per call: 128x64 and 64x128 images have equal packed shapes and different positions) and one
text length (the pipelines pass T5 no attention mask: `max_sequence_length` is fixed per model). So
`group_key` and `shape_key` hold width AND height, the text length, dtype and adapter group.

An image stepped alone equals the plain pipeline's for the same parameters and seed, bit for bit;
beside others it differs only as ordinary batching does (at most 1/255 per pixel). No Ray, no HTTP.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GenerationError
from ..families import FLUX, check_task, family_of, size_multiple, uses_true_cfg
from ..hires import second_phase_task
from ..masks import masked_inputs
from ..schedulers import SchedulerTemplates
from ..tasks import ImageTask, to_uint8
from .common import (
    GuidanceRows,
    MaskedRows,
    NoAdapters,
    SteppedImage,
    Stepper,
    as_index,
    check_step_batch,
    decode_by_key,
    encode_each_alone_on_failure,
    latent_preview_png,
    mark_non_finite,
    pasted_back,
    start_failure,
    step_failure,
)

logger = logging.getLogger(__name__)

# Pipeline classes whose __call__ this module replicates step by step (with their img2img variants).
STEPPABLE_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


@dataclass
class _Text:
    """One image's text conditioning: prompt embeddings (1, tokens, dim) and pooled ones (1, dim); the negative
    prompt's for images that take an unconditional row (SD3 CFG, FLUX.1 true CFG), else None."""

    cond: torch.Tensor
    pooled: torch.Tensor
    uncond: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


class FlowState(SteppedImage):
    """One image in flight on a flow-matching transformer. Created by `FlowStepper.start`, advanced by `step`."""

    def __init__(self, task: ImageTask, generator: torch.Generator, text: _Text, scale: float | None):
        self.task = task
        self.generator = generator  # CPU, seeded with task.seed: start noise, VAE sample
        self.cond, self.pooled = text.cond, text.pooled
        self.uncond, self.uncond_pooled = text.uncond, text.uncond_pooled
        # Classifier-free guidance scale (SD3: guidance_scale; FLUX.1: true_cfg_scale); None without guidance.
        self.guidance_scale = scale
        self.latents: torch.Tensor | None = None  # (1, 16, h, w) for SD3; (1, h*w/4, 64) packed for FLUX.1
        self.timesteps: torch.Tensor | None = None  # the ones it runs (img2img: the strength's tail)
        # Its schedule's whole sigma table (float32; shared, read-only, by images of the same schedule).
        self.sigmas: torch.Tensor | None = None
        self.first_sigma = 0  # index into `sigmas` of its first timestep (img2img: the tail's start)
        self.scheduler = None  # its own sampler instance, for samplers with history; None: the flow Euler step
        self.step_index = 0
        self.error: GenerationError | None = None
        self.shape_key: tuple = ()
        # Inpainting: its mask, image latents and start noise (packed for FLUX.1); None without a mask.
        self.masked: MaskedRows | None = None
        self._timestep_values: list[float] = []

    @property
    def total_steps(self) -> int:
        """Transformer evaluations it needs: len(timesteps) (flow Heun 2N-1)."""
        return len(self._timestep_values)

    @property
    def timestep_value(self) -> float:
        """Its current timestep as float32 gives it (SD3 embeds timesteps in float32; FLUX.1 casts them)."""
        return self._timestep_values[self.step_index]

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale is not None

    @property
    def rows(self) -> int:
        """Transformer rows it takes in a tick."""
        return 2 if self.uses_guidance else 1

    def set_schedule(self, timesteps: torch.Tensor, sigmas: torch.Tensor, first_sigma: int, scheduler=None) -> None:
        """Its timesteps, the sigma table they index from `first_sigma` on, and its own sampler instance (None:
        the flow Euler step, from the table)."""
        self.timesteps, self.sigmas, self.first_sigma, self.scheduler = timesteps, sigmas, first_sigma, scheduler
        self._timestep_values = timesteps.to(torch.float32).tolist()  # one device sync, at start

    @property
    def sigma_index(self) -> int:
        """Where in its sigma table its current step is (the Euler step goes from here to the next entry)."""
        return self.first_sigma + self.step_index


class FlowStepper(Stepper):
    """The mechanics of step-level batching over one loaded SD3 or FLUX.1 pipeline.

    Not thread-safe (neither is the pipeline): call from one thread at a time.
    """

    def __init__(
        self,
        pipe,
        schedulers: SchedulerTemplates | None = None,
        img2img_pipe=None,
        adapters=None,
        group_by_adapters: bool = False,
        max_sequence_length: int | None = None,
    ):
        reason = self.unsupported_reason(pipe)
        if reason:
            raise ValueError(f"{type(pipe).__name__} cannot be stepped: {reason}")
        self.pipe = pipe
        self.family = family_of(pipe)
        self.is_flux = self.family is FLUX
        self.device = pipe._execution_device
        self.schedulers = (
            schedulers
            if schedulers is not None
            else SchedulerTemplates(pipe.scheduler, self.device, family=self.family.name)
        )
        self._img2img = img2img_pipe
        self.adapters = adapters if adapters is not None else NoAdapters()
        self.group_by_adapters = group_by_adapters
        self.max_sequence_length = max_sequence_length or (512 if self.is_flux else 256)
        self.size_multiple = size_multiple(pipe, self.family)
        self.guidance_embeds = bool(self.is_flux and pipe.transformer.config.guidance_embeds)
        self._rows_cache: tuple[list[FlowState], dict] | None = None
        self._image_ids: dict[tuple[int, int], torch.Tensor] = {}  # FLUX.1: (height, width) -> its ids grid

    @classmethod
    def model_options(cls, model) -> dict:
        return {"max_sequence_length": model.max_sequence_length}  # one text length per model

    def group_key(self, task: ImageTask) -> tuple:
        """Tasks with different keys never share a transformer call: one width AND height per call (FLUX.1's
        packed 128x64 and 64x128 latents have equal shapes, different positions), one text length (fixed per
        model), one adapter set when adapter sets are kept apart."""
        p = task.params
        adapters = p.adapter_key if self.group_by_adapters else ()
        return (self.family.name, p.width, p.height, self.max_sequence_length, adapters)

    # -- what can be stepped ----------------------------------------------------------

    @staticmethod
    def unsupported_reason(pipe) -> str | None:
        """None if this pipeline can be stepped here; else why not, in one sentence (run it request-level)."""
        name = type(pipe).__name__
        if name not in STEPPABLE_PIPELINES:
            return (
                f"flow-matching step-level batching is built over a text-to-image {' or '.join(STEPPABLE_PIPELINES)} "
                f"(img2img included), and {name} is neither"
            )
        transformer, vae = pipe.transformer, pipe.vae
        packed = 4 if name == "FluxPipeline" else 1
        if transformer.config.in_channels != packed * vae.config.latent_channels:
            return (
                f"its transformer takes {transformer.config.in_channels} input channels, not "
                f"{packed} x the VAE's {vae.config.latent_channels} (a fill, control or inpainting model)"
            )
        if getattr(transformer, "encoder_hid_proj", None) is not None or getattr(transformer, "image_proj", None):
            return "an IP-adapter is loaded, and its image embeddings are not replicated here"
        if getattr(transformer, "is_cache_enabled", False):
            return "a transformer cache (first-block or similar) is enabled, and it assumes one trajectory per call"
        return None

    # -- start --------------------------------------------------------------------------

    def start_encoded(self, tasks: list[ImageTask], encoded: list, results: list) -> None:
        """States for checked tasks with their prompts encoded (`Stepper.start`): no cohorts, one state each."""
        for index, (task, text) in enumerate(zip(tasks, encoded)):
            results[index] = text if isinstance(text, GenerationError) else self._start_one(task, text)

    def check_inputs(self, task: ImageTask) -> None:
        """What the pipelines' check_inputs (and the request-level engine) refuse, as a task error."""
        check_task(task, self.family, self.schedulers, self.size_multiple)

    def guidance_scale(self, task: ImageTask) -> float | None:
        """Its classifier-free guidance scale, or None when it takes no unconditional row: SD3's
        do_classifier_free_guidance (guidance_scale > 1); FLUX.1's true CFG (true_cfg_scale > 1)."""
        p = task.params
        if self.is_flux:
            return float(p.true_cfg_scale) if uses_true_cfg(p) else None
        return float(p.guidance_scale) if p.guidance_scale > 1 else None

    def encode_prompts(self, tasks: list[ImageTask]) -> list[_Text | GenerationError]:
        """Text conditioning for every task from one batched encode; if that fails, one encode per task, so
        that only a task whose prompt cannot be encoded fails."""
        return encode_each_alone_on_failure(tasks, self._encode_batch)

    def _encode_batch(self, tasks: list[ImageTask]) -> list[_Text]:
        pipe, length = self.pipe, self.max_sequence_length
        guided = [self.guidance_scale(task) is not None for task in tasks]
        prompts = [task.params.prompt for task in tasks]
        keys = [task.params.adapter_key for task in tasks]
        if not self.is_flux:
            # SD3 encodes the negatives only when guiding (its encode_prompt defaults to guiding: say so).
            with self.adapters.applied(keys):
                cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=any(guided),
                    negative_prompt=[task.params.negative_prompt for task in tasks],
                    max_sequence_length=length,
                )
        else:
            with self.adapters.applied(keys):
                cond, pooled, _ = pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    device=self.device,
                    num_images_per_prompt=1,
                    max_sequence_length=length,
                )
            positions = [i for i, g in enumerate(guided) if g]
            uncond = uncond_pooled = None
            if positions:
                # FluxPipeline encodes the negatives in a second encode_prompt call: here, of the true-CFG tasks only.
                with self.adapters.applied([keys[i] for i in positions]):
                    uncond, uncond_pooled, _ = pipe.encode_prompt(
                        prompt=[tasks[i].params.negative_prompt for i in positions],
                        prompt_2=None,
                        device=self.device,
                        num_images_per_prompt=1,
                        max_sequence_length=length,
                    )
            # Row of each guided task among the negatives: SD3 encoded them all, FLUX.1 only the guided ones.
            uncond_rows = dict(zip(positions, range(len(positions))))
        texts = []
        for i, with_cfg in enumerate(guided):
            text = _Text(cond=cond[i : i + 1], pooled=pooled[i : i + 1])
            if with_cfg:
                j = uncond_rows[i] if self.is_flux else i
                text.uncond, text.uncond_pooled = uncond[j : j + 1], uncond_pooled[j : j + 1]
            texts.append(text)
        return texts

    def _start_one(self, task: ImageTask, text: _Text) -> FlowState | GenerationError:
        """Its schedule, its start latents and its keys; an error in place of a task that fails."""
        p = task.params
        try:
            generator = torch.Generator("cpu").manual_seed(p.seed)
            state = FlowState(task, generator, text, self.guidance_scale(task))
            template = self.schedulers.template(p.scheduler, p.num_inference_steps, self.image_seq_len(p))
            # The flow Euler step keeps no history: its images read the template's sigma table, shared.
            euler = type(template).__name__ == "FlowMatchEulerDiscreteScheduler" and not template.config.get(
                "stochastic_sampling", False
            )
            dtype = text.cond.dtype
            if task.init_image is None:
                scheduler = None if euler else copy.deepcopy(template)
                if scheduler is not None and self.is_flux and hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(0)  # FluxPipeline does this; StableDiffusion3Pipeline does not
                state.set_schedule(template.timesteps, template.sigmas, 0, scheduler)
                state.latents = self.prepare_latents(p.width, p.height, dtype, generator)
            else:
                scheduler = copy.deepcopy(template)  # its begin index places scale_noise's sigma
                timesteps, first = self.image_to_image_timesteps(scheduler, p.num_inference_steps, p.strength)
                state.set_schedule(timesteps, template.sigmas, first, None if euler else scheduler)
                if task.mask is not None:
                    state.latents, state.masked = self.prepare_masked_latents(
                        scheduler, task, timesteps, dtype, generator
                    )
                else:
                    state.latents = self.prepare_image_latents(scheduler, task.init_image, timesteps, dtype, generator)
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop the others
            return start_failure(task, exc)
        adapters = p.adapter_key if self.group_by_adapters else ()
        state.shape_key = (p.width, p.height, text.cond.shape[1], dtype, state.latents.device, adapters)
        return state

    def image_seq_len(self, params) -> int:
        """Latent patches of the image: FLUX.1's schedule shifts by it ([dev]); SD3's only when dynamic."""
        m = self.size_multiple
        return (params.height // m) * (params.width // m)

    @staticmethod
    def image_to_image_timesteps(scheduler, steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The flow image-to-image pipelines' get_timesteps: skip int(n - n * strength) steps (at least one
        step stays at any strength), with the scheduler's begin index set there. (timesteps, first sigma)"""
        init_timestep = min(steps * strength, steps)
        t_start = int(max(steps - init_timestep, 0))
        first = t_start * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        return scheduler.timesteps[first:], first

    def prepare_latents(self, width: int, height: int, dtype, generator) -> torch.Tensor:
        """Text-to-image: noise from the image's generator (unscaled: flow matching starts at sigma 1);
        FLUX.1 packs it 2x2."""
        from diffusers.utils.torch_utils import randn_tensor

        factor = int(self.pipe.vae_scale_factor)
        channels = int(self.pipe.vae.config.latent_channels)
        h, w = int(height) // factor, int(width) // factor
        latents = randn_tensor((1, channels, h, w), generator=generator, device=self.device, dtype=dtype)
        return self.pipe._pack_latents(latents, 1, channels, h, w) if self.is_flux else latents

    def prepare_image_latents(self, scheduler, init_image: np.ndarray, timesteps, dtype, generator) -> torch.Tensor:
        """Image-to-image: preprocess as a PIL image at its own size, VAE-encode (sampling with the image's
        generator), shift and scale, then `scale_noise` to the first timestep (FLUX.1: and pack)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents
        from diffusers.utils.torch_utils import randn_tensor
        from PIL import Image

        vae, height, width = self.pipe.vae, init_image.shape[0], init_image.shape[1]
        image = self.img2img.image_processor.preprocess(Image.fromarray(init_image), height=height, width=width)
        if self.is_flux:
            image = image.to(dtype=torch.float32)  # FluxImg2ImgPipeline, before prepare_latents casts it
        image = image.to(device=self.device, dtype=dtype)
        init_latents = retrieve_latents(vae.encode(image), generator=generator)
        init_latents = (init_latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = randn_tensor(init_latents.shape, generator=generator, device=self.device, dtype=dtype)
        latents = scheduler.scale_noise(init_latents, timesteps[:1].repeat(1), noise)
        if not self.is_flux:
            return latents.to(device=self.device, dtype=dtype)
        _, channels, h, w = latents.shape
        return self.pipe._pack_latents(latents, 1, channels, h, w)

    def prepare_masked_latents(self, scheduler, task: ImageTask, timesteps, dtype, generator) -> tuple:
        """Inpainting: the inpaint pipeline's own helpers in its order (the image encoded, the noise, the masked
        image encoded; FLUX.1 packs all three): the start latents, the mask at latent resolution, the image
        latents and noise the unmasked area is re-noised from after each step."""
        pipe, p = self.inpaint, task.params
        inputs = masked_inputs(task)
        shape = {"height": p.height, "width": p.width, "crops_coords": inputs.crop}
        shape["resize_mode"] = "default" if inputs.crop is None else "fill"
        init_image = pipe.image_processor.preprocess(inputs.image, **shape).to(dtype=torch.float32)
        pipe.scheduler = scheduler  # the pipelines' prepare_latents noise with it (scale_noise at its begin index)
        first = timesteps[:1].repeat(1)
        channels = int(self.pipe.vae.config.latent_channels)
        if self.is_flux:
            latents, noise, image_latents, _ = pipe.prepare_latents(
                init_image, first, 1, channels, p.height, p.width, dtype, self.device, generator
            )
        else:
            latents, noise, image_latents = pipe.prepare_latents(
                1, channels, p.height, p.width, dtype, self.device, generator, None, image=init_image, timestep=first,
                is_strength_max=p.strength == 1.0, return_noise=True, return_image_latents=True,
            )  # fmt: skip
        mask_condition = pipe.mask_processor.preprocess(inputs.mask, **shape)
        masked_image = init_image * (mask_condition < 0.5)
        if self.is_flux:
            mask, masked_image_latents = pipe.prepare_mask_latents(
                mask_condition, masked_image, 1, channels, 1, p.height, p.width, dtype, self.device, generator
            )
        else:
            mask, masked_image_latents = pipe.prepare_mask_latents(
                mask_condition, masked_image, 1, 1, p.height, p.width, dtype, self.device, generator, False
            )
        return latents, MaskedRows(mask, image_latents, noise, masked_image_latents, inputs)

    # -- step ---------------------------------------------------------------------------

    def step(self, states: list[FlowState]) -> list[GenerationError | None]:
        """Advance every state by one transformer evaluation, all in ONE transformer call (FLUX.1 true CFG: a
        second one over the images that use it); per state, None or its error.

        States must be unfinished and share a `shape_key`. If a transformer call itself raises (out of memory,
        say) no state has advanced, and the caller may retry with fewer.
        """
        check_step_batch(states)
        if not states:
            return []
        with torch.inference_mode():
            latents = torch.cat([state.latents for state in states]) if len(states) > 1 else states[0].latents
            velocity = self.predict_velocity(states, latents)
            return self._sampler_steps(states, latents, velocity)

    def predict_velocity(self, states: list[FlowState], latents: torch.Tensor) -> torch.Tensor:
        """The guided velocity for every row of `latents` (one row per state, in order)."""
        rows = self.rows_for(states, self._conditioning_rows)
        guidance: GuidanceRows = rows["guidance"]
        values = [state.timestep_value for state in states]
        keys = [state.task.params.adapter_key for state in states]
        if not self.is_flux:
            # SD3: the unconditional rows of guided states, then the conditional rows of all, in one call,
            # as the pipeline lays out cat([latents] * 2) beside cat([negative_embeds, prompt_embeds]).
            model_input = torch.cat([latents[guidance.index], latents]) if guidance.count else latents
            t = torch.tensor([values[i] for i in guidance.positions] + values, dtype=torch.float32, device=self.device)
            with self.adapters.applied(keys, row_tasks=guidance.positions + list(range(len(states)))):
                out = self.pipe.transformer(
                    hidden_states=model_input,
                    timestep=t,
                    encoder_hidden_states=rows["encoder_hidden_states"],
                    pooled_projections=rows["pooled_projections"],
                    return_dict=False,
                )[0]
            return guidance.combine(out[: guidance.count], out[guidance.count :])
        # FLUX.1: the timestep cast to the latents' dtype, then / 1000, as the pipeline passes it.
        t = torch.tensor(values, dtype=torch.float32, device=self.device).to(latents.dtype) / 1000
        h, w = states[0].task.params.height, states[0].task.params.width
        common = {"txt_ids": rows["txt_ids"], "img_ids": self._image_ids_for(h, w, latents.dtype), "return_dict": False}
        with self.adapters.applied(keys):
            cond_out = self.pipe.transformer(
                hidden_states=latents,
                timestep=t,
                guidance=rows["guidance_embedding"],
                pooled_projections=rows["pooled_projections"],
                encoder_hidden_states=rows["encoder_hidden_states"],
                **common,
            )[0]
        if not guidance.count:
            return cond_out
        # True CFG: the negative prompt's rows in a second call, as FluxPipeline makes a second call.
        embedding = rows["guidance_embedding"]
        with self.adapters.applied([keys[i] for i in guidance.positions]):
            uncond_out = self.pipe.transformer(
                hidden_states=latents[guidance.index],
                timestep=t[guidance.index],
                guidance=None if embedding is None else embedding[guidance.index],
                pooled_projections=rows["uncond_pooled"],
                encoder_hidden_states=rows["uncond_hidden_states"],
                **common,
            )[0]
        return guidance.combine(uncond_out, cond_out)

    def _conditioning_rows(self, states: list[FlowState]) -> dict:
        """Embeddings and guidance for the rows of these states (`rows_for` keeps them)."""
        guidance = GuidanceRows([state.guidance_scale for state in states], self.device)
        guided = [states[i] for i in guidance.positions]
        rows: dict = {"guidance": guidance}
        if not self.is_flux:
            rows["encoder_hidden_states"] = torch.cat([s.uncond for s in guided] + [s.cond for s in states])
            rows["pooled_projections"] = torch.cat([s.uncond_pooled for s in guided] + [s.pooled for s in states])
        else:
            rows["encoder_hidden_states"] = torch.cat([s.cond for s in states])
            rows["pooled_projections"] = torch.cat([s.pooled for s in states])
            if guided:
                rows["uncond_hidden_states"] = torch.cat([s.uncond for s in guided])
                rows["uncond_pooled"] = torch.cat([s.uncond_pooled for s in guided])
            rows["txt_ids"] = torch.zeros(states[0].cond.shape[1], 3, device=self.device, dtype=self._text_dtype())
            rows["guidance_embedding"] = (
                torch.tensor([float(s.task.params.guidance_scale) for s in states], device=self.device)
                if self.guidance_embeds
                else None
            )
        return rows

    def _text_dtype(self):
        encoder = self.pipe.text_encoder
        return encoder.dtype if encoder is not None else self.pipe.transformer.dtype  # FluxPipeline's txt_ids dtype

    def _image_ids_for(self, height: int, width: int, dtype) -> torch.Tensor:
        """FLUX.1's grid of image position ids for one size (one per call: every row of a call shares it)."""
        key = (height, width, dtype)
        if key not in self._image_ids:
            factor = int(self.pipe.vae_scale_factor) * 2
            self._image_ids[key] = self.pipe._prepare_latent_image_ids(
                1, height // factor, width // factor, self.device, dtype
            )
        return self._image_ids[key]

    def _sampler_steps(
        self, states: list[FlowState], latents: torch.Tensor, velocity: torch.Tensor
    ) -> list[GenerationError | None]:
        """Each state's sampler step on its row: the flow Euler step per distinct sigma difference, the others'
        own sampler instance; then the finite check. Per state, None or its error."""
        errors: list[GenerationError | None] = [None] * len(states)
        new = torch.empty_like(latents)
        euler: dict[tuple[int, int], list[int]] = {}  # (sigma table, index) -> rows: one sigma difference each
        for row, state in enumerate(states):
            if state.scheduler is None:
                euler.setdefault((id(state.sigmas), state.sigma_index), []).append(row)
                continue
            try:
                t = state.timesteps[state.step_index]
                new[row : row + 1] = state.scheduler.step(velocity[row : row + 1], t, state.latents, return_dict=False)[
                    0
                ]
            except Exception as exc:  # noqa: BLE001 - one sampler failing must not stop the others
                errors[row] = step_failure([state], exc)
        for rows in euler.values():
            # FlowMatchEulerDiscreteScheduler.step, literally: the sample upcast to float32, plus the 0-dim float32
            # sigma difference times the model output, cast back to the output's dtype (a 0-dim dt rounds in
            # half precision as the scheduler's does, on any device: no per-row dt tensor).
            sigmas, i = states[rows[0]].sigmas, states[rows[0]].sigma_index
            dt = sigmas[i + 1] - sigmas[i]
            index = as_index(rows, latents.device)
            v = velocity[index]
            new[index] = (latents[index].to(torch.float32) + dt * v).to(v.dtype)
        for row, state in enumerate(states):
            if state.masked is not None and errors[row] is None:
                new[row : row + 1] = self._blend(state, new[row : row + 1])
        stepped = [row for row in range(len(states)) if errors[row] is None]
        for row in stepped:
            states[row].latents = new[row : row + 1]
            states[row].step_index += 1
        mark_non_finite([states[r] for r in stepped], [new[r : r + 1] for r in stepped], errors, stepped)
        return errors

    # -- hires fix: the second phase ----------------------------------------------------

    def second_phase_steps(self, task: ImageTask) -> int:
        """Transformer evaluations of a hires task's second pass (the image's progress counts both phases)."""
        p = second_phase_task(task, flow=True).params
        template = self.schedulers.template(p.scheduler, p.num_inference_steps, self.image_seq_len(p))
        t_start = int(max(p.num_inference_steps - p.num_inference_steps * p.strength, 0))
        return len(template.timesteps) - t_start * template.order

    def second_phase(self, states: list[FlowState]) -> list:
        """Hires fix (pixel upscalers; `check_inputs` refuses the latent ones here): finished first passes decoded,
        resized and started again as image to image at the new size; per state its new state or its error."""
        from ..hires import upscale_pixels

        tasks = []
        for state, pixels in zip(states, self.decode(states)):
            p = state.task.params
            width, height = p.hires.target_size(p.width, p.height)
            upscaled = upscale_pixels(pixels, p.hires, width, height)
            tasks.append(second_phase_task(state.task, flow=True, init_image=upscaled))
        return self.start(tasks)

    @staticmethod
    def _blend(state: FlowState, latents: torch.Tensor) -> torch.Tensor:
        """After step `step_index`: the unmasked area replaced by the image latents noised to the next sigma
        (the image latents themselves after the last step), as the flow inpaint pipelines do: their
        `scale_noise` at the step index `step()` just advanced, here the image's own sampler's or, for the
        flow Euler step, the same expression over its sigma table."""
        rows = state.masked
        init = rows.image_latents
        if state.step_index < state.total_steps - 1:
            if state.scheduler is not None:
                t = state.timesteps[state.step_index + 1]
                init = state.scheduler.scale_noise(init, torch.tensor([t]), rows.noise)
            else:
                sigmas = state.sigmas.to(device=init.device, dtype=init.dtype)
                sigma = sigmas[[state.sigma_index + 1]].flatten()
                while len(sigma.shape) < len(init.shape):
                    sigma = sigma.unsqueeze(-1)
                init = sigma * rows.noise + (1.0 - sigma) * init
        return (1 - rows.mask) * init + rows.mask * latents

    # -- preview ------------------------------------------------------------------------

    def preview(self, state: FlowState) -> bytes | None:
        """A PNG of the image's current latents at latent resolution (one eighth of the image's side), through
        the linear map from the 16 latent channels to RGB that latent previewers use for SD3 / FLUX.1: cheap
        (no VAE), roughly what the image is becoming."""
        factors, bias = _PREVIEW_FACTORS["flux" if self.is_flux else "sd3"]
        latents = state.latents
        if self.is_flux:
            p = state.task.params
            latents = self.pipe._unpack_latents(latents, p.height, p.width, self.pipe.vae_scale_factor)
        if latents.shape[1] != len(factors):
            return None
        return latent_preview_png(latents[0], factors, bias)

    # -- decode -------------------------------------------------------------------------

    def decode(self, states: list[FlowState]) -> list[np.ndarray]:
        """uint8 (height, width, 3) images of finished states: one VAE decode per size (and, for SD3, per way
        of decoding), pasted back over their inputs where asked."""
        images = decode_by_key(states, self._decode_group)
        return pasted_back(states, images, lambda: self.inpaint.image_processor)

    def _decode_group(self, states: list[FlowState]) -> list[np.ndarray]:
        p = states[0].task.params
        images: list = [None] * len(states)
        # StableDiffusion3InpaintPipeline (diffusers 0.42) decodes without the VAE's shift factor: its masked
        # images are decoded as it decodes them, apart from the others.
        for shifted in (True, False):
            part = [i for i, s in enumerate(states) if self._decode_shifts(s) == shifted]
            if not part:
                continue
            latents = torch.cat([states[i].latents for i in part]) if len(part) > 1 else states[part[0]].latents
            for i, image in zip(part, self.decode_latents(latents, p.width, p.height, shift=shifted)):
                images[i] = image
        return images

    def _decode_shifts(self, state: FlowState) -> bool:
        return self.is_flux or state.masked is None

    def decode_latents(self, latents: torch.Tensor, width: int, height: int, shift: bool = True) -> np.ndarray:
        """The pipeline's decode (FLUX.1: unpacked first), then the engine's uint8 conversion. `shift`: add the
        VAE's shift factor (every pipeline but SD3's inpaint pipeline does)."""
        pipe, vae = self.pipe, self.pipe.vae
        if self.is_flux:
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor
        if shift:
            latents = latents + vae.config.shift_factor
        if self.is_flux:
            from diffusers.utils.torch_utils import get_module_execution_device

            latents = latents.to(get_module_execution_device(vae))
        image = vae.decode(latents, return_dict=False)[0]
        return to_uint8(pipe.image_processor.postprocess(image, output_type="np"))


# Latent channels to RGB (and a bias), the approximate linear maps latent previewers commonly use for the
# 16-channel VAE of SD3 and that of FLUX.1 (in the latents' scaled and shifted space, as the denoiser sees it).
_PREVIEW_FACTORS = {
    "sd3": (
        [
            [-0.0922, -0.0175, 0.0749],
            [0.0311, 0.0633, 0.0954],
            [0.1994, 0.0927, 0.0458],
            [0.0856, 0.0339, 0.0902],
            [0.0587, 0.0272, -0.0496],
            [-0.0006, 0.1104, 0.0309],
            [0.0978, 0.0306, 0.0427],
            [-0.0042, 0.1038, 0.1358],
            [-0.0194, 0.0020, 0.0669],
            [-0.0488, 0.0130, -0.0268],
            [0.0922, 0.0988, 0.0951],
            [-0.0278, 0.0524, -0.0542],
            [0.0332, 0.0456, 0.0895],
            [-0.0069, -0.0030, -0.0810],
            [-0.0596, -0.0465, -0.0293],
            [-0.1448, -0.1463, -0.1189],
        ],
        [0.2394, 0.2135, 0.1925],
    ),
    "flux": (
        [
            [-0.0346, 0.0244, 0.0681],
            [0.0034, 0.0210, 0.0687],
            [0.0275, -0.0668, -0.0433],
            [-0.0174, 0.0160, 0.0617],
            [0.0859, 0.0721, 0.0329],
            [0.0004, 0.0383, 0.0115],
            [0.0405, 0.0861, 0.0915],
            [-0.0236, -0.0185, -0.0259],
            [-0.0245, 0.0250, 0.1180],
            [0.1008, 0.0755, -0.0421],
            [-0.0515, 0.0201, 0.0011],
            [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749],
            [-0.1264, -0.0522, -0.1103],
            [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
}
