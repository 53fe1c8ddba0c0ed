"""Hires fix: an image made at its size, upscaled, then an image-to-image second pass at the new size.

The same image in two phases, AUTOMATIC1111's way (`params.HiresParams`):
  upscale        Latent* upscalers resize the first pass's final latents (`torch.nn.functional.interpolate`,
                 A1111's modes); Lanczos, Nearest and None decode them, resize the pixels with PIL and the second
                 pass encodes them again
  second pass    an image-to-image start on the upscaled image with a fresh generator from the SAME seed (A1111
                 reseeds), its own prompt and sampler if given, running exactly `steps` steps (the first pass's
                 when unset): the tail of a schedule of int(steps / min(denoising_strength, 0.999)) steps

Both engines make the same image: the request engine as two plain diffusers calls (text to image with
latent or pixel output, image to image), the step engine as a second phase of the same ticket at a new size
(`StepEngine`: progress and cancel span both phases). This module holds what both share.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .params import LATENT_UPSCALERS, PIXEL_UPSCALERS, HiresParams
from .tasks import ImageTask


def upscales_latents(hires: HiresParams) -> bool:
    return hires.upscaler in LATENT_UPSCALERS


def upscale_latents(latents, hires: HiresParams, width: int, height: int, scale_factor: int):
    """(B, C, h, w) latents resized to the second pass's latent size, as A1111's latent upscale modes do."""
    import torch

    mode, antialias = LATENT_UPSCALERS[hires.upscaler]
    size = (height // scale_factor, width // scale_factor)
    return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_pixels(pixels: np.ndarray, hires: HiresParams, width: int, height: int) -> np.ndarray:
    """A decoded first pass (uint8, height x width x 3) resized to the second pass's size with PIL."""
    from PIL import Image

    resample = getattr(Image.Resampling, PIXEL_UPSCALERS[hires.upscaler])
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=resample))


def second_pass_strength(length: int, run: int, flow: bool) -> float:
    """The image-to-image strength at which a pipeline of `length` steps runs exactly its last `run`: the UNet
    pipelines run int(length * strength) steps, the flow-matching ones length - int(length - length * strength)."""
    if run >= length:
        return 1.0
    strength = (run - 0.5) / length if flow else (run + 0.5) / length
    runs = length - int(length - length * strength) if flow else min(int(length * strength), length)
    assert runs == run, (length, run, strength)
    return strength


def second_phase_task(task: ImageTask, flow: bool, init_image=None, init_latents=None) -> ImageTask:
    """The second pass as an image-to-image task of its own: the new size, the schedule's length and the
    strength that runs exactly its steps, the second pass's prompts and sampler (empty or unset: the first's), no
    hires; starting from the
    upscaled `init_image` (pixels) or `init_latents`."""
    params = task.params
    hires = params.hires
    width, height = hires.target_size(params.width, params.height)
    length, run = hires.second_pass(params.num_inference_steps)
    second = params.model_copy(
        update={
            "width": width,
            "height": height,
            "prompt": hires.prompt or params.prompt,
            "negative_prompt": hires.negative_prompt or params.negative_prompt,
            "num_inference_steps": length,
            "strength": second_pass_strength(length, run, flow),
            "scheduler": hires.scheduler or params.scheduler,
            "hires": None,
        }
    )
    return dataclasses.replace(task, params=second, init_image=init_image, init_latents=init_latents)
