"""Images out (PNG/JPEG/WebP bytes, generation parameters embedded) and in (decode, check, resize)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import zipfile

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..config import RequestLimits
from ..pipeline.params import ImageParams
from ..pipeline.schedulers import a1111_name
from ..pipeline.tasks import ImageResult
from .errors import ApiError

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: several times faster than Pillow's default 6 on noisy images, a little larger.
PNG_COMPRESS_LEVEL = 1


def parameters_text(params: ImageParams, model: str) -> str:
    """An image's parameters in the `parameters` text convention that SD tools and viewers read."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = [
        f"Steps: {params.num_inference_steps}",
        f"Sampler: {a1111_name(params.scheduler)}",
        f"CFG scale: {params.guidance_scale:g}",
        f"Seed: {params.seed}",
        f"Size: {params.width}x{params.height}",
        f"Model: {params.model or model}",
    ]
    if params.strength is not None:
        fields.append(f"Denoising strength: {params.strength:g}")
    if params.loras:
        fields.append("LoRA: " + " ".join(f"{lora.name}:{lora.scale:g}" for lora in params.loras))
    lines.append(", ".join(fields))
    return "\n".join(lines)


def encode_image(pixels: np.ndarray, output_format: str = "png", quality: int = 90, parameters: str = "") -> bytes:
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


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
_FORMAT_OF_MEDIA_TYPE = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
# 8 bits per channel, at most 4 channels: what RGB conversion takes without losing what the caller meant.
_ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})


def decode_init_image(
    data: bytes | str,
    limits: RequestLimits,
    width: int | None,
    height: int | None,
    field: str = "init_image",
    media_type: str | None = None,
) -> np.ndarray:
    """An uploaded image as RGB uint8 at the output size (multiples of 8, within limits).

    Everything is checked from the header before a pixel is decoded: the format (and that it is
    what `media_type`, the upload's declared type, says), the pixel count (413 past
    `limits.max_upload_pixels`, so a small file that expands to gigapixels costs nothing), one
    frame, 8 bits per channel. Truncated or corrupt data is a 422 naming the field, never a 500.
    """
    if isinstance(data, str):
        data = _base64_payload(data, field)
    try:
        picture = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(field, "more pixels than any image this server decodes", limits) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError.invalid(field, f"is not an image; send {', '.join(UPLOAD_FORMATS)}") from None
    if picture.format not in UPLOAD_FORMATS:
        raise ApiError.invalid(field, f"format {picture.format} is not accepted; send {', '.join(UPLOAD_FORMATS)}")
    declared = _FORMAT_OF_MEDIA_TYPE.get((media_type or "").split(";")[0].strip().lower())
    if media_type and media_type.startswith("image/") and declared != picture.format:
        raise ApiError.invalid(field, f"is sent as {media_type} but is a {picture.format} image")
    if picture.width * picture.height > limits.max_upload_pixels:
        raise _too_many_pixels(field, f"{picture.width}x{picture.height} pixels", limits)
    if getattr(picture, "n_frames", 1) > 1:
        raise ApiError.invalid(field, f"has {picture.n_frames} frames; send a still image")
    if picture.mode not in _ACCEPTED_MODES:
        raise ApiError.invalid(field, f"has pixel mode {picture.mode}; send 8 bits per channel (RGB, RGBA or grey)")
    try:
        picture = picture.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise ApiError.invalid(field, "could not be decoded (truncated or corrupt)") from None
    size = output_size(picture.width, picture.height, width, height, limits)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(picture)


def _too_many_pixels(field: str, what: str, limits: RequestLimits) -> ApiError:
    message = f"{field}: claims {what}; at most {limits.max_upload_pixels} pixels are accepted"
    return ApiError(413, "payload_too_large", message, field)


def output_size(
    image_width: int, image_height: int, width: int | None, height: int | None, limits: RequestLimits
) -> tuple[int, int]:
    """Requested size, or the image's aspect ratio fitted inside the limits, in multiples of 8."""
    if width and height:
        return width, height
    aspect = image_width / image_height
    if width:
        height = width / aspect
    elif height:
        width = height * aspect
    else:
        scale = min(
            1.0,
            limits.max_width / image_width,
            limits.max_height / image_height,
            (limits.max_pixels / (image_width * image_height)) ** 0.5,
        )
        width, height = image_width * scale, image_height * scale

    def fit(value: float, upper: int) -> int:
        return max(limits.min_size, min(upper, int(value) // 8 * 8))

    return fit(width, limits.max_width), fit(height, limits.max_height)


def _base64_payload(text: str, field: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError.invalid(field, "must be base64 (or a data: URL) of a PNG, JPEG or WebP image") from None


def zip_archive(files: dict[str, bytes]) -> bytes:
    """Images stored as they are (already compressed), metadata deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            kind = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=kind)
    return buffer.getvalue()


async def encode_results(images: list[ImageResult], output_format: str, quality: int, model: str) -> list[bytes]:
    """Each image encoded with its parameters embedded, off the event loop (a 1024x1024 PNG takes tens of ms)."""

    def encode() -> list[bytes]:
        return [encode_image(i.pixels, output_format, quality, parameters_text(i.params, model)) for i in images]

    return await asyncio.to_thread(encode)
