"""Named samplers a request may ask for.

Torch-free at import time: the HTTP side reads the names (and their
AUTOMATIC1111 spellings) to validate requests without loading diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
