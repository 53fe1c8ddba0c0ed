"""LoadedModel: one loaded model, its defaults, its checks, and whole diffusers pipeline calls.

No Ray and no HTTP here. `prepare` fills a task's defaults and checks it against this model;
`generate` (the request engine, through `RequestEngine`) groups prepared tasks that can share a
pipeline call (`tasks.call_key`) and runs one call per group: a fresh scheduler, one generator per
image, the call, uint8 pixels. A group that runs out of device memory is split in halves and
retried before any task fails (`memory.py`). The step engine uses the same loaded pipeline through
a stepper (`steppers/`).

Every model belongs to a family (`families.py`: unet, sd3, flux), which says which samplers it
accepts, how large its images may be, how it reads prompts and how a request's guidance reaches
its pipeline:
  unet, sd3  `guidance_scale` > 1: classifier-free guidance with the negative prompt (empty if none).
  flux       `guidance_scale` is [dev]'s guidance embedding ([schnell] ignores it); the negative prompt
             is used only with `true_cfg_scale` > 1 (FluxPipeline's true CFG: a second transformer pass
             per step, against the negative prompt or, if none is given, the empty one).
SD3 and FLUX.1 read prompts through T5 at one `max_sequence_length` per model (PipelineOptions).

Calls never overlap: a diffusers pipeline keeps per-call state, and the model serialises calls with
a lock (the engine loop also runs them on a single worker thread).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import operator
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .adapters import AdapterSettings, LoraMixer
from .controlnets import (
    check_names,
    controlnet_call_arguments,
    controlnet_pipeline,
    load_controlnets,
    memory_bytes,
    prompt_mode,
)
from .errors import GenerationError, InvalidTaskError, PipelineUnavailableError
from .families import (
    FLUX,
    check_task,
    default_max_sequence_length,
    fallback_defaults,
    family_of,
    native_size,
    size_multiple,
    uses_true_cfg,
)
from .hires import second_phase_task, upscale_latents, upscale_pixels, upscales_latents
from .loading import ModelSource, PipelineOptions, image_to_image, inpainting, load_pipeline, load_refiner, reads_mask
from .masks import masked_inputs, overlay
from .memory import image_does_not_fit, in_halves_while_out_of_memory
from .params import REFINER_DENOISING_START, GenerationDefaults, ImageParams, RefinerParams
from .schedulers import SchedulerTemplates
from .tasks import ImageResult, ImageTask, group_by_call_key, to_uint8

logger = logging.getLogger(__name__)

# Called after each denoising step with (steps done, steps in all); returning True stops the call.
StepCallback = Callable[[int, int], bool]


@dataclass
class GroupRun:
    """What one pipeline call made."""

    images: list[np.ndarray]
    seconds: float


class LoadedModel:
    def __init__(
        self,
        pipe,
        source: ModelSource,
        options: PipelineOptions,
        defaults: GenerationDefaults,
        adapters: AdapterSettings | None = None,
        refiner: ModelSource | None = None,
        controlnets: dict | None = None,
        controlnet_sources: dict[str, str] | None = None,
    ):
        self.pipe = pipe
        # The ControlNets requests may name (`controlnets.py`), loaded with the model; their sources by name.
        self.controlnets = dict(controlnets or {})
        self.controlnet_sources = dict(controlnet_sources or {})
        self._controlled: dict[tuple, object] = {}  # diffusers' ControlNet pipelines over these modules, by net set
        self.refiner_source = refiner  # loaded on first use (`refiner`)
        self._refiner = None
        self.refiner_load_s: float | None = None
        self.source = source
        self.options = options
        self.defaults = defaults
        self.family = family_of(pipe)
        # Where the model computes (with CPU offload its weights live in CPU memory between uses).
        self.device = torch.device(pipe._execution_device)
        self.model_scheduler = pipe.scheduler  # every call and every stepped image gets a fresh copy
        self.max_sequence_length = resolve_max_sequence_length(pipe, source, options)
        self.size_multiple = size_multiple(pipe, self.family)
        self._img2img = None
        self._inpaint = None
        # An inpainting model (its UNet reads the mask): it takes image to image with a mask only.
        self.reads_mask = reads_mask(pipe)
        self._lock = threading.Lock()
        self._fatal_error: str | None = None
        self.adapter_settings = adapters or AdapterSettings()
        self.adapters = LoraMixer(pipe, self.adapter_settings.catalog(), self.adapter_settings.max_loaded)
        self.calls_by_batch_size: Counter[int] = Counter()
        self.schedulers = SchedulerTemplates(self.model_scheduler, self.device, family=self.family.name)
        # Tasks are checked on the caller's thread while the engine thread encodes prompts: a fast tokenizer
        # sets its padding and truncation per call, so the two must never share one (prompts came out
        # 10 tokens long instead of 77 under load). Prompts are counted in the tokens that bound them:
        # T5's where the model reads them through T5 (CLIP's 77 are only its pooled summary), else CLIP's.
        self._counting_tokenizer = copy.deepcopy(t5_tokenizer(pipe) or pipe.tokenizer)
        self._counting_lock = threading.Lock()
        # SDXL encodes an empty negative prompt as zeros, a non-empty one through the
        # text encoders: the two cannot share a call without changing the image.
        self._empty_negative_is_special = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))

    # -- construction -------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str,
        options: PipelineOptions | None = None,
        defaults: GenerationDefaults | None = None,
        adapters: AdapterSettings | None = None,
        refiner: str | None = None,
        controlnets: list | tuple = (),
    ) -> LoadedModel:
        """Load `model` (a model source string); `defaults` overrides what tasks get when they leave a parameter
        out; `adapters`: the LoRA adapters tasks may name; `refiner`: a refiner's model source (loaded when first used);
        `controlnets`: the ControlNets tasks may name (`controlnets.ControlNetEntry`), loaded now."""
        options = options or PipelineOptions()
        source = ModelSource.parse(model)
        started = time.perf_counter()
        pipe = load_pipeline(source, options)
        nets = load_controlnets(controlnets, pipe, options)
        logger.info("loaded %s on %s in %.1fs", source, pipe.device, time.perf_counter() - started)
        defaults = (defaults or GenerationDefaults()).over(model_defaults(pipe, source))
        return cls(
            pipe,
            source,
            options,
            defaults,
            adapters,
            ModelSource.parse(refiner) if refiner else None,
            controlnets=nets,
            controlnet_sources={entry.name: entry.source for entry in controlnets},
        )

    @property
    def img2img(self):
        """The image-to-image pipeline, sharing every module (and so all weights) with text-to-image."""
        if self._img2img is None:
            self._img2img = image_to_image(self.pipe)
        return self._img2img

    @property
    def inpaint(self):
        """The inpaint pipeline, sharing every module with text-to-image (the model's own for inpainting models)."""
        if self._inpaint is None:
            self._inpaint = inpainting(self.pipe)
        return self._inpaint

    @property
    def refiner(self):
        """The refiner's image-to-image pipeline, loaded on first use, sharing what it can with the base."""
        if self._refiner is None:
            started = time.perf_counter()
            self._refiner = load_refiner(self.refiner_source, self.options, self.pipe)
            self.refiner_load_s = time.perf_counter() - started
            logger.info("loaded refiner %s in %.1fs", self.refiner_source, self.refiner_load_s)
        return self._refiner

    @property
    def max_prompt_tokens(self) -> int:
        if t5_tokenizer(self.pipe) is not None:
            return int(self.max_sequence_length)
        return int(self.pipe.tokenizer.model_max_length)

    # -- the public calls ---------------------------------------------------------

    def generate(self, tasks: list[ImageTask]) -> list[ImageResult | GenerationError]:
        """An image, or the error that stopped it, for every task, in order: whole pipeline calls, one per
        group of tasks that can share one."""
        results: list[ImageResult | GenerationError | None] = [None] * len(tasks)
        ready: list[tuple[int, ImageTask, list[str]]] = []
        for index, task in enumerate(tasks):
            try:
                ready.append((index, *self.prepare(task)))
            except GenerationError as exc:
                results[index] = exc
        for group in self.groups([task for _, task, _ in ready]):
            members = [ready[i] for i in group]
            for (index, _, _), result in zip(members, self.run_prepared([(j, w) for _, j, w in members])):
                results[index] = result
        return results

    def groups(self, tasks: list[ImageTask]) -> list[list[int]]:
        """Indices of prepared `tasks` grouped so that each group can share one pipeline call."""
        return group_by_call_key(
            tasks,
            split_empty_negative=self._empty_negative_is_special,
            split_adapters=self.adapter_settings.batching == "grouped",
        )

    def run_prepared(
        self, members: list[tuple[ImageTask, list[str]]], on_step: StepCallback | None = None
    ) -> list[ImageResult | GenerationError]:
        """One group's prepared tasks (and their warnings) in one pipeline call, split in halves while the
        device runs out of memory. `on_step(step, total)` after each step; returning True stops the call."""
        return in_halves_while_out_of_memory(
            members,
            lambda part: self._run_members(part, on_step),
            alone_too_big=lambda member: [image_does_not_fit(member[0].params)],
            combine=operator.add,
            device=self.device,
        )

    def _run_members(
        self, members: list[tuple[ImageTask, list[str]]], on_step: StepCallback | None
    ) -> list[ImageResult | GenerationError]:
        tasks = [task for task, _ in members]
        try:
            run = self.run_group(tasks, on_step)
        except GenerationError as exc:
            return [exc] * len(members)
        except torch.OutOfMemoryError:
            raise  # split in halves by run_prepared
        except Exception as exc:  # noqa: BLE001 - an unexpected pipeline failure must reach every caller
            request_ids = sorted({task.request_id for task in tasks})
            logger.exception("pipeline call failed for a batch of %d (requests %s)", len(members), request_ids)
            self.note_failure(exc)
            return [GenerationError(f"image generation failed: {type(exc).__name__}")] * len(members)
        return [
            ImageResult(pixels, task.params, batch_size=len(tasks), generation_time_s=run.seconds, warnings=warnings)
            for pixels, (task, warnings) in zip(run.images, members)
        ]

    def note_failure(self, exc: Exception) -> None:
        """A CUDA error leaves the device unusable: fail the health check so Serve replaces the replica."""
        if self.device.type == "cuda" and "CUDA error" in str(exc):
            self._fatal_error = repr(exc)

    def prepare(self, task: ImageTask) -> tuple[ImageTask, list[str]]:
        """The task with defaults filled in, checked against this model; plus warnings for the caller."""
        task = task.with_defaults(self.defaults)
        params = task.params
        if params.refiner is not None:
            task = self._check_refiner(task)
            params = task.params
        check_task(task, self.family, self.schedulers, self.size_multiple, inpainting_model=self.reads_mask)
        check_names(params.controlnet, sorted(self.controlnets))
        unknown = sorted({lora.name for lora in params.loras} - set(self.adapters.catalog.names()))
        if unknown:
            available = ", ".join(self.adapters.catalog.names()) or "none"
            raise InvalidTaskError(f"unknown LoRA adapter {', '.join(unknown)}; available: {available}", "loras")
        warnings = []
        if self.family is FLUX and params.negative_prompt and not uses_true_cfg(params):
            warnings.append("negative_prompt was ignored: FLUX.1 reads a negative prompt only with true_cfg_scale > 1")
        for name, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
            with self._counting_lock:
                tokens = len(self._counting_tokenizer(text).input_ids)
            if tokens > self.max_prompt_tokens:
                warnings.append(
                    f"{name} has {tokens} tokens; the model reads the first {self.max_prompt_tokens}, the rest was ignored"
                )
        return task, warnings

    def _check_refiner(self, task: ImageTask) -> ImageTask:
        refiner = task.params.refiner
        if self.refiner_source is None:
            raise InvalidTaskError(f"model {self.source} has no refiner", "refiner")
        if task.init_image is not None:
            if refiner.denoising_start is not None:
                raise InvalidTaskError(
                    "image to image with the refiner runs at `strength`: leave denoising_start unset",
                    "refiner.denoising_start",
                )
            return task
        start = REFINER_DENOISING_START if refiner.denoising_start is None else refiner.denoising_start
        # Where diffusers splits the schedule: the base runs the timesteps at or above the cutoff.
        scheduler = self.schedulers.template(task.params.scheduler, task.params.num_inference_steps)
        cutoff = round(scheduler.config.num_train_timesteps * (1 - start))
        base_steps = int((scheduler.timesteps >= cutoff).sum())
        if not 0 < base_steps < len(scheduler.timesteps):
            raise InvalidTaskError(
                f"denoising_start {start} of {task.params.num_inference_steps} steps leaves the base or the refiner "
                "no step; raise num_inference_steps",
                "refiner.denoising_start",
            )
        params = task.params.model_copy(update={"refiner": RefinerParams(denoising_start=start)})
        return dataclasses.replace(task, params=params)

    def warmup(self) -> float:
        """Run one small call so the first real request does not pay for lazy initialisation."""
        started = time.perf_counter()
        steps = min(2, self.defaults.num_inference_steps)
        task = ImageTask(ImageParams(prompt="warm-up", seed=0, num_inference_steps=steps))
        if self.reads_mask:  # an inpainting model takes only tasks with a mask
            side = int(self.defaults.width or native_size(self.pipe))
            mask = np.zeros((side, side), dtype=np.uint8)
            mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
            task = dataclasses.replace(task, init_image=np.full((side, side, 3), 128, dtype=np.uint8), mask=mask)
        result = self.generate([task])[0]
        if isinstance(result, Exception):
            raise result
        return time.perf_counter() - started

    def check_health(self) -> None:
        """Raise if this engine can no longer make images (for Serve's health check)."""
        if self._fatal_error:
            raise PipelineUnavailableError(f"pipeline failed and needs a restart: {self._fatal_error}")
        # Probe the device only when idle: a probe behind a long batch would wait for it.
        if self.device.type == "cuda" and self._lock.acquire(blocking=False):
            try:
                torch.zeros(1, device=self.device).add_(1).item()
            except Exception as exc:  # noqa: BLE001 - any failure here means the device is gone
                self._fatal_error = repr(exc)
                raise PipelineUnavailableError(f"device {self.device} does not respond: {exc}") from exc
            finally:
                self._lock.release()

    def describe(self) -> dict:
        info = {
            "model": str(self.source),
            "pipeline": type(self.pipe).__name__,
            "device": str(self.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."),
            "family": self.family.name,
            "attention": self.options.attention,
            "defaults": self.defaults.model_dump(),
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_sequence_length": self.max_sequence_length,
            "schedulers": list(self.schedulers.names()),
            "image_to_image_schedulers": list(self.schedulers.names(image_to_image=True)),
            "default_scheduler": type(self.model_scheduler).__name__,
            "loras": self.adapters.describe(),
            "controlnets": self.describe_controlnets(),
            "refiner": None
            if self.refiner_source is None
            else {
                "model": str(self.refiner_source),
                "loaded": self._refiner is not None,
                "load_s": self.refiner_load_s,
            },
        }
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            info["gpu"] = {
                "name": torch.cuda.get_device_name(self.device),
                "memory_used_bytes": total - free,
                "memory_total_bytes": total,
                "memory_allocated_bytes": torch.cuda.memory_allocated(self.device),
                "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
            }
        return info

    def describe_controlnets(self) -> list[dict]:
        """The ControlNets this model serves: name, source and the bytes their weights take."""
        sizes = memory_bytes(self.controlnets)
        return [
            {"name": name, "source": self.controlnet_sources.get(name, ""), "memory_bytes": sizes[name]}
            for name in sorted(self.controlnets)
        ]

    # -- one pipeline call, in steps ----------------------------------------------

    def run_group(self, tasks: list[ImageTask], on_step: StepCallback | None = None) -> GroupRun:
        """One pipeline call for tasks that share a `call_key` (defaults already filled)."""
        first = tasks[0]
        if first.params.controlnet:
            return self._run_controlled(tasks, on_step)
        if first.params.refiner is not None:
            return self._run_refined(tasks, on_step)
        if first.params.hires is not None:
            return self._run_hires(tasks, on_step)
        if first.mask is not None:
            return self._run_inpaint(tasks, on_step)
        pipe = self.img2img if first.init_image is not None else self.pipe
        kwargs = self._call_arguments(tasks)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        started = time.perf_counter()
        output = self._call(pipe, kwargs, tasks, first.params.scheduler)
        return GroupRun(images=list(to_uint8(output.images)), seconds=time.perf_counter() - started)

    def _call(self, pipe, kwargs: dict, tasks: list[ImageTask], scheduler: str):
        """One whole pipeline call with a fresh `scheduler`, the tasks' adapters applied, never two at once."""
        with self._lock:
            pipe.scheduler = self.schedulers.fresh(scheduler)
            with torch.inference_mode(), self.adapters.applied([task.params.adapter_key for task in tasks]):
                output = pipe(**kwargs)
            self.calls_by_batch_size[len(tasks)] += 1
        return output

    def _run_controlled(self, tasks: list[ImageTask], on_step: StepCallback | None) -> GroupRun:
        """One call of diffusers' ControlNet pipeline (text or image to image) over this model's modules and the
        tasks' ControlNets (one, or a MultiControlNetModel of several), which the tasks share with their scales,
        windows and mode; each task its own control images. `control_mode` "prompt" scales the residuals by level
        through a hook (`controlnets.prompt_mode`); "control" is diffusers' guess mode."""
        first = tasks[0]
        units = first.params.controlnet
        nets = [self.controlnets[unit.name] for unit in units]
        image_to_image = first.init_image is not None
        key = (tuple(unit.name for unit in units), image_to_image)
        if key not in self._controlled:
            self._controlled[key] = controlnet_pipeline(self.pipe, nets, image_to_image)
        if len(units) > 1 and len(tasks) > 1 and self.pipe.unet.config.addition_embed_type is not None:
            # diffusers' SDXL multi-ControlNet pipelines take one set of control images per call: one task per call.
            runs = [self._run_controlled([task], on_step) for task in tasks]
            return GroupRun(images=[run.images[0] for run in runs], seconds=sum(run.seconds for run in runs))
        kwargs = self._call_arguments(tasks)
        control = controlnet_call_arguments(tasks, nets)
        kwargs["control_image" if image_to_image else "image"] = control.pop("images")
        # Always the task's size: the pipelines would default to the control image's.
        kwargs.update(control, width=first.params.width, height=first.params.height)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        started = time.perf_counter()
        scaled = prompt_mode(nets) if units[0].control_mode == "prompt" else contextlib.nullcontext()
        with scaled:
            output = self._call(self._controlled[key], kwargs, tasks, first.params.scheduler)
        return GroupRun(images=list(to_uint8(output.images)), seconds=time.perf_counter() - started)

    def _run_inpaint(self, tasks: list[ImageTask], on_step: StepCallback | None) -> GroupRun:
        """One inpaint pipeline call (`masks`: the filled image, the blurred mask, "only masked" as the pipeline's
        padding_mask_crop, one image per call), then paste-back over the input where asked."""
        first = tasks[0].params
        inputs = [masked_inputs(task) for task in tasks]
        kwargs = self._call_arguments(tasks)
        kwargs.update(
            image=[i.image for i in inputs], mask_image=[i.mask for i in inputs], width=first.width, height=first.height
        )
        cropped = inputs[0].crop is not None
        if cropped:  # the pipeline crops, repaints and pastes back itself (PIL images in, PIL images out)
            kwargs.update(image=inputs[0].image, mask_image=inputs[0].mask, padding_mask_crop=inputs[0].padding)
            kwargs["output_type"] = "pil"
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_callback(on_step)
        started = time.perf_counter()
        output = self._call(self.inpaint, kwargs, tasks, first.scheduler)
        if cropped:
            images = [np.asarray(image.convert("RGB")) for image in output.images]
        else:
            images = [
                overlay(i, pixels, self.inpaint.image_processor) if i.paste_back else pixels
                for i, pixels in zip(inputs, to_uint8(output.images))
            ]
        return GroupRun(images=images, seconds=time.perf_counter() - started)

    def _run_hires(self, tasks: list[ImageTask], on_step: StepCallback | None) -> GroupRun:
        """Hires fix as two plain pipeline calls (`hires.py`): text to image (latents, or pixels for the pixel
        upscalers), the upscale, image to image at the new size from the same seeds."""
        first = tasks[0].params
        hires = first.hires
        width, height = hires.target_size(first.width, first.height)
        latent = upscales_latents(hires)
        flow = self.family.reads_t5
        seconds = [second_phase_task(task, flow) for task in tasks]
        total = first.num_inference_steps + hires.second_pass(first.num_inference_steps)[1]
        done = [0]

        def progress(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
            done[0] += 1
            if on_step is not None and on_step(done[0], total):
                pipe._interrupt = True
            return callback_kwargs

        started = time.perf_counter()
        kwargs = {**self._call_arguments(tasks), "callback_on_step_end": progress}
        kwargs["output_type"] = "latent" if latent else "np"
        output = self._call(self.pipe, kwargs, tasks, first.scheduler)
        if latent:
            latents = output.images
            if self.family is FLUX:
                latents = self.pipe._unpack_latents(latents, first.height, first.width, self.pipe.vae_scale_factor)
            image = upscale_latents(latents, hires, width, height, int(self.pipe.vae_scale_factor))
        else:
            image = [upscale_pixels(pixels, hires, width, height) for pixels in to_uint8(output.images)]
            image = [Image.fromarray(pixels) for pixels in image]
        kwargs = {**self._call_arguments(seconds), "callback_on_step_end": progress}
        kwargs.update(image=image, strength=seconds[0].params.strength, width=width, height=height)
        if not flow:
            kwargs.pop("width"), kwargs.pop("height")  # the UNet image-to-image pipelines take the image's size
        output = self._call(self.img2img, kwargs, seconds, seconds[0].params.scheduler)
        return GroupRun(images=list(to_uint8(output.images)), seconds=time.perf_counter() - started)

    def _run_refined(self, tasks: list[ImageTask], on_step: StepCallback | None) -> GroupRun:
        """With the refiner: image to image by the refiner alone, or text to image as an ensemble of experts
        (the base denoises the first `denoising_start` of the schedule, the refiner the rest, from latents)."""
        first = tasks[0].params
        refiner = self.refiner
        kwargs = self._call_arguments(tasks)
        done = [0]  # steps of both pipelines so far: progress runs once over the whole schedule

        def progress(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
            done[0] += 1
            if on_step is not None and on_step(done[0], first.num_inference_steps):
                pipe._interrupt = True
            return callback_kwargs

        with self._lock:
            started = time.perf_counter()
            with torch.inference_mode(), self.adapters.applied([task.params.adapter_key for task in tasks]):
                refiner.scheduler = self.schedulers.fresh(first.scheduler)
                if tasks[0].init_image is not None:
                    output = refiner(**kwargs, callback_on_step_end=progress)
                else:
                    start = first.refiner.denoising_start
                    self.pipe.scheduler = self.schedulers.fresh(first.scheduler)
                    base = {**kwargs, "output_type": "latent", "denoising_end": start}
                    latents = self.pipe(**base, callback_on_step_end=progress).images
                    finish = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
                    output = refiner(**finish, image=latents, denoising_start=start, callback_on_step_end=progress)
            seconds = time.perf_counter() - started
            self.calls_by_batch_size[len(tasks)] += 1
        return GroupRun(images=list(to_uint8(output.images)), seconds=seconds)

    def _call_arguments(self, tasks: list[ImageTask]) -> dict:
        first = tasks[0].params
        negatives = [task.params.negative_prompt for task in tasks]
        kwargs = {
            "prompt": [task.params.prompt for task in tasks],
            # All-empty negatives go as None so SDXL keeps its zero embedding; elsewhere None == "".
            "negative_prompt": negatives if any(negatives) else None,
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            # CPU generators: the same seed gives the same latents on any device.
            "generator": [torch.Generator("cpu").manual_seed(task.seed) for task in tasks],
            "output_type": "np",
        }
        if self.family is FLUX:
            # FluxPipeline runs true CFG whenever it gets a negative prompt and true_cfg_scale > 1: the negative
            # goes only with the scale (an empty one stays "": true CFG against the empty prompt).
            if uses_true_cfg(first):
                kwargs.update(negative_prompt=negatives, true_cfg_scale=first.true_cfg_scale)
            else:
                kwargs["negative_prompt"] = None
        if self.family.reads_t5:
            kwargs["max_sequence_length"] = self.max_sequence_length
        if tasks[0].init_image is not None:
            kwargs["image"] = [Image.fromarray(task.init_image) for task in tasks]
            kwargs["strength"] = first.strength
            if self.family.reads_t5:
                # The flow image-to-image pipelines resize the init image to width x height, by default
                # (FLUX.1) to the model's native size: pass its own (the task's size, `with_defaults`).
                kwargs.update(width=first.width, height=first.height)
        else:
            kwargs["width"] = first.width
            kwargs["height"] = first.height
        return kwargs


def _step_callback(on_step: StepCallback):
    """diffusers' callback_on_step_end, reporting progress; setting `_interrupt` skips the remaining steps."""

    def callback(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if on_step(step_index + 1, pipe.num_timesteps):
            pipe._interrupt = True
        return callback_kwargs

    return callback


def model_defaults(pipe, source: ModelSource) -> GenerationDefaults:
    """What a task gets for parameters it leaves out, by the model: its preset, its native size, then its
    family's fallbacks (`families.fallback_defaults`)."""
    native = native_size(pipe)
    defaults = GenerationDefaults(width=native, height=native).over(fallback_defaults(pipe, family_of(pipe)))
    if source.kind == "synthetic":
        from .synthetic import load_preset

        defaults = GenerationDefaults(**load_preset(source.location).get("defaults", {})).over(defaults)
    return defaults


def resolve_max_sequence_length(pipe, source: ModelSource, options: PipelineOptions) -> int | None:
    """T5 tokens this model reads every prompt as: the options', else its synthetic preset's, else its
    family's default; None for models that do not read prompts through T5."""
    family = family_of(pipe)
    if not family.reads_t5:
        return None
    if options.max_sequence_length is not None:
        return options.max_sequence_length
    if source.kind == "synthetic":
        from .synthetic import load_preset

        preset = load_preset(source.location).get("max_sequence_length")
        if preset is not None:
            return int(preset)
    return default_max_sequence_length(pipe, family)


def t5_tokenizer(pipe):
    """The pipeline's T5 tokenizer (SD3: tokenizer_3, FLUX.1: tokenizer_2), or None (none loaded, or no T5)."""
    for name in ("tokenizer_3", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"), None)
        if tokenizer is not None and encoder is not None and type(encoder).__name__.startswith("T5"):
            return tokenizer
    return None
