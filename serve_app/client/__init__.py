"""Python client for the native HTTP API: sync (`SDClient`) and async (`AsyncSDClient`).

    from serve_app.client import SDClient

    with SDClient("http://127.0.0.1:8000") as sd:
        result = sd.generate("a lighthouse at dawn", seed=42, num_images=2)
        for image in result.images:
            image.save(f"lighthouse-{image.seed}.png")

Speaks HTTP only (httpx and Pillow): it never imports torch, Ray or diffusers, so it
runs on machines without them. A 503 (overloaded) is retried a bounded number of
times, waiting as its Retry-After header says; every other error is raised as
`SDServeError` carrying the server's status, code, field, message and request id.

Both clients have the same methods, because both drive the same plans (`core`): each
method's request, retries, answer and job following are written once there, and
`sync_client` and `async_client` only do the I/O that a plan asks for.
"""

from .async_client import AsyncSDClient
from .core import API_KEY_ENV, DEFAULT_URL, FINAL_STATES, REFOLLOW_PAUSE_S, URL_ENV
from .errors import RetryPolicy, SDServeConnectionError, SDServeError, SDServeTimeout, retry_after_seconds
from .requests import (
    GenerateOptions,
    ImageOptions,
    Img2ImgOptions,
    InitImage,
    JobOptions,
    OutputFormat,
    encode_init_image,
)
from .results import GeneratedImage, Generation, HealthReport
from .sync_client import SDClient

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "FINAL_STATES",
    "REFOLLOW_PAUSE_S",
    "URL_ENV",
    "AsyncSDClient",
    "GenerateOptions",
    "GeneratedImage",
    "Generation",
    "HealthReport",
    "ImageOptions",
    "Img2ImgOptions",
    "InitImage",
    "JobOptions",
    "OutputFormat",
    "RetryPolicy",
    "SDClient",
    "SDServeConnectionError",
    "SDServeError",
    "SDServeTimeout",
    "encode_init_image",
    "retry_after_seconds",
]
