"""`SDClient`: the client's plans driven with blocking I/O (httpx.Client, time.sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from typing_extensions import Unpack

from ..api.jobs.protocol import JobView
from .base import ClientBase
from .core import Plan, PlanRun, Stream, warn_renamed
from .requests import GenerateOptions, Img2ImgOptions, InitImage, JobOptions, OutputFormat, Request
from .results import GeneratedImage, Generation, HealthReport

T = TypeVar("T")


class SDClient(ClientBase):
    """Blocking client of the native API.

        with SDClient("http://127.0.0.1:8000") as sd:
            result = sd.generate("a lighthouse at dawn", seed=42, num_images=2)

    A 503 (server busy) is retried as `retry` says, waiting as its Retry-After asks; every other
    error is raised as `SDServeError` with the server's status, code, field, message and request id.
    """

    _http_client = httpx.Client
    _default_sleep = staticmethod(time.sleep)

    def __enter__(self) -> SDClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send any request (httpx's keyword arguments), retrying 503s; the last answer whatever its status."""
        return self._call(self.core.request(method, path, **kwargs))

    # -- generating

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
        """Text to image. Options left out take the server's defaults; image i gets seed + i."""
        return self._call(self.core.generate(prompt, **options))

    def img2img(self, prompt: str, init_image: InitImage, **options: Unpack[Img2ImgOptions]) -> Generation:
        """Image to image from a file path, raw bytes (PNG/JPEG/WebP) or a PIL image."""
        return self._call(self.core.img2img(prompt, init_image, **options))

    def generate_prompts(
        self, entries: Sequence[str | Mapping[str, Any]], **shared: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """Many prompts in one request (POST /generate/prompts): strings share the `shared` options,
        dicts are whole entries that override them."""
        return self._call(self.core.generate_prompts(entries, **shared))

    def batch(self, entries: Sequence[str | Mapping[str, Any]], **shared: Any) -> list[Generation]:
        """Deprecated: the old name of `generate_prompts`."""
        warn_renamed("SDClient.batch", "generate_prompts")
        return self.generate_prompts(entries, **shared)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> Iterator[tuple[str, dict | Generation]]:
        """/generate with its progress as it runs: ("progress", {...}) events, then ("succeeded", Generation).
        A failure raises SDServeError, as does a stream that ends before the images come."""
        return self._iterate(self.core.stream(prompt, **options))

    # -- jobs: submit now, watch, fetch later

    def submit(self, prompt: str, **options: Unpack[JobOptions]) -> JobView:
        """Queue a job (text to image, or image to image with `init_image`); returns at once with its id."""
        return self._call(self.core.submit(prompt, **options))

    def job(self, job_id: str) -> JobView:
        return self._call(self.core.job(job_id))

    def jobs(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[JobView], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at the end)."""
        return self._call(self.core.jobs(status, limit, cursor))

    def cancel(self, job_id: str) -> JobView:
        return self._call(self.core.cancel(job_id))

    def download(
        self, job_id: str, index: int = 0, output_format: OutputFormat = "png", quality: int | None = None
    ) -> GeneratedImage:
        """Image `index` of a succeeded job, in `output_format`, with its seed and batch size."""
        return self._call(self.core.download(job_id, index, output_format, quality))

    def events(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """The job's server-sent events as (kind, data): queued, running, progress, then the final one."""
        return self._iterate(self.core.events(job_id))

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict], Any] | None = None,
        *,
        on_event: Callable[[str, dict], Any] | None = None,
    ) -> JobView:
        """Follow the job until it ends and return it as it ended. `on_progress` gets each progress update
        (step, total_steps, images_done, num_images), `on_event` every event as (kind, data). A stream that
        ends before the job does (a proxy's idle time-out, a restarted queue holder) is opened again."""
        return self._call(self.core.wait(job_id, on_progress, on_event))

    # -- the server

    def info(self) -> dict[str, Any]:
        return self._call(self.core.info())

    def live(self) -> bool:
        """/healthz answers 200."""
        return self._call(self.core.live())

    def ready(self) -> bool | None:
        """True once a generator replica is ready; None if the server has no /readyz."""
        return self._call(self.core.ready())

    def health(self) -> HealthReport:
        return self._call(self.core.health())

    # -- the driver: the I/O that plans ask for

    def _call(self, plan: Plan[T]) -> T:
        run = self.core.start(plan)
        for _ in self._drive(run):
            pass
        return run.result

    def _iterate(self, plan: Plan[Any]) -> Iterator[Any]:
        return self._drive(self.core.start(plan))

    def _drive(self, run: PlanRun[Any]) -> Iterator[Any]:
        """Perform each step the plan asks for and hand on what it emits, until it returns."""
        try:
            while True:
                yield from run.emitted()
                if run.step is None:
                    return
                with run.catching_transport_errors():
                    run.resume(run.step.perform(self))
        finally:
            for stream in run.open_streams():
                stream.response.close()

    def _send(self, request: Request) -> httpx.Response | Stream:
        response = self._http.send(request.build(self._http), stream=request.streamed)
        if request.streamed and response.is_error:
            response.read()  # the plan raises it with the server's message
        elif request.streamed:
            return Stream(response, response.iter_lines())
        return response

    def _next_line(self, stream: Stream) -> str | None:
        return next(stream.lines, None)

    def _close_stream(self, stream: Stream) -> None:
        stream.response.close()

    def _pause(self, seconds: float) -> None:
        self._sleep(seconds)
