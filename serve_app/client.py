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
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from PIL import Image

# The server's own response models (pydantic only), so the client reads exactly what the server writes.
from .api.jobs.protocol import JobView
from .api.native.protocol import GenerationMetadata

FINAL_STATES = ("succeeded", "failed", "canceled")
REFOLLOW_PAUSE_S = 1.0  # before opening the stream of a job again when the last one ended early

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "SD_SERVE_URL"
API_KEY_ENV = "SD_SERVE_API_KEY"

OutputFormat = Literal["png", "jpeg", "webp"]
InitImage = str | os.PathLike | bytes | Image.Image


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedImage:
    """One image as the server encoded it, with the seed that reproduces it."""

    data: bytes = field(repr=False)
    seed: int
    media_type: str
    batch_size: int  # images in the pipeline call that made this one: batching seen from outside

    @property
    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data))

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/webp": "webp"}.get(self.media_type, "png")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bytes exactly as the server sent them (PNGs keep their embedded parameters)."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Generation:
    """The answer to one generate / img2img request (or one entry of a batch)."""

    images: list[GeneratedImage]
    metadata: GenerationMetadata

    @property
    def image(self) -> Image.Image:
        """The first image, decoded: the common case of one image per request."""
        return self.images[0].image

    @property
    def seeds(self) -> list[int]:
        return [i.seed for i in self.images]

    @property
    def request_id(self) -> str:
        return self.metadata.request_id

    @property
    def warnings(self) -> list[str]:
        return self.metadata.warnings

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Generation:
        images = [
            GeneratedImage(
                data=base64.b64decode(i["b64"]),
                seed=i["seed"],
                media_type=i["media_type"],
                batch_size=i["batch_size"],
            )
            for i in data["images"]
        ]
        return cls(images=images, metadata=GenerationMetadata.model_validate(data["metadata"]))


@dataclass(frozen=True)
class HealthReport:
    live: bool  # /healthz answered 200
    ready: bool | None  # /readyz: True/False, None when the server has no /readyz
    info: dict[str, Any] | None  # /info, None when it could not be read


# -- errors ------------------------------------------------------------------------------


class SDServeError(Exception):
    """The server answered with an error, or could not be reached (status 0)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        field: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        head = f"{self.status} {self.code}: " if self.status else ""
        tail = f" (request {self.request_id})" if self.request_id else ""
        return f"{head}{self.message}{tail}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> SDServeError:
        """Our JSON error shape, OpenAI's, or whatever text a proxy in front sent."""
        request_id = response.headers.get("x-request-id")
        code, message, field_name = f"http_{response.status_code}", "", None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code = error.get("code") or code
            message = error.get("message") or ""
            field_name = error.get("field") or error.get("param")
            request_id = body.get("request_id") or request_id
        if not message:
            message = response.text.strip()[:300] or response.reason_phrase
        return cls(
            message,
            status=response.status_code,
            code=code,
            field=field_name,
            request_id=request_id,
            retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
        )


class SDServeConnectionError(SDServeError):
    """Nothing answered: wrong URL, server down, or the request timed out."""


class SDServeTimeout(SDServeConnectionError):
    pass


# -- retries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How 503 answers (server overloaded) are retried; other errors never are.

    The server's Retry-After is honoured (capped at `max_wait_s`) with a little jitter,
    so that clients told to come back at the same time do not all arrive together.
    Without the header the wait doubles from `backoff_s`, with full jitter.
    """

    max_retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0

    def delay_s(self, retry: int, retry_after_s: float | None, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        if retry_after_s is not None:
            return min(self.max_wait_s, retry_after_s) * (1 + 0.1 * rand())
        return min(self.max_wait_s, self.backoff_s * 2**retry) * rand()


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- requests, shared by both clients ---------------------------------------------------------


def _image_fields(
    prompt: str,
    *,
    negative_prompt: str | None,
    width: int | None,
    height: int | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    scheduler: str | None,
    num_images: int,
    model: str | None = None,
    loras: dict[str, float] | None = None,
    output_format: OutputFormat,
    quality: int | None,
) -> dict[str, Any]:
    """The /generate body: unset parameters are left out, so the server's defaults apply."""
    fields = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "scheduler": scheduler,
        "model": model,
        "loras": [{"name": name, "scale": scale} for name, scale in loras.items()] if loras else None,
        "num_images": num_images,
        "output_format": output_format,
        "quality": quality,
        "response_format": "json",
    }
    return {k: v for k, v in fields.items() if v is not None}


def encode_init_image(image: InitImage) -> str:
    """A path, raw bytes or a PIL image as the base64 the /img2img JSON body takes."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    else:
        data = Path(image).read_bytes()
    return base64.b64encode(data).decode("ascii")


def _batch_body(entries: Sequence[str | Mapping[str, Any]], shared: Mapping[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in shared.items() if v is not None}
    if all(isinstance(e, str) for e in entries):
        body["prompts"] = list(entries)
    else:
        body["requests"] = [{"prompt": e} if isinstance(e, str) else dict(e) for e in entries]
    body["response_format"] = "json"
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _resolve(url: str | None, api_key: str | None) -> tuple[str, str | None]:
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"), api_key or os.environ.get(API_KEY_ENV)


class _EventLines:
    """Server-sent events, a line at a time: each blank line ends an event, returned as (kind, data)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def feed(self, line: str) -> tuple[str, dict] | None:
        if line:
            self.lines.append(line)
            return None
        lines, self.lines = self.lines, []
        kind, data = "message", []
        for entry in lines:
            if entry.startswith("event:"):
                kind = entry.partition(":")[2].strip()
            elif entry.startswith("data:"):
                data.append(entry.partition(":")[2].strip())
        return (kind, json.loads("\n".join(data))) if data else None


def _transport_error(exc: httpx.TransportError, base_url: str) -> SDServeConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return SDServeTimeout(f"no answer from {base_url} in time ({type(exc).__name__})")
    return SDServeConnectionError(f"cannot reach {base_url}: {exc or type(exc).__name__}")


class _Endpoints:
    """Request building and response parsing; the subclasses only send."""

    base_url: str

    def _generation(self, response: httpx.Response) -> Generation:
        return Generation.from_json(self._json(response))

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise SDServeError.from_response(response)
        return response.json()

    def _job(self, response: httpx.Response) -> JobView:
        return JobView.model_validate(self._json(response))

    @staticmethod
    def _job_body(prompt: str, params: dict[str, Any], init_image, strength, webhook) -> dict[str, Any]:
        body = {
            k: v for k, v in _image_fields(prompt, **params).items() if k not in ("response_format", "output_format")
        }
        if init_image is not None:
            body["init_image"] = encode_init_image(init_image)
        if strength is not None:
            body["strength"] = strength
        if webhook is not None:
            body["webhook"] = {"url": webhook}
        return body

    @staticmethod
    def _stream_event(kind: str, data: dict) -> tuple[str, dict | Generation]:
        if kind == "succeeded":
            return kind, Generation.from_json(data)
        if kind == "failed":
            error = data.get("error", {})
            raise SDServeError(error.get("message", "failed"), code=error.get("code", ""), field=error.get("field"))
        return kind, data

    @staticmethod
    def _probe(response: httpx.Response) -> bool | None:
        """200 → True, 503 → False, 404 → None (the server has no such route)."""
        if response.status_code == 404:
            return None
        if response.status_code in (200, 503):
            return response.status_code == 200
        raise SDServeError.from_response(response)


# -- the clients -----------------------------------------------------------------------------


class SDClient(_Endpoints):
    """Blocking client. `url` defaults to $SD_SERVE_URL, then http://127.0.0.1:8000;
    `api_key` to $SD_SERVE_API_KEY (sent as `Authorization: Bearer`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url, api_key = _resolve(url, api_key)
        self.retry = retry
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> SDClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """Send, retrying 503s as the policy says; the last answer is returned whatever its status."""
        retry = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.base_url) from None
            if response.status_code != 503 or retry >= self.retry.max_retries:
                return response
            self._sleep(self.retry.delay_s(retry, retry_after_seconds(response.headers.get("retry-after"))))
            retry += 1

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int | None = None,
    ) -> Generation:
        """Text to image. Parameters left out take the server's defaults; image i gets seed + i."""
        body = _image_fields(**_image_arguments(locals()))
        return self._generation(self.request("POST", "/generate", json=body))

    def img2img(
        self,
        prompt: str,
        init_image: InitImage,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int | None = None,
    ) -> Generation:
        """Image to image from a file path, raw bytes (PNG/JPEG/WebP) or a PIL image."""
        params = _image_arguments(locals())
        body = {**_image_fields(**params), "init_image": encode_init_image(init_image)}
        if strength is not None:
            body["strength"] = strength
        return self._generation(self.request("POST", "/img2img", json=body))

    def batch(self, entries: Sequence[str | Mapping[str, Any]], **shared: Any) -> list[Generation]:
        """Many prompts in one request: strings share `shared`, dicts override it per entry."""
        data = self._json(self.request("POST", "/generate/prompts", json=_batch_body(entries, shared)))
        return [Generation.from_json(r) for r in data["results"]]

    # -- jobs: submit now, watch, fetch later -------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        init_image: InitImage | None = None,
        strength: float | None = None,
        webhook: str | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
    ) -> JobView:
        """Queue a job (text to image, or image to image with `init_image`); returns at once with its id."""
        params = _job_arguments(locals())
        body = self._job_body(prompt, params, init_image, strength, webhook)
        return self._job(self.request("POST", "/jobs", json=body))

    def job(self, job_id: str) -> JobView:
        return self._job(self.request("GET", f"/jobs/{job_id}"))

    def jobs(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[JobView], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at the end)."""
        query = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        data = self._json(self.request("GET", "/jobs", params=query))
        return [JobView.model_validate(j) for j in data["jobs"]], data["next_cursor"]

    def cancel(self, job_id: str) -> JobView:
        return self._job(self.request("DELETE", f"/jobs/{job_id}"))

    def download(self, job_id: str, index: int = 0, output_format: OutputFormat = "png") -> GeneratedImage:
        response = self.request("GET", f"/jobs/{job_id}/images/{index}", params={"format": output_format})
        if response.status_code >= 400:
            raise SDServeError.from_response(response)
        job = self.job(job_id)
        return GeneratedImage(response.content, job.seeds[index], response.headers["content-type"], 0)

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """The job's server-sent events as (kind, data): queued, running, progress, then the final one."""
        yield from self._event_stream("GET", f"/jobs/{job_id}/events", timeout=None)

    def _event_stream(self, method: str, url: str, **kwargs: Any) -> Iterator[tuple[str, dict]]:
        """(kind, data) for each server-sent event of one streamed answer; errors raised as the client's own."""
        try:
            with self._http.stream(method, url, **kwargs) as response:
                if response.status_code >= 400:
                    response.read()
                    raise SDServeError.from_response(response)
                events = _EventLines()
                for line in response.iter_lines():
                    if (event := events.feed(line)) is not None:
                        yield event
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from None

    def wait(self, job_id: str, on_progress: Callable[[dict], Any] | None = None) -> JobView:
        """Follow the job until it ends; `on_progress` gets each progress update (step, total_steps, images_done).
        A stream that ends before the job (a proxy's idle time-out, a restarted queue holder) is opened again."""
        while True:
            for kind, data in self.events(job_id):
                if kind == "progress" and on_progress is not None:
                    on_progress(data)
                if kind in FINAL_STATES:
                    break
            job = self.job(job_id)
            if job.status.final:
                return job
            self._sleep(REFOLLOW_PAUSE_S)

    def stream(self, prompt: str, **params: Any) -> Iterator[tuple[str, dict | Generation]]:
        """A synchronous request whose progress streams as it runs: ("progress", {...}) events, then
        ("succeeded", Generation); a failure raises SDServeError."""
        body = _image_fields(prompt, **{"num_images": 1, "output_format": "png", "quality": None, **_unset(params)})
        for event in self._event_stream("POST", "/generate", json=body, headers={"Accept": "text/event-stream"}):
            yield self._stream_event(*event)

    def info(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/info"))

    def live(self) -> bool:
        return self._probe(self._http_get_once("/healthz")) is True

    def ready(self) -> bool | None:
        """True once a generator replica is ready; None if the server has no /readyz."""
        return self._probe(self._http_get_once("/readyz"))

    def health(self) -> HealthReport:
        live, ready = self.live(), self.ready()
        try:
            info = self.info() if live else None
        except SDServeError:
            info = None
        return HealthReport(live=live, ready=ready, info=info)

    def _http_get_once(self, path: str) -> httpx.Response:
        """Probes report a 503 rather than wait it out."""
        try:
            return self._http.get(path)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from None


class AsyncSDClient(_Endpoints):
    """The same as `SDClient`, for asyncio: `await sd.generate(...)`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        max_connections: int = 100,
    ):
        self.base_url, api_key = _resolve(url, api_key)
        self.retry = retry
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_headers(api_key),
            timeout=timeout_s,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def __aenter__(self) -> AsyncSDClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        retry = 0
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.base_url) from None
            if response.status_code != 503 or retry >= self.retry.max_retries:
                return response
            await self._sleep(self.retry.delay_s(retry, retry_after_seconds(response.headers.get("retry-after"))))
            retry += 1

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int | None = None,
    ) -> Generation:
        body = _image_fields(**_image_arguments(locals()))
        return self._generation(await self.request("POST", "/generate", json=body))

    async def img2img(
        self,
        prompt: str,
        init_image: InitImage,
        *,
        strength: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
        output_format: OutputFormat = "png",
        quality: int | None = None,
    ) -> Generation:
        params = _image_arguments(locals())
        body = {**_image_fields(**params), "init_image": encode_init_image(init_image)}
        if strength is not None:
            body["strength"] = strength
        return self._generation(await self.request("POST", "/img2img", json=body))

    async def batch(self, entries: Sequence[str | Mapping[str, Any]], **shared: Any) -> list[Generation]:
        data = self._json(await self.request("POST", "/generate/prompts", json=_batch_body(entries, shared)))
        return [Generation.from_json(r) for r in data["results"]]

    # -- jobs (see SDClient) ------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        init_image: InitImage | None = None,
        strength: float | None = None,
        webhook: str | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        num_images: int = 1,
    ) -> JobView:
        params = _job_arguments(locals())
        body = self._job_body(prompt, params, init_image, strength, webhook)
        return self._job(await self.request("POST", "/jobs", json=body))

    async def job(self, job_id: str) -> JobView:
        return self._job(await self.request("GET", f"/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> JobView:
        return self._job(await self.request("DELETE", f"/jobs/{job_id}"))

    async def events(self, job_id: str) -> AsyncIterator[tuple[str, dict]]:
        try:
            async with self._http.stream("GET", f"/jobs/{job_id}/events", timeout=None) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise SDServeError.from_response(response)
                events = _EventLines()
                async for line in response.aiter_lines():
                    if (event := events.feed(line)) is not None:
                        yield event
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from None

    async def wait(self, job_id: str, on_progress: Callable[[dict], Any] | None = None) -> JobView:
        while True:  # as SDClient.wait
            async for kind, data in self.events(job_id):
                if kind == "progress" and on_progress is not None:
                    on_progress(data)
                if kind in FINAL_STATES:
                    break
            job = await self.job(job_id)
            if job.status.final:
                return job
            await self._sleep(REFOLLOW_PAUSE_S)

    async def info(self) -> dict[str, Any]:
        return self._json(await self.request("GET", "/info"))

    async def live(self) -> bool:
        return self._probe(await self._http_get_once("/healthz")) is True

    async def ready(self) -> bool | None:
        return self._probe(await self._http_get_once("/readyz"))

    async def health(self) -> HealthReport:
        live, ready = await self.live(), await self.ready()
        try:
            info = await self.info() if live else None
        except SDServeError:
            info = None
        return HealthReport(live=live, ready=ready, info=info)

    async def _http_get_once(self, path: str) -> httpx.Response:
        try:
            return await self._http.get(path)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from None


def _job_arguments(scope: dict[str, Any]) -> dict[str, Any]:
    """A job method's image parameters (what `_image_fields` takes besides the prompt)."""
    excluded = ("self", "prompt", "init_image", "strength", "webhook")
    return {**{k: v for k, v in scope.items() if k not in excluded}, "output_format": "png", "quality": None}


def _unset(params: dict[str, Any]) -> dict[str, Any]:
    fields = (
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "scheduler",
        "model",
        "loras",
    )
    unknown = set(params) - set(fields) - {"num_images", "output_format", "quality"}
    if unknown:
        raise TypeError(f"unknown parameters: {', '.join(sorted(unknown))}")
    return {**dict.fromkeys(fields), **params}


def _image_arguments(scope: dict[str, Any]) -> dict[str, Any]:
    """A method's own arguments, for forwarding its image parameters without repeating them."""
    return {k: v for k, v in scope.items() if k not in ("self", "init_image", "strength", "params")}
