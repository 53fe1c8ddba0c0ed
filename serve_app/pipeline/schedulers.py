"""Named samplers a request may ask for.

Torch-free at import time: the HTTP side reads the names (and their
AUTOMATIC1111 spellings) to validate requests without loading diffusers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import InvalidTaskError


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    a1111_name: str
    options: dict = field(default_factory=dict)


DEFAULT = "default"  # the model's own scheduler, as it ships

SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun"),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "pndm": SchedulerSpec("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC"),
    "lcm": SchedulerSpec("LCMScheduler", "LCM"),
}

SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT, *SCHEDULERS)
_BY_A1111_NAME = {spec.a1111_name.lower(): name for name, spec in SCHEDULERS.items()}


def a1111_name(name: str) -> str:
    """How AUTOMATIC1111 (and the `parameters` text SD tools read) calls one of our samplers."""
    return SCHEDULERS[name].a1111_name if name in SCHEDULERS else name


def from_a1111_name(sampler: str, karras: bool = False) -> str | None:
    """Our name for an AUTOMATIC1111 sampler name (or one of ours); None when unknown.
    `karras`: A1111's `scheduler: Karras`, for samplers that have a Karras variant."""
    key = sampler.strip().lower()
    if karras and f"{key} karras" in _BY_A1111_NAME:
        key = f"{key} karras"
    if key in _BY_A1111_NAME:
        return _BY_A1111_NAME[key]
    return key if key in SCHEDULER_NAMES else None


def make_scheduler(name: str, model_scheduler):
    """A fresh scheduler instance for one pipeline call.

    Schedulers keep per-call state (step index, timesteps), so every call gets
    its own. `model_scheduler` is the one the model shipped with: its config
    carries the training betas and prediction type every sampler must share.
    """
    if name == DEFAULT:
        return type(model_scheduler).from_config(model_scheduler.config)
    import diffusers

    spec = SCHEDULERS[name]
    return getattr(diffusers, spec.class_name).from_config(model_scheduler.config, **spec.options)


class SchedulerTemplates:
    """Fresh scheduler instances for one model, copied from ones built once.

    `from_config` costs about 1 ms (KDPM2's constructor 0.3 s: it sets 1000 timesteps), a copy a fifth
    of a millisecond. Every pipeline call and every stepped image gets its own copy: schedulers keep
    per-call state. Shared by the model's whole-pipeline calls and its stepper.
    """

    def __init__(self, model_scheduler, device=None, max_templates: int = 64):
        self.model_scheduler = model_scheduler  # its config carries what every sampler must share
        self.device = device
        self._max = max_templates
        self._templates: OrderedDict[tuple[str, int | None], object] = OrderedDict()

    def fresh(self, name: str):
        """A new instance of sampler `name`, timesteps not set (a whole pipeline call sets them)."""
        return copy.deepcopy(self.template(name))

    def with_timesteps(self, name: str, steps: int):
        """A new instance of sampler `name` with `steps` timesteps set on the model's device."""
        return copy.deepcopy(self.template(name, steps))

    def template(self, name: str, steps: int | None = None):
        """The cached instance itself (read it, never step it): `fresh` and `with_timesteps` copy it.
        A sampler that cannot run `steps` steps is an InvalidTaskError naming the field."""
        key = (name, steps)
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
            return template
        template = make_scheduler(name, self.model_scheduler)
        if steps is not None:
            try:
                template.set_timesteps(steps, device=self.device)  # retrieve_timesteps, with no custom timesteps
            except ValueError as exc:  # e.g. LCM refuses more steps than its original_inference_steps (50)
                raise InvalidTaskError(
                    f"scheduler {name!r} cannot run {steps} steps: {exc}", "num_inference_steps"
                ) from exc
        self._templates[key] = template
        while len(self._templates) > self._max:
            self._templates.popitem(last=False)
        return template
