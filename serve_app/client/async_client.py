"""`AsyncSDClient`: the client's plans driven with asyncio (httpx.AsyncClient, asyncio.sleep)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from typing_extensions import Unpack

from ..api.jobs.protocol import JobView
from .base import ClientBase
from .core import Plan, PlanRun, Stream, warn_renamed
from .requests import GenerateOptions, Img2ImgOptions, InitImage, JobOptions, OutputFormat, Request
from .results import GeneratedImage, Generation, HealthReport

T = TypeVar("T")


class AsyncSDClient(ClientBase):
    """The same methods as `SDClient`, for asyncio: `await sd.generate(...)`, `async for kind, data in
    sd.events(job_id)`. Many requests share its connections (`max_connections`, default 100)."""

    _http_client = httpx.AsyncClient
    _default_sleep = staticmethod(asyncio.sleep)

    async def __aenter__(self) -> AsyncSDClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self._call(self.core.request(method, path, **kwargs))

    async def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Generation:
        return await self._call(self.core.generate(prompt, **options))

    async def img2img(self, prompt: str, init_image: InitImage, **options: Unpack[Img2ImgOptions]) -> Generation:
        return await self._call(self.core.img2img(prompt, init_image, **options))

    async def generate_prompts(
        self, entries: Sequence[str | Mapping[str, Any]], **shared: Unpack[GenerateOptions]
    ) -> list[Generation]:
        return await self._call(self.core.generate_prompts(entries, **shared))

    async def batch(self, entries: Sequence[str | Mapping[str, Any]], **shared: Any) -> list[Generation]:
        """Deprecated: the old name of `generate_prompts`."""
        warn_renamed("AsyncSDClient.batch", "generate_prompts")
        return await self.generate_prompts(entries, **shared)

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> AsyncIterator[tuple[str, dict | Generation]]:
        return self._iterate(self.core.stream(prompt, **options))

    async def submit(self, prompt: str, **options: Unpack[JobOptions]) -> JobView:
        return await self._call(self.core.submit(prompt, **options))

    async def job(self, job_id: str) -> JobView:
        return await self._call(self.core.job(job_id))

    async def jobs(
        self, status: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[JobView], str | None]:
        return await self._call(self.core.jobs(status, limit, cursor))

    async def cancel(self, job_id: str) -> JobView:
        return await self._call(self.core.cancel(job_id))

    async def download(
        self, job_id: str, index: int = 0, output_format: OutputFormat = "png", quality: int | None = None
    ) -> GeneratedImage:
        return await self._call(self.core.download(job_id, index, output_format, quality))

    def events(self, job_id: str) -> AsyncIterator[tuple[str, dict]]:
        return self._iterate(self.core.events(job_id))

    async def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict], Any] | None = None,
        *,
        on_event: Callable[[str, dict], Any] | None = None,
    ) -> JobView:
        return await self._call(self.core.wait(job_id, on_progress, on_event))

    async def info(self) -> dict[str, Any]:
        return await self._call(self.core.info())

    async def live(self) -> bool:
        return await self._call(self.core.live())

    async def ready(self) -> bool | None:
        return await self._call(self.core.ready())

    async def health(self) -> HealthReport:
        return await self._call(self.core.health())

    # -- the driver: the I/O that plans ask for

    async def _call(self, plan: Plan[T]) -> T:
        run = self.core.start(plan)
        async for _ in self._drive(run):
            pass
        return run.result

    def _iterate(self, plan: Plan[Any]) -> AsyncIterator[Any]:
        return self._drive(self.core.start(plan))

    async def _drive(self, run: PlanRun[Any]) -> AsyncIterator[Any]:
        """Perform each step the plan asks for and hand on what it emits, until it returns."""
        try:
            while True:
                for item in run.emitted():
                    yield item
                if run.step is None:
                    return
                with run.catching_transport_errors():
                    run.resume(await run.step.perform(self))
        finally:
            for stream in run.open_streams():
                await stream.response.aclose()

    async def _send(self, request: Request) -> httpx.Response | Stream:
        response = await self._http.send(request.build(self._http), stream=request.streamed)
        if request.streamed and response.is_error:
            await response.aread()  # the plan raises it with the server's message
        elif request.streamed:
            return Stream(response, response.aiter_lines())
        return response

    async def _next_line(self, stream: Stream) -> str | None:
        return await anext(stream.lines, None)

    async def _close_stream(self, stream: Stream) -> None:
        await stream.response.aclose()

    async def _pause(self, seconds: float) -> None:
        paused = self._sleep(seconds)
        if inspect.isawaitable(paused):  # a plain function is fine too
            await paused
