"""What every stepper shares: checking a task, encoding prompts so that one bad prompt fails alone,
the layout of guidance rows in a denoiser call, guidance per scale, the finite check after a step,
decoding by size, latent previews, and the no-adapters stand-in.

A stepper (one per denoiser family, see `steppers/__init__.py`) keeps this contract with `StepEngine`:
  start(tasks)    a state, or the error that stopped it, per task (defaults filled in; `families.check_task`)
  step(states)    advance each state one denoiser evaluation, all in one call; per state None or its error
  decode(states)  uint8 (height, width, 3) images of finished states
  preview(state)  a small PNG of its current latents, or None
  group_key(task) tasks whose keys differ never share a denoiser call
and its states have `.task`, `.done`, `.denoised`, `.error`, `.step_index`, `.total_steps`, `.rows`,
`.shape_key` and `.latents`. Masked images are ordinary states carrying `.masked` (`MaskedRows`); a stepper that
steps hires fix also has
  second_phase_steps(task)  denoiser evaluations of a hires task's second pass (its progress counts both)
  second_phase(states)      finished first passes upscaled and started again at the new size: new states
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..errors import GenerationError, InvalidTaskError
from ..loading import image_to_image, inpainting
from ..masks import MaskedInputs
from ..tasks import ImageTask

logger = logging.getLogger(__name__)

State = TypeVar("State")
Encoded = TypeVar("Encoded")


# -- what every stepper and state share --------------------------------------------------------


class SteppedImage:
    """What every stepper's state says of itself, from its `task`, `error`, `step_index` and `total_steps`."""

    def __repr__(self) -> str:
        status = "failed" if self.error else f"{self.step_index}/{self.total_steps}"
        return f"{type(self).__name__}(request_id={self.task.request_id!r}, {self.task.params.scheduler}, {status})"

    @property
    def denoised(self) -> bool:
        """Every step taken without error: ready to decode."""
        return self.error is None and self.step_index >= self.total_steps

    @property
    def done(self) -> bool:
        """Finished or failed: either way it takes no more steps."""
        return self.error is not None or self.step_index >= self.total_steps


class Stepper:
    """What every stepper does alike. A subclass sets `pipe`, `adapters`, `group_by_adapters`, `_img2img` and
    `_rows_cache`, and has `check_inputs(task)`, `encode_prompts(tasks)` and `start_encoded(tasks, encoded,
    results)`."""

    @classmethod
    def for_model(cls, model):
        """The stepper over a LoadedModel's pipeline, sharing its samplers and adapters (and `model_options`)."""
        return cls(
            model.pipe,
            model.schedulers,
            adapters=model.adapters,
            group_by_adapters=model.adapter_settings.batching == "grouped",
            **cls.model_options(model),
        )

    @classmethod
    def model_options(cls, model) -> dict:
        """Further constructor arguments a family's stepper takes from the model."""
        return {}

    @property
    def img2img(self):
        """The image-to-image pipeline over the same modules (its helpers only; never called whole here)."""
        if self._img2img is None:
            self._img2img = image_to_image(self.pipe)
        return self._img2img

    @property
    def inpaint(self):
        """The inpaint pipeline over the same modules (its helpers only; never called whole here). Its helpers
        noise with the pipeline's `scheduler`: set it to the image's before calling them."""
        if getattr(self, "_inpaint", None) is None:
            self._inpaint = inpainting(self.pipe)
        return self._inpaint

    def start(self, tasks: list[ImageTask]) -> list:
        """A state ready for its first step, or the error that stopped it, for every task, in order: each task
        checked (`check_inputs`) and its adapters loaded, the prompts of the others encoded together
        (`encode_prompts`), then their states made (`start_encoded`, the family's own part).

        `tasks` must have their defaults filled in (`ImageTask.with_defaults`).
        """
        results: list = [None] * len(tasks)
        valid: list[int] = []
        for index, task in enumerate(tasks):
            try:
                self.check_inputs(task)
                self.adapters.load({name for name, _ in task.params.adapter_key})
                valid.append(index)
            except GenerationError as exc:
                results[index] = exc
        with torch.inference_mode():
            admitted = [tasks[i] for i in valid]
            started: list = [None] * len(admitted)
            self.start_encoded(admitted, self.encode_prompts(admitted), started)
        for index, result in zip(valid, started):
            results[index] = result
        return results

    def rows_for(self, states: list, build: Callable[[list], dict]) -> dict:
        """`build(states)`: the conditioning rows of a call, kept while the same states are stepped together."""
        if self._rows_cache is not None:
            cached_states, cached = self._rows_cache
            if len(cached_states) == len(states) and all(a is b for a, b in zip(cached_states, states)):
                return cached
        rows = build(states)
        self._rows_cache = (list(states), rows)
        return rows


@dataclass
class MaskedRows:
    """One masked image's rows, as its inpaint pipeline prepares them: the mask at latent resolution (binarised,
    nearest-downsampled; FLUX.1: packed), the (filled) image's latents and the start noise the unmasked area is
    re-noised from (None for models whose denoiser reads the mask), the masked image's latents, and what the
    result is pasted back over."""

    mask: torch.Tensor
    image_latents: torch.Tensor | None
    noise: torch.Tensor
    masked_image_latents: torch.Tensor
    inputs: MaskedInputs


# -- start --------------------------------------------------------------------------------------


def encode_each_alone_on_failure(
    tasks: list[ImageTask], encode_batch: Callable[[list[ImageTask]], list[Encoded]]
) -> list[Encoded | GenerationError]:
    """`encode_batch(tasks)` (one text-encoder call for all); if that fails, one call per task, so that only
    a task whose prompt cannot be encoded fails (with field `prompt`)."""
    if not tasks:
        return []
    try:
        return encode_batch(tasks)
    except Exception as exc:  # noqa: BLE001 - find the task that broke the batch
        if len(tasks) == 1:
            logger.warning("could not encode the prompt of task %r: %r", tasks[0].request_id, exc)
            return [GenerationError(f"could not encode the prompt: {type(exc).__name__}: {exc}", "prompt")]
        logger.warning("batched prompt encoding failed (%r); encoding %d tasks one by one", exc, len(tasks))
        return [result for task in tasks for result in encode_each_alone_on_failure([task], encode_batch)]


def start_failure(task: ImageTask, exc: Exception) -> GenerationError:
    """The error a task gets when preparing its latents fails unexpectedly (logged; the others go on)."""
    if isinstance(exc, GenerationError):
        return exc
    logger.exception("could not start task %r", task.request_id)
    return GenerationError(f"image generation failed: {type(exc).__name__}: {exc}")


# -- step ---------------------------------------------------------------------------------------


def check_step_batch(states: Sequence) -> None:
    """What a stepper refuses to put in one denoiser call (the caller's bugs, as ValueErrors)."""
    for state in states:
        if state.done:
            raise ValueError(f"{state!r} is done; take it out of the batch")
    if len({state.shape_key for state in states}) > 1:
        raise ValueError("states with different shape_key cannot share a denoiser call; step them apart")
    if len({id(state) for state in states}) != len(states):
        raise ValueError("a state appears twice in one step")


def as_index(indices: list[int], device) -> slice | torch.Tensor:
    """A slice when the rows are contiguous (a view, no copy), else an index tensor."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, device=device)


class GuidanceRows:
    """Where the guided rows of a call are, and their scales.

    `guided` holds the positions (in `ordered`) of the states that take an unconditional row; their
    unconditional rows come in that order, before or beside the conditional rows of every state.
    Guidance is combined per distinct scale with the scale a Python float, as the pipelines write it
    (a tensor of scales would round differently in half precision).
    """

    def __init__(self, scales: list[float | None], device):
        self.positions = [i for i, scale in enumerate(scales) if scale is not None]
        self.count = len(self.positions)
        self.index = as_index(self.positions, device) if self.positions else None
        self.total = len(scales)
        by_scale: dict[float, list[tuple[int, int]]] = {}
        for uncond_row, position in enumerate(self.positions):
            by_scale.setdefault(float(scales[position]), []).append((uncond_row, position))
        self.groups = [
            (scale, as_index([u for u, _ in pairs], device), as_index([p for _, p in pairs], device))
            for scale, pairs in by_scale.items()
        ]

    def combine(self, uncond_out: torch.Tensor, cond_out: torch.Tensor) -> torch.Tensor:
        """The guided prediction for every row of `cond_out`: uncond + scale * (cond - uncond) for guided rows,
        the conditional prediction as is for the others."""
        groups = self.groups
        if len(groups) == 1 and isinstance(groups[0][2], slice) and groups[0][2] == slice(0, self.total):
            scale, uncond_rows, _ = groups[0]
            u = uncond_out[uncond_rows]
            return u + scale * (cond_out - u)  # everyone guided alike: the pipeline's expression, whole
        guided = cond_out.clone() if groups else cond_out
        for scale, uncond_rows, cond_rows in groups:
            u = uncond_out[uncond_rows]
            guided[cond_rows] = u + scale * (cond_out[cond_rows] - u)
        return guided


def mark_non_finite(states: Sequence, latents: Sequence[torch.Tensor], errors: list, first: Sequence[int]) -> None:
    """After a step: a state whose new latents hold NaN or infinity fails (its error also in `errors` at
    position `first[i]`), the others go on. One reduction and one device sync for the whole batch."""
    if not latents:
        return
    finite = torch.isfinite(latents[0] if len(latents) == 1 else torch.cat(latents)).flatten(1).all(1).tolist()
    for ok, state, position in zip(finite, states, first):
        if not ok:
            state.error = errors[position] = GenerationError(
                f"the latents became non-finite at step {state.step_index} of {state.total_steps} "
                "(numerical overflow); try another seed, scheduler or guidance scale"
            )


def step_failure(states: Sequence, exc: Exception, what: str = "scheduler step") -> GenerationError:
    """One state's (or cohort's) sampler failing fails those states only; the others go on."""
    logger.exception("%s failed for %s", what, list(states))
    error = GenerationError(f"denoising failed: {type(exc).__name__}: {exc}")
    for state in states:
        state.error = error
    return error


# -- decode and preview ------------------------------------------------------------------------


def decode_by_key(
    states: Sequence[State], decode_group: Callable[[list[State]], Sequence[np.ndarray]]
) -> list[np.ndarray]:
    """uint8 images of finished states, in order: one `decode_group` call (one VAE decode) per `shape_key`."""
    for state in states:
        if not state.denoised:
            raise ValueError(f"{state!r} is not finished; decode only finished states")
    images: list[np.ndarray | None] = [None] * len(states)
    groups: dict[tuple, list[int]] = {}
    for index, state in enumerate(states):
        groups.setdefault(state.shape_key, []).append(index)
    with torch.inference_mode():
        for indices in groups.values():
            for i, image in zip(indices, decode_group([states[i] for i in indices])):
                images[i] = image
    return images  # type: ignore[return-value]


def pasted_back(states: Sequence, images: list[np.ndarray], image_processor: Callable[[], object]) -> list[np.ndarray]:
    """The decoded images of masked states pasted over their inputs where `paste_back` or "only masked" asks
    (`masks.overlay`, the pipelines' `apply_overlay`); `image_processor()` gives the inpaint pipeline's."""
    from ..masks import overlay

    for index, state in enumerate(states):
        masked = getattr(state, "masked", None)
        if masked is not None and masked.inputs.paste_back:
            images[index] = overlay(masked.inputs, images[index], image_processor())
    return images


def latent_preview_png(latents: torch.Tensor, factors: list[list[float]], bias: list[float] | None = None) -> bytes:
    """A PNG of (C, h, w) latents at latent resolution through a fixed linear map from latent channels to RGB
    (the approximate maps latent previewers commonly use): cheap (no VAE), roughly what the image is becoming."""
    from PIL import Image

    with torch.inference_mode():
        rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), torch.tensor(factors))
        if bias is not None:
            rgb = rgb + torch.tensor(bias)
        pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- adapters -----------------------------------------------------------------------------------


class NoAdapters:
    """A pipeline served without LoRA adapters: a request naming one fails at admission."""

    def load(self, names) -> None:
        if names:
            raise InvalidTaskError("this model serves no LoRA adapters", "loras")

    def applied(self, per_task, row_tasks=None):
        return contextlib.nullcontext()
