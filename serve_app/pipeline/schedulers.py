"""Named samplers a request may ask for, and how each model's are made.

Two kinds of sampler, for two kinds of model (`families.py`): noise-prediction
samplers for UNet models (`euler`, `dpmpp_2m`, ...) and flow-matching samplers
for SD3 / FLUX.1 transformers (`flow_euler`, ...). A sampler of one kind built
from the other kind's config runs, and makes a silently wrong image (an Euler
built from an SD3.5 config is an epsilon sampler), so a model accepts only its
kind (`SchedulerTemplates.check`), and `default` (the model's own) everywhere.

Each flow pipeline computes its schedule its own way, and so do the templates
here, by calling the pipeline module's own helpers: SD3 `set_timesteps(n)` with
its static shift (or `mu` from the image size when the config shifts dynamically);
FLUX.1 custom sigmas `linspace(1, 1/n, n)` plus `mu = calculate_shift(image_seq_len)`,
which [dev] uses (its schedule depends on the image size) and [schnell] ignores.

Torch-free at import time: the HTTP side reads the names (and their
AUTOMATIC1111 spellings) to validate requests without loading diffusers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidTaskError


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    a1111_name: str
    options: dict = field(default_factory=dict)
    kind: Literal["noise", "flow"] = "noise"  # noise-prediction samplers (UNets), or flow-matching ones


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
    # Flow matching (SD3 / FLUX.1). DPM++ and UniPC become flow samplers with flow sigmas and flow prediction,
    # shifted as the model's own scheduler shifts (`make_scheduler`). Which of these a model accepts, and for
    # which kind of task, is `SchedulerTemplates.names`: FlowMatchHeun takes no custom sigmas (not FLUX.1);
    # DPM++ on FLUX.1 needs its dynamic shifting ([dev], not [schnell]); DPM++ and UniPC have no
    # `scale_noise`, which the flow image-to-image pipelines noise the init image with (text to image only).
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", "Euler (flow)", kind="flow"),
    "flow_euler_karras": SchedulerSpec(
        "FlowMatchEulerDiscreteScheduler", "Euler Karras (flow)", {"use_karras_sigmas": True}, kind="flow"
    ),
    "flow_heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler", "Heun (flow)", kind="flow"),
    "flow_dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M (flow)",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
        kind="flow",
    ),
    "flow_unipc": SchedulerSpec(
        "UniPCMultistepScheduler",
        "UniPC (flow)",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction"},
        kind="flow",
    ),
}

# The UNet family's samplers (the noise-prediction ones, and the model's own).
SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT, *(name for name, spec in SCHEDULERS.items() if spec.kind == "noise"))
UNET_SCHEDULER_NAMES = SCHEDULER_NAMES
# The flow-matching families' samplers (SD3, FLUX.1), and the model's own.
FLOW_SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT, *(name for name, spec in SCHEDULERS.items() if spec.kind == "flow"))
# Every name a request may give; each model accepts its family's (`SchedulerTemplates.check`).
ALL_SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT, *SCHEDULERS)
_BY_A1111_NAME = {spec.a1111_name.lower(): name for name, spec in SCHEDULERS.items()}
# What AUTOMATIC1111's forks (Forge) mean by a sampler's plain name on a flow-matching model: its flow twin.
FLOW_TWINS = {"euler": "flow_euler", "heun": "flow_heun", "dpmpp_2m": "flow_dpmpp_2m", "unipc": "flow_unipc"}


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
    return key if key in ALL_SCHEDULER_NAMES else None


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
    scheduler_class = getattr(diffusers, spec.class_name)
    config, options = model_scheduler.config, dict(spec.options)
    if spec.kind == "flow":
        accepted = scheduler_class._get_init_keys(scheduler_class)
        if "flow_shift" in accepted:
            options["flow_shift"] = float(config.get("shift", 1.0))  # the model's static shift
        # Only what this class takes: the rest is ignored anyway, with a warning per template.
        config = {key: value for key, value in config.items() if key in accepted}
    return scheduler_class.from_config(config, **options)


FamilyName = Literal["unet", "sd3", "flux", "other"]


def set_timesteps_as_the_pipeline_does(
    scheduler, family: FamilyName, steps: int, image_seq_len: int | None = None, device=None
) -> None:
    """Set `steps` timesteps on `scheduler` exactly as the family's text-to-image pipeline sets them, calling
    the pipeline module's own helpers (`image_seq_len`: latent patches of the image, for the flow families)."""
    if family in ("unet", "other"):
        scheduler.set_timesteps(steps, device=device)  # retrieve_timesteps, with no custom timesteps
        return
    import numpy as np

    config = scheduler.config
    if family == "sd3":
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, steps, device, sigmas=None, **kwargs)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)


class SchedulerTemplates:
    """Fresh scheduler instances for one model, copied from ones built once; and which samplers it accepts.

    `from_config` costs about 1 ms (KDPM2's constructor 0.3 s: it sets 1000 timesteps), a copy a fifth
    of a millisecond. Every pipeline call and every stepped image gets its own copy: schedulers keep
    per-call state. Shared by the model's whole-pipeline calls and its stepper.
    """

    def __init__(self, model_scheduler, device=None, max_templates: int = 64, family: FamilyName = "unet"):
        self.model_scheduler = model_scheduler  # its config carries what every sampler must share
        self.device = device
        self.family = family
        self._max = max_templates
        self._templates: OrderedDict[tuple[str, int | None, int | None], object] = OrderedDict()
        self._names: dict[bool, tuple[str, ...]] = {}

    def names(self, image_to_image: bool = False) -> tuple[str, ...]:
        """The samplers this model accepts (for image-to-image tasks, if so): its family's kind, those whose
        schedule its pipeline can set, and for image to image those that can noise the init image."""
        if image_to_image not in self._names:
            self._names[image_to_image] = tuple(
                name for name in self._family_names() if self._accepts(name, image_to_image)
            )
        return self._names[image_to_image]

    def _family_names(self) -> tuple[str, ...]:
        return {"unet": SCHEDULER_NAMES, "sd3": FLOW_SCHEDULER_NAMES, "flux": FLOW_SCHEDULER_NAMES}.get(
            self.family, (DEFAULT,)
        )

    def _accepts(self, name: str, image_to_image: bool) -> bool:
        if self.family in ("unet", "other"):
            return True  # every noise sampler runs both kinds (the stepper refuses what it cannot step)
        try:
            template = self.template(name, 4, image_seq_len=256)
        except InvalidTaskError:
            return False
        return not image_to_image or hasattr(template, "scale_noise")  # flow img2img noises with scale_noise

    def check(self, name: str, image_to_image: bool = False) -> None:
        """An InvalidTaskError naming the field `scheduler` (and the samplers this model accepts) unless
        sampler `name` can run this kind of task on this model."""
        accepted = self.names(image_to_image)
        if name in accepted:
            return
        if name not in ALL_SCHEDULER_NAMES:
            problem = f"unknown scheduler {name!r}"
        elif image_to_image and name in self.names(False):
            problem = f"scheduler {name!r} cannot do image to image on this model (it cannot noise the init image)"
        else:
            problem = f"scheduler {name!r} is not a sampler for this model ({self.family} family)"
        kind = " for image to image" if image_to_image else ""
        raise InvalidTaskError(f"{problem}; choose one of{kind}: {', '.join(accepted)}", "scheduler")

    def fresh(self, name: str):
        """A new instance of sampler `name`, timesteps not set (a whole pipeline call sets them)."""
        return copy.deepcopy(self.template(name))

    def with_timesteps(self, name: str, steps: int, image_seq_len: int | None = None):
        """A new instance of sampler `name` with `steps` timesteps set on the model's device, as its pipeline
        sets them (`image_seq_len`: the image's latent patches; flow families' schedules may depend on it)."""
        return copy.deepcopy(self.template(name, steps, image_seq_len))

    def template(self, name: str, steps: int | None = None, image_seq_len: int | None = None):
        """The cached instance itself (read it, never step it): `fresh` and `with_timesteps` copy it.
        A sampler that cannot run `steps` steps is an InvalidTaskError naming the field."""
        if self.family in ("unet", "other") or steps is None:
            image_seq_len = None  # the schedule does not depend on the size: one template for every size
        key = (name, steps, image_seq_len)
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
            return template
        template = make_scheduler(name, self.model_scheduler)
        if steps is not None:
            try:
                set_timesteps_as_the_pipeline_does(template, self.family, steps, image_seq_len, self.device)
            except ValueError as exc:  # e.g. LCM refuses more steps than its original_inference_steps (50)
                raise InvalidTaskError(
                    f"scheduler {name!r} cannot run {steps} steps: {exc}", "num_inference_steps"
                ) from exc
            except (AssertionError, TypeError) as exc:  # a flow pipeline's schedule this sampler cannot take
                raise InvalidTaskError(
                    f"scheduler {name!r} cannot run this model's schedule: {type(exc).__name__} {exc}", "scheduler"
                ) from exc
        self._templates[key] = template
        while len(self._templates) > self._max:
            self._templates.popitem(last=False)
        return template
