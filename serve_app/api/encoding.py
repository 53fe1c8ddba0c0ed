"""Images out (PNG/JPEG/WebP bytes, generation parameters embedded) and in (decode, check, resize)."""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from PIL import Image, PngImagePlugin

from ..pipeline.jobs import GeneratedImage
from ..pipeline.schedulers import SCHEDULERS

OutputFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: several times faster than Pillow's default 6 on noisy images, a little larger.
PNG_COMPRESS_LEVEL = 1


def parameters_text(image: GeneratedImage, model: str) -> str:
    """Generation parameters in the `parameters` text convention that SD tools and viewers read."""
    sampler = SCHEDULERS[image.scheduler].a1111_name if image.scheduler in SCHEDULERS else image.scheduler
    lines = [image.prompt]
    if image.negative_prompt:
        lines.append(f"Negative prompt: {image.negative_prompt}")
    fields = [
        f"Steps: {image.num_inference_steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {image.guidance_scale:g}",
        f"Seed: {image.seed}",
        f"Size: {image.width}x{image.height}",
        f"Model: {model}",
    ]
    if image.strength is not None:
        fields.append(f"Denoising strength: {image.strength:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_image(
    pixels: np.ndarray, output_format: OutputFormat = "png", quality: int = 90, parameters: str = ""
) -> bytes:
    picture = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_itxt("parameters", parameters)
        picture.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        picture.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
