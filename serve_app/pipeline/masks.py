"""Masks: one meaning for every model family and both engines.

A task's mask (`ImageTask.mask`, uint8, the init image's size) is white where the image is repainted; by the
time it reaches the engine it is inverted if asked and outpainting's border is in it. `params.inpaint` says
the rest, and this module turns the two into what a diffusers inpaint pipeline takes, the same way for the
request engine (which calls the pipeline) and the steppers (which replicate it):

  mask        blurred by `mask_blur` (PIL's Gaussian blur, as `VaeImageProcessor.blur`): the pipeline reads it
              binarised at 50%, and paste-back blends along it
  image       the init image with the masked area's start replaced by `fill`: original, noise (uniform random
              pixels drawn from the seed), blurred (AUTOMATIC1111's "fill": the colours around the area,
              blurred in); pixels outside the unblurred mask are never changed
  crop        `only_masked`: the pipeline's `padding_mask_crop` box (the masked region plus the padding, at the
              output's aspect ratio): that box is repainted at the output size, then pasted back
  paste back  `image_processor.apply_overlay`: where the blurred mask is 0 every pixel is the input's exactly
              (the VAE round trip would move them), along its edge a blend

`check_mask` is what every API family and the engines refuse (torch-free: the ingress calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import InvalidTaskError
from .params import FillMode, InpaintParams

# Pixels per latent cell of every family's VAE: a mask must cover at least one cell's sample to repaint anything.
LATENT_CELL = 8


def model_mask(mask: np.ndarray, blur: int) -> Image.Image:
    """The mask as the pipeline gets it: greyscale, blurred by `blur` pixels (`VaeImageProcessor.blur`)."""
    picture = Image.fromarray(mask, mode="L")
    return picture.filter(ImageFilter.GaussianBlur(blur)) if blur else picture


def check_mask(mask, image_shape: tuple[int, ...], inpaint: InpaintParams | None, field: str = "mask") -> None:
    """Refuse a mask that is not the image's size or that repaints nothing (all black once inverted and blurred,
    or smaller than one latent cell), as an InvalidTaskError naming `field`."""
    if not (isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.ndim == 2):
        raise InvalidTaskError(f"{field}: must be a greyscale uint8 array (height, width)", field)
    if mask.shape != tuple(image_shape[:2]):
        raise InvalidTaskError(
            f"{field}: is {mask.shape[1]}x{mask.shape[0]} pixels and the image {image_shape[1]}x{image_shape[0]}: "
            "send a mask of the image's size",
            field,
        )
    inpaint = inpaint or InpaintParams()
    read = np.asarray(model_mask(mask, inpaint.mask_blur)) >= 128
    if not read.any():
        raise InvalidTaskError(
            f"{field}: selects no pixel to repaint (all black"
            + (" once inverted" if inpaint.invert_mask else "")
            + "); "
            "white marks the area to repaint",
            field,
        )
    if not inpaint.only_masked and not read[::LATENT_CELL, ::LATENT_CELL].any():
        raise InvalidTaskError(
            f"{field}: covers too little to repaint: the model reads masks in {LATENT_CELL}x{LATENT_CELL} cells; paint a "
            "larger area (or set only_masked)",
            field,
        )


def filled(image: np.ndarray, mask: np.ndarray, fill: FillMode, seed: int) -> np.ndarray:
    """The init image with the masked area's start replaced as `fill` says (outside the mask: unchanged)."""
    if fill == "original":
        return image
    if fill == "noise":
        replacement = np.random.default_rng(seed).integers(0, 256, image.shape, dtype=np.uint8)
    else:
        replacement = np.asarray(_blurred_fill(Image.fromarray(image), Image.fromarray(mask, mode="L")))
    return np.where((mask >= 128)[..., None], replacement, image)


def _blurred_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's inpainting fill: the unmasked pixels blurred into the masked area at shrinking radii."""
    result = Image.new("RGBA", image.size)
    outside = Image.new("RGBa", image.size)
    outside.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    outside = outside.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = outside.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


@dataclass(frozen=True)
class MaskedInputs:
    """What an inpaint pipeline gets for one task: its `image`, its `mask_image`, the crop box of "only masked"
    (`padding_mask_crop`'s), and whether the result is pasted back over `image`."""

    image: Image.Image
    mask: Image.Image
    crop: tuple[int, int, int, int] | None
    padding: int | None
    paste_back: bool


def masked_inputs(task) -> MaskedInputs:
    """The inpaint pipeline's inputs for a task with a mask (defaults filled in)."""
    params = task.params
    inpaint = params.inpaint or InpaintParams()
    mask = model_mask(task.mask, inpaint.mask_blur)
    image = Image.fromarray(filled(task.init_image, task.mask, inpaint.fill, params.seed))
    crop = padding = None
    if inpaint.only_masked:
        from diffusers.image_processor import VaeImageProcessor

        padding = inpaint.only_masked_padding
        crop = VaeImageProcessor.get_crop_region(mask, params.width, params.height, pad=padding)
    return MaskedInputs(image, mask, crop, padding, inpaint.paste_back or inpaint.only_masked)


def overlay(inputs: MaskedInputs, pixels: np.ndarray, image_processor) -> np.ndarray:
    """The repainted image over the input, as the pipelines paste "only masked" results back
    (`apply_overlay`): outside the blurred mask the input's pixels, exactly."""
    return np.asarray(image_processor.apply_overlay(inputs.mask, inputs.image, Image.fromarray(pixels), inputs.crop))
