"""ControlNets: where they come from, what a task may ask of them, and diffusers' ControlNet pipelines over a model.

A model serves the ControlNets its config lists (`controlnets: [{name, source}]`), loaded once with the model on
every replica. A source is a Hugging Face repo id, a local diffusers directory, or `synthetic[:seed]`: a random
ControlNet built offline from the model's own UNet (`ControlNetModel.from_unet`, whose zero convolutions would
change nothing) with its zero convolutions and conditioning embedding drawn from the seed, so that tests and the
offline demo see a map move the image.

A task names its units in `params.controlnet` and carries one control image per unit (`ImageTask.control_images`,
preprocessed and at the output size by the time it gets here). Both engines make the same image:
  request  one call of `StableDiffusion(XL)ControlNet(Img2Img)Pipeline` over the model's own modules, per group of
           tasks with the same units (one ControlNet, or diffusers' `MultiControlNetModel` for several)
  step     `steppers/control.py`: each tick one call per ControlNet over the rows that use it, per-row scales, the
           residuals summed into the one UNet call

Torch-free at import: the ingress validates configs and lists ControlNets without torch.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidTaskError
from .params import ControlNetName

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ControlNetSource:
    kind: Literal["synthetic", "hub", "local"]
    location: str  # the seed, a repo id or a directory

    @classmethod
    def parse(cls, text: str) -> ControlNetSource:
        text = text.strip()
        if text == "synthetic" or text.startswith("synthetic:"):
            seed = text.removeprefix("synthetic").removeprefix(":") or "0"
            if not seed.isdigit():
                raise ValueError(f"ControlNet source {text!r}: synthetic takes a seed, synthetic:<integer>")
            return cls("synthetic", seed)
        if text.startswith("hf:"):
            return cls("hub", text.removeprefix("hf:"))
        if text.startswith(("/", "./", "../", "~")) or Path(text).is_dir():
            path = Path(text).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"ControlNet directory {text!r} has no config.json: not a diffusers ControlNetModel")
            return cls("local", str(path.resolve()))
        if _HUB_ID.match(text):
            return cls("hub", text)
        raise ValueError(
            f"cannot read ControlNet source {text!r}: use 'synthetic' or 'synthetic:<seed>', a Hugging Face repo id "
            "('owner/name' or 'hf:owner/name') or a path to a diffusers ControlNet directory"
        )

    def __str__(self) -> str:
        return {"synthetic": "synthetic:", "hub": "hf:", "local": ""}[self.kind] + self.location


class ControlNetEntry(BaseModel):
    """One entry of a model's `controlnets`: a ControlNet requests name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ControlNetName
    source: str = Field(
        ...,
        description="synthetic or synthetic:<seed> (random weights fitted to the model's UNet, offline), a Hugging "
        "Face repo id, or a diffusers ControlNet directory",
    )

    @field_validator("source")
    @classmethod
    def _readable(cls, value: str) -> str:
        ControlNetSource.parse(value)
        return value


def describe_entries(entries: list[ControlNetEntry] | tuple) -> list[dict]:
    return [{"name": entry.name, "source": str(ControlNetSource.parse(entry.source))} for entry in entries]


# -- what a task may ask ------------------------------------------------------------------------


def check_control(task, family_name: str) -> None:
    """What every engine refuses of a task's ControlNet units (defaults filled in): a family without ControlNets, a
    control image per unit of the output's size and RGB uint8, and the edits they do not combine with. The names
    are checked against the model's ControlNets by `LoadedModel.prepare`."""
    import numpy as np

    units = task.params.controlnet
    if not units:
        if task.control_images:
            raise InvalidTaskError("control images came without ControlNet units to use them", "controlnet")
        return
    if family_name != "unet":
        raise InvalidTaskError(
            f"ControlNets apply to UNet models (SD 1.x/2.x, SDXL); this model ({family_name} family) takes none",
            "controlnet",
        )
    if len(task.control_images) != len(units):
        raise InvalidTaskError(
            f"{len(units)} ControlNet units and {len(task.control_images)} control images: send one image per unit",
            "controlnet",
        )
    p = task.params
    for index, image in enumerate(task.control_images):
        field = f"controlnet.{index}.image"
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise InvalidTaskError(f"{field}: must be an RGB uint8 array (height, width, 3)", field)
        if image.shape[:2] != (p.height, p.width):
            raise InvalidTaskError(
                f"{field}: is {image.shape[1]}x{image.shape[0]} pixels and the image {p.width}x{p.height}: "
                "a control image has the output's size",
                field,
            )
    refuse_combinations(p, task.mask is not None)


def refuse_combinations(params, has_mask: bool) -> None:
    """ControlNet units with what they do not combine with here (inpainting, hires fix, the refiner): a 422
    naming the other field."""
    if not params.controlnet:
        return
    for name, why in (
        ("mask", has_mask and "inpainting"),
        ("hires", params.hires is not None and "hires fix"),
        ("refiner", params.refiner is not None and "the refiner"),
    ):
        if why:
            raise InvalidTaskError(f"ControlNet units do not combine with {why} here; send one or the other", name)


def check_names(units, available: list[str]) -> None:
    """Every unit names one of `available` (the model's ControlNets); 422 naming the unit and listing them."""
    for index, unit in enumerate(units):
        if unit.name not in available:
            raise InvalidTaskError(
                f"unknown ControlNet {unit.name!r}; this model's: {', '.join(available) or 'none'}",
                f"controlnet.{index}.name",
            )


# -- loading --------------------------------------------------------------------------------------


def load_controlnets(entries, pipe, options) -> dict:
    """The ControlNets of `entries` for `pipe` (a UNet model), on its execution device in its UNet's dtype, in
    eval mode; each checked against the UNet it steers."""
    if not entries:
        return {}
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(
            f"controlnets apply to UNet models (SD 1.x/2.x, SDXL); {type(pipe).__name__} has a transformer: "
            "FLUX.1 and SD3 ControlNets are not offered"
        )
    device = pipe._execution_device
    nets = {}
    for entry in entries:
        source = ControlNetSource.parse(entry.source)
        if source.kind == "synthetic":
            net = synthetic_controlnet(unet, int(source.location))
        else:
            net = _from_pretrained(source, options, unet.dtype)
        if net.dtype != unet.dtype:  # (a no-op cast warns about modules kept in float32)
            net = net.to(dtype=unet.dtype)
        net = net.to(device).eval()
        _check_fits(entry.name, net, unet)
        nets[entry.name] = net
    return nets


def _from_pretrained(source: ControlNetSource, options, dtype):
    from diffusers import ControlNetModel

    kwargs = {"torch_dtype": dtype, "cache_dir": options.cache_dir, "local_files_only": options.local_files_only}
    try:
        return ControlNetModel.from_pretrained(source.location, **kwargs)
    except OSError as exc:
        raise ValueError(f"cannot load ControlNet {source}: {exc}") from exc


def _check_fits(name: str, net, unet) -> None:
    config, unet_config = net.config, unet.config
    if tuple(config.block_out_channels) != tuple(unet_config.block_out_channels) or (
        config.cross_attention_dim != unet_config.cross_attention_dim
    ):
        raise ValueError(
            f"ControlNet {name!r} does not fit this model's UNet (block_out_channels {list(config.block_out_channels)} "
            f"vs {list(unet_config.block_out_channels)}, cross_attention_dim {config.cross_attention_dim} vs "
            f"{unet_config.cross_attention_dim}): an SD 1.5 ControlNet steers SD 1.5 models, an SDXL one SDXL models"
        )
    if config.global_pool_conditions:
        raise ValueError(f"ControlNet {name!r} pools its conditions globally (a shuffle ControlNet): not offered here")


def synthetic_controlnet(unet, seed: int):
    """A ControlNet of `unet`'s architecture (its encoder's weights, as `ControlNetModel.from_unet` copies them)
    whose zero convolutions and conditioning embedding are drawn from `seed` (He-normal weights and biases), so
    that it moves the image; the same seed gives the same ControlNet in every process."""
    import torch
    from diffusers import ControlNetModel

    with torch.device("cpu"):
        net = ControlNetModel.from_unet(unet)
    generator = torch.Generator("cpu").manual_seed(seed)
    drawn = [net.controlnet_cond_embedding, *net.controlnet_down_blocks, net.controlnet_mid_block]
    with torch.no_grad():
        for module in drawn:
            for conv in module.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    fan_in = conv.weight[0].numel()
                    std = (2.0 / fan_in) ** 0.5
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
                    if conv.bias is not None:
                        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * std)
    return net.eval()


def memory_bytes(nets: dict) -> dict[str, int]:
    """Bytes of each ControlNet's weights (what it adds to the model's memory)."""
    return {name: sum(p.numel() * p.element_size() for p in net.parameters()) for name, net in nets.items()}


# -- the request engine: diffusers' ControlNet pipelines ------------------------------------------


def level_scales(levels: int, device):
    """Per-level residual scales of guess mode (diffusers' `logspace(-1, 0)`: 0.1 at the shallowest level to 1 at
    the middle block), also what `control_mode` "prompt" applies to both halves."""
    import torch

    return torch.logspace(-1, 0, levels, device=device)


@contextlib.contextmanager
def prompt_mode(nets):
    """While open, every ControlNet in `nets` scales its residuals by level (`level_scales`) after its conditioning
    scale: `control_mode` "prompt" in a diffusers pipeline call, which has no such option."""

    def scaled(module, args, kwargs, output):
        down, mid = output
        scales = level_scales(len(down) + 1, mid.device)
        return [sample * scale for sample, scale in zip(down, scales)], mid * scales[-1]

    handles = [net.register_forward_hook(scaled, with_kwargs=True) for net in nets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def controlnet_pipeline(pipe, nets: list, image_to_image: bool):
    """diffusers' ControlNet pipeline (text to image, or image to image) over `pipe`'s modules and `nets` (one
    ControlNet, or a `MultiControlNetModel` of several, summed in order): no weights copied."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, MultiControlNetModel

    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    auto = AutoPipelineForImage2Image if image_to_image else AutoPipelineForText2Image
    controlled = auto.from_pipe(pipe, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    return controlled


def controlnet_call_arguments(tasks, nets: list) -> dict:
    """The ControlNet keyword arguments of one pipeline call over `tasks` (which share their units' keys): the
    control images (per task, per unit), scales, windows and guess mode, as PIL images (both engines read them
    through the pipeline's control image processor)."""
    from PIL import Image

    units = tasks[0].params.controlnet
    several = len(units) > 1
    images = [[Image.fromarray(image) for image in task.control_images] for task in tasks]
    scales = [float(unit.scale) for unit in units]
    starts = [float(unit.start) for unit in units]
    ends = [float(unit.end) for unit in units]
    return {
        # Several units: one image list per unit, or per task for a batch (the SD pipelines transpose nested lists).
        "images": (images if len(tasks) > 1 else images[0]) if several else [each[0] for each in images],
        "controlnet_conditioning_scale": scales if several else scales[0],
        "control_guidance_start": starts if several else starts[0],
        "control_guidance_end": ends if several else ends[0],
        "guess_mode": units[0].control_mode == "control",
    }
