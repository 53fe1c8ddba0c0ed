"""Each request of the native API as data: its method, path and body, built from a method's options.

Pure: nothing here sends anything. The options are TypedDicts, so that the sync and async clients
take exactly the same keyword arguments, declared once, and a type checker sees them.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import httpx
from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]
InitImage = str | os.PathLike | bytes | Image.Image


class ControlNetOptions(TypedDict, total=False):
    """One ControlNet unit: `name` and `image` are required, the rest take the server's defaults."""

    name: str  # one of GET /controlnets
    image: InitImage  # the control map, or the picture `preprocess` makes it from (a path, bytes or a PIL image)
    scale: float  # 0-2 (default 1)
    start: float  # share of the schedule before it starts (default 0)
    end: float  # share of the schedule when it stops (default 1)
    control_mode: Literal["balanced", "prompt", "control"]
    preprocess: Literal["none", "canny", "invert", "scribble_xdog"]
    threshold_a: float  # canny: low threshold (100); scribble_xdog: threshold (32)
    threshold_b: float  # canny: high threshold (200)
    processor_res: int
    resize_mode: Literal["resize", "crop", "fill"]


class ImageOptions(TypedDict, total=False):
    """What every generating method takes besides the prompt. One left out (or None) takes the
    server's default, which GET /info shows; `num_images` defaults to 1."""

    negative_prompt: str | None
    width: int | None
    height: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int | None  # image i gets seed + i; default: random
    scheduler: str | None
    model: str | None  # one of GET /models; default: the server's default model
    loras: dict[str, float] | None  # LoRA adapter name -> scale
    controlnet: Sequence[ControlNetOptions] | None  # ControlNet units, each with its image
    num_images: int


class HiresOptions(TypedDict, total=False):
    """Hires fix: a second, upscaled image-to-image pass of a text-to-image image (AUTOMATIC1111's)."""

    scale: float  # the second pass's size: width and height times this (default 2)
    width: int  # or its width (height follows), or
    height: int  # its height (width follows)
    upscaler: str  # Latent (default), Latent (nearest), ..., Lanczos, Nearest, None (GET /sdapi/v1/upscalers)
    steps: int  # second-pass steps (default: num_inference_steps)
    denoising_strength: float  # default 0.7
    prompt: str  # the second pass's prompt (default: the image's)
    negative_prompt: str
    scheduler: str


class EditOptions(TypedDict, total=False):
    """Image to image with a mask (inpainting) or new margins (outpainting)."""

    mask: InitImage | None  # white = repaint, the init image's size (a path, bytes or a PIL image)
    mask_blur: int | None  # blur radius of the mask's edge in pixels (default 4)
    invert_mask: bool | None  # repaint the black instead
    fill: Literal["original", "noise", "blurred"] | None  # what the masked area starts from (default original)
    paste_back: bool | None  # pixels outside the mask exactly the input's (default True)
    only_masked: bool | None  # repaint only the mask's region at full resolution, then paste it back
    only_masked_padding: int | None
    outpaint: Mapping[str, int] | None  # {"left": 64, "right": 64, "top": 0, "bottom": 0}: pixels added, painted


class GenerateOptions(ImageOptions, total=False):
    """generate, stream and generate_prompts: the image options and how the images are encoded."""

    output_format: OutputFormat  # default: png (which embeds the generation parameters)
    quality: int | None  # jpeg/webp, 1-100
    hires: HiresOptions | None  # text to image: hires fix


class Img2ImgOptions(GenerateOptions, EditOptions, total=False):
    strength: float | None  # 0-1: how far to move from the init image


class JobOptions(ImageOptions, EditOptions, total=False):
    """submit: the image options, an init image for image to image (with a mask: inpainting), and a webhook.
    Jobs store PNGs; the format is chosen when an image is downloaded."""

    init_image: InitImage | None
    strength: float | None
    hires: HiresOptions | None  # text to image: hires fix
    webhook: str | None  # a URL the server POSTs the final job to (its host must be allowed there)


@dataclass(frozen=True)
class Request:
    """One request as the client core wants it sent: what httpx's build_request takes."""

    method: str
    path: str
    options: Mapping[str, Any] = field(default_factory=dict)  # json, params, headers, timeout
    streamed: bool = False  # the answer is read a line at a time (server-sent events)

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request as `http` sends it: its base URL, headers and time-out applied."""
        return http.build_request(self.method, self.path, **self.options)


def generate(prompt: str, options: Mapping[str, Any]) -> Request:
    return Request("POST", "/generate", {"json": _generation_body(prompt, options, GenerateOptions)})


def generate_streamed(prompt: str, options: Mapping[str, Any]) -> Request:
    """/generate asked for progress events, then its answer as the last event."""
    body = _generation_body(prompt, options, GenerateOptions)
    return Request("POST", "/generate", {"json": body, "headers": {"Accept": "text/event-stream"}}, streamed=True)


def img2img(prompt: str, init_image: InitImage, options: Mapping[str, Any]) -> Request:
    body = {**_generation_body(prompt, options, Img2ImgOptions), "init_image": encode_init_image(init_image)}
    if "mask" in body:
        body["mask"] = encode_init_image(body["mask"])
    return Request("POST", "/img2img", {"json": body})


def generate_prompts(entries: Sequence[str | Mapping[str, Any]], shared: Mapping[str, Any]) -> Request:
    """Strings share the `shared` options; mappings are whole entries, overriding them."""
    body = _fields(shared, GenerateOptions)
    if all(isinstance(e, str) for e in entries):
        body["prompts"] = list(entries)
    else:
        body["requests"] = [{"prompt": e} if isinstance(e, str) else dict(e) for e in entries]
    body["response_format"] = "json"
    return Request("POST", "/generate/prompts", {"json": body})


def submit(prompt: str, options: Mapping[str, Any]) -> Request:
    body = {"prompt": prompt, "num_images": 1, **_fields(options, JobOptions)}
    for name in ("init_image", "mask"):
        if name in body:
            body[name] = encode_init_image(body[name])
    if "webhook" in body:
        body["webhook"] = {"url": body["webhook"]}
    return Request("POST", "/jobs", {"json": body})


def job(job_id: str) -> Request:
    return Request("GET", f"/jobs/{job_id}")


def jobs(status: str | None, limit: int, cursor: str | None) -> Request:
    query = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
    return Request("GET", "/jobs", {"params": query})


def cancel(job_id: str) -> Request:
    return Request("DELETE", f"/jobs/{job_id}")


def job_image(job_id: str, index: int, output_format: OutputFormat, quality: int | None) -> Request:
    query = {"format": output_format} if quality is None else {"format": output_format, "quality": quality}
    return Request("GET", f"/jobs/{job_id}/images/{index}", {"params": query})


def job_events(job_id: str) -> Request:
    """A job's events: no time-out, as a job may wait long in the queue between two events."""
    return Request("GET", f"/jobs/{job_id}/events", {"timeout": None}, streamed=True)


def encode_init_image(image: InitImage) -> str:
    """A path, raw bytes or a PIL image as the base64 the /img2img JSON body takes (init images and masks)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    else:
        data = Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def _generation_body(prompt: str, options: Mapping[str, Any], accepted: type) -> dict[str, Any]:
    """The body of a request answered with images: JSON, so each image comes with its seed and metadata."""
    defaults = {"num_images": 1, "output_format": "png"}
    return {"prompt": prompt, **defaults, **_fields(options, accepted), "response_format": "json"}


def _fields(options: Mapping[str, Any], accepted: type) -> dict[str, Any]:
    """The options that are set, as the API names them; an option the method does not take is a TypeError."""
    unknown = set(options) - accepted.__optional_keys__
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    fields = {name: value for name, value in options.items() if value is not None}
    if loras := fields.pop("loras", None):
        fields["loras"] = [{"name": name, "scale": scale} for name, scale in loras.items()]
    if units := fields.pop("controlnet", None):
        fields["controlnet"] = [{**unit, "image": encode_init_image(unit["image"])} for unit in units]
    return fields
