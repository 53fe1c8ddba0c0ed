"""Images out (PNG/JPEG/WebP bytes, generation parameters embedded) and in (decode, check, resize)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import zipfile
from typing import Literal

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..config import RequestLimits
from ..pipeline.errors import InvalidTaskError
from ..pipeline.masks import check_mask
from ..pipeline.params import PREPROCESSOR_NAMES, ControlNetUnit, ImageParams, Outpaint
from ..pipeline.preprocessors import A1111_MODULE_NAMES, control_map
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
    if params.inpaint is not None:
        inpaint = params.inpaint
        fields.append(f"Mask blur: {inpaint.mask_blur}")
        fields.append(f"Masked content: {_MASKED_CONTENT[inpaint.fill]}")
        if inpaint.only_masked:
            fields.append(f"Inpaint area: Only masked, Masked area padding: {inpaint.only_masked_padding}")
    if params.outpaint is not None:
        margins = params.outpaint
        fields.append(f"Outpaint: {margins.left} {margins.right} {margins.top} {margins.bottom}")
    if params.hires is not None and params.width and params.height:
        hires = params.hires
        width, height = hires.target_size(params.width, params.height)
        fields.append(f"Hires resize: {width}x{height}, Hires upscaler: {hires.upscaler}")
        fields.append(f"Hires steps: {hires.second_pass(params.num_inference_steps or 0)[1]}")
        fields.append(f"Denoising strength: {hires.denoising_strength:g}")
    fields += [f'ControlNet {i}: "{controlnet_infotext(unit)}"' for i, unit in enumerate(params.controlnet)]
    lines.append(", ".join(fields))
    return "\n".join(lines)


_CONTROL_MODE_NAMES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
}
_RESIZE_MODE_NAMES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def controlnet_infotext(unit: ControlNetUnit) -> str:
    """A ControlNet unit as AUTOMATIC1111's ControlNet extension writes it into an image's parameters."""
    parts = [
        f"Module: {A1111_MODULE_NAMES[PREPROCESSOR_NAMES.index(unit.preprocess)]}",
        f"Model: {unit.name}",
        f"Weight: {unit.scale:g}",
        f"Resize Mode: {_RESIZE_MODE_NAMES[unit.resize_mode]}",
    ]
    if unit.processor_res:
        parts.append(f"Processor Res: {unit.processor_res}")
    for name, value in (("Threshold A", unit.threshold_a), ("Threshold B", unit.threshold_b)):
        if value is not None:
            parts.append(f"{name}: {value:g}")
    parts += [
        f"Guidance Start: {unit.start:g}",
        f"Guidance End: {unit.end:g}",
        f"Control Mode: {_CONTROL_MODE_NAMES[unit.control_mode]}",
    ]
    return ", ".join(parts)


# Our fill modes in AUTOMATIC1111's words ("Masked content").
_MASKED_CONTENT = {"blurred": "fill", "original": "original", "noise": "latent noise"}


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


def encode_input(image: np.ndarray, mask: np.ndarray | None = None) -> bytes:
    """A job's init image as stored: a PNG, with its mask (white = repaint) as the alpha channel."""
    if mask is None:
        return encode_image(image, "png")
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([image, mask]), mode="RGBA").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_input(png: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """A stored init image and its mask (`encode_input`)."""
    picture = Image.open(io.BytesIO(png))
    if picture.mode == "RGBA":
        pixels = np.asarray(picture)
        return np.ascontiguousarray(pixels[..., :3]), np.ascontiguousarray(pixels[..., 3])
    return np.asarray(picture.convert("RGB")), None


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
    return _fitted(_open_upload(data, limits, field, media_type), limits, width, height, field)


def _fitted(picture: Image.Image, limits: RequestLimits, width: int | None, height: int | None, field: str):
    """An opened upload decoded as RGB at the output size."""
    picture = _rgb(picture, field)
    size = output_size(picture.width, picture.height, width, height, limits)
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(picture)


def _rgb(picture: Image.Image, field: str) -> Image.Image:
    try:
        return picture.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise ApiError.invalid(field, "could not be decoded (truncated or corrupt)") from None


def decode_picture(data: bytes | str, limits: RequestLimits, field: str) -> Image.Image:
    """An upload as an RGB picture at its own size, checked as an init image is."""
    return _rgb(_open_upload(data, limits, field, None), field)


def decode_controls(
    images: list[bytes | str],
    units: tuple[ControlNetUnit, ...],
    limits: RequestLimits,
    width: int | None,
    height: int | None,
    fields: list[str],
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """ControlNet units' images as the engines take them: each checked as an init image is (format, pixels,
    frames, mode; 422/413 naming its field), preprocessed as its unit says (`preprocessors.control_map`) and fitted
    to the output size: width x height, or where unset the first image's fitted within the limits (as diffusers'
    ControlNet pipelines default to it). Returns the maps and that size."""
    maps = []
    for data, unit, field in zip(images, units, fields):
        picture = decode_picture(data, limits, field)
        if not (width and height):
            width, height = output_size(picture.width, picture.height, width, height, limits)
        try:
            maps.append(control_map(picture, width, height, unit))
        except (OSError, ValueError) as exc:
            raise ApiError.invalid(field, f"could not be preprocessed ({unit.preprocess}): {exc}") from None
    return maps, (width, height)


def _open_upload(data: bytes | str, limits: RequestLimits, field: str, media_type: str | None) -> Image.Image:
    """An upload opened and checked from its header (format, declared type, pixels, frames, mode), undecoded."""
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
    return picture


MaskMeaning = Literal["white", "transparent"]


def decode_edit(
    image: bytes | str,
    mask: bytes | str | None,
    params: ImageParams,
    limits: RequestLimits,
    *,
    fields: tuple[str, str] = ("init_image", "mask"),
    media_types: tuple[str | None, str | None] = (None, None),
    meaning: MaskMeaning = "white",
) -> tuple[np.ndarray, np.ndarray | None]:
    """An image to edit and its mask, as the engines take them: the image as `decode_init_image` gives it, the
    mask (checked like an image; the image's size, else 422 saying so) resized with it, inverted if
    `params.inpaint.invert_mask`, then outpainting's margins added to both (the image's edge pixels repeated, the
    mask white there). `meaning`: white pixels repaint (AUTOMATIC1111 and native; a mask with transparency is read
    by its alpha, opaque = repaint, as A1111 reads it), or transparent ones do (OpenAI's edits). 422 for a mask
    that repaints nothing, 422 naming outpaint when the padded image passes the limits."""
    image_field, mask_field = fields
    picture = _open_upload(image, limits, image_field, media_types[0])
    original = picture.size
    init = _fitted(picture, limits, params.width, params.height, image_field)
    size = (init.shape[1], init.shape[0])
    mask_array = None
    if mask is not None:
        mask_picture = _open_upload(mask, limits, mask_field, media_types[1])
        if mask_picture.size != original:
            raise ApiError.invalid(
                mask_field,
                f"is {mask_picture.width}x{mask_picture.height} pixels and the image {original[0]}x{original[1]}: "
                "send a mask of the image's size",
            )
        grey = _mask_pixels(mask_picture, mask_field, meaning)
        if grey.size != size:
            grey = grey.resize(size, Image.Resampling.LANCZOS)
        mask_array = np.asarray(grey)
        if params.inpaint is not None and params.inpaint.invert_mask:
            mask_array = 255 - mask_array
    if params.outpaint is not None:
        init, mask_array = outpainted(init, mask_array, params.outpaint)
        if init.shape[1] > limits.max_width or init.shape[0] > limits.max_height or init.size // 3 > limits.max_pixels:
            raise ApiError.invalid(
                "outpaint",
                f"makes the image {init.shape[1]}x{init.shape[0]}: at most {limits.max_width}x{limits.max_height} and "
                f"{limits.max_pixels} pixels; make the image or the margins smaller",
            )
    if mask_array is not None:
        try:
            check_mask(mask_array, init.shape, params.inpaint, mask_field if params.outpaint is None else "mask")
        except InvalidTaskError as exc:
            raise ApiError.of(exc) from None
    return init, mask_array


def _mask_pixels(picture: Image.Image, field: str, meaning: MaskMeaning) -> Image.Image:
    """A mask upload as greyscale, white = repaint."""
    has_alpha = picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info)
    try:
        if meaning == "transparent":
            if not has_alpha:
                raise ApiError.invalid(
                    field,
                    f"has no alpha channel (mode {picture.mode}); send a PNG whose transparent pixels mark the area to edit",
                )
            alpha = picture.convert("RGBA").getchannel("A")
            return alpha.point(lambda a: 255 if a == 0 else 0)
        if has_alpha:
            alpha = picture.convert("RGBA").getchannel("A")
            if alpha.getextrema() != (255, 255):  # a mask drawn on a transparent layer: opaque = repaint
                return alpha.point(lambda a: 255 if a > 128 else 0)
        return picture.convert("L")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        raise ApiError.invalid(field, "could not be decoded (truncated or corrupt)") from None


def outpainted(image: np.ndarray, mask: np.ndarray | None, margins: Outpaint) -> tuple[np.ndarray, np.ndarray]:
    """The image padded by the margins (its edge pixels repeated) and its mask with the new border white."""
    pad = ((margins.top, margins.bottom), (margins.left, margins.right))
    padded = np.pad(image, (*pad, (0, 0)), mode="edge")
    inside = np.zeros(image.shape[:2], dtype=np.uint8) if mask is None else mask
    return padded, np.pad(inside, pad, mode="constant", constant_values=255)


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
