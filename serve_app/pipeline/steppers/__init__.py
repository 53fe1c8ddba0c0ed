"""Steppers: the step engine's mechanics, one per denoiser family (start / step / decode / preview).

  unet.py    UNetStepper: SD 1.x/2.x and SDXL UNets (noise-prediction samplers, per-image scheduler cohorts)
  flow.py    FlowStepper: SD3 / SD3.5 and FLUX.1 transformers (flow matching: per-row sigma tables, one
             per-row Euler step, or a sampler instance per image for the multistep flow samplers)
  common.py  what they share, and the contract `StepEngine` relies on

Which stepper serves a model is its family's (`families.Family.stepper`, the one place a family is
added); `make_stepper` builds it, or says why the model runs whole pipeline calls instead.
"""

from __future__ import annotations

import importlib

from ..families import family_of


def stepper_class(family):
    """The stepper class of a family (`families.Family`), or None if it has none."""
    if family.stepper is None:
        return None
    module, name = family.stepper.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def make_stepper(model) -> tuple[object | None, str | None]:
    """(the stepper over a LoadedModel's pipeline, None), or (None, why it cannot be stepped)."""
    family = family_of(model.pipe)
    cls = stepper_class(family)
    if cls is None:
        return None, f"no stepper knows the {type(model.pipe).__name__} ({family.name} family)"
    reason = cls.unsupported_reason(model.pipe)
    if reason is not None:
        return None, reason
    return cls.for_model(model), None
