"""The client's core: every method of the API once, as a plan that the sync and async clients drive.

A plan is a generator. It yields the steps it needs done (send a request, read the next line of a
streamed answer, pause, hand an item to the caller) and is sent back what each step gave, so that it
holds the logic of a method (the request, the 503 retries, reading the answer, following a job's
events again when its stream ends early) and none of the I/O. `SDClient` performs the steps with
httpx.Client and time.sleep, `AsyncSDClient` with httpx.AsyncClient and asyncio.sleep: each is a
thin driver, and both have the whole surface because both drive the same plans.

    answer = yield Send(request)    # an httpx.Response, read whole; a streamed request's a Stream (unless an error)
    line = yield NextLine(stream)   # the stream's next line; None once it has ended (and closed)
    yield Close(stream)             # stop reading it early
    yield Pause(seconds)
    yield Emit(item)                # an iterating method (events, stream) hands `item` to its caller

Each I/O step's `perform(driver)` calls the driver's `_send`, `_next_line`, `_close_stream` or
`_pause`; the async client's return awaitables, so both run `step.perform(self)`, one awaiting it.
`PlanRun` is the rest of driving: replies in, emitted items out, transport errors thrown in.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from typing_extensions import Unpack

from ..api.jobs.protocol import JobView
from . import requests
from .errors import RetryPolicy, SDServeConnectionError, SDServeError, retry_after_seconds
from .requests import GenerateOptions, Img2ImgOptions, InitImage, JobOptions, OutputFormat, Request
from .results import GeneratedImage, Generation, HealthReport

FINAL_STATES = ("succeeded", "failed", "canceled")
REFOLLOW_PAUSE_S = 1.0  # before opening the stream of a job again when the last one ended early

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "SD_SERVE_URL"
API_KEY_ENV = "SD_SERVE_API_KEY"

T = TypeVar("T")


# -- steps: what a plan asks its driver to do ------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """A streamed answer being read: its status and headers, and the driver's iterator over its lines."""

    response: httpx.Response
    lines: Any  # Iterator[str] (sync) or AsyncIterator[str] (async): only the driver reads it


@dataclass(frozen=True)
class Send:
    request: Request

    def perform(self, driver: Any) -> Any:
        return driver._send(self.request)


@dataclass(frozen=True)
class NextLine:
    stream: Stream

    def perform(self, driver: Any) -> Any:
        return driver._next_line(self.stream)


@dataclass(frozen=True)
class Close:
    stream: Stream

    def perform(self, driver: Any) -> Any:
        return driver._close_stream(self.stream)


@dataclass(frozen=True)
class Pause:
    seconds: float

    def perform(self, driver: Any) -> Any:
        return driver._pause(self.seconds)


@dataclass(frozen=True)
class Emit:
    """Not I/O: an item for the caller of an iterating method (events, stream)."""

    item: Any


Step = Send | NextLine | Close | Pause | Emit
Plan = Generator[Step, Any, T]


class PlanRun(Generic[T]):
    """One plan as a driver runs it: `step` is the I/O it asks for now, None once it has returned
    `result`. A driver hands on what `emitted()` gives, performs the step and sends its reply in with
    `resume`, until the step is None. The streams the plan opened are kept, so that the driver can
    close those left open when the run ends early (an error, a caller that stops reading).
    """

    def __init__(self, plan: Plan[T], base_url: str):
        self.step: Step | None = None
        self.result: T | None = None
        self.streams: list[Stream] = []
        self._plan = plan
        self._base_url = base_url
        self._advance(plan.send, None)

    def emitted(self) -> Iterator[Any]:
        """The items the plan emits before its next I/O step, each as the caller asks for it."""
        while isinstance(self.step, Emit):
            yield self.step.item
            self.resume()

    def resume(self, reply: Any = None) -> None:
        if isinstance(reply, Stream):
            self.streams.append(reply)
        self._advance(self._plan.send, reply)

    @contextlib.contextmanager
    def catching_transport_errors(self) -> Iterator[None]:
        """A transport error raised in the block is thrown into the plan, as the client's own error
        (SDServeConnectionError, SDServeTimeout), where the plan asked for the step that failed."""
        try:
            yield
        except httpx.TransportError as exc:
            self._advance(self._plan.throw, SDServeConnectionError.from_transport_error(exc, self._base_url))

    def open_streams(self) -> list[Stream]:
        return [stream for stream in self.streams if not stream.response.is_closed]

    def _advance(self, resume: Callable[[Any], Step], value: Any) -> None:
        try:
            self.step = resume(value)
        except StopIteration as done:
            self.step, self.result = None, done.value


# -- the plans -----------------------------------------------------------------------------------


class ClientCore:
    """Where a client sends (URL, API key, time-out), how it retries, and a plan for each of its methods.

    `url` defaults to $SD_SERVE_URL, then http://127.0.0.1:8000; `api_key` to $SD_SERVE_API_KEY.
    """

    refollow_pause_s = REFOLLOW_PAUSE_S

    def __init__(self, url: str | None, *, api_key: str | None, timeout_s: float, retry: RetryPolicy):
        self.base_url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get(API_KEY_ENV)
        self.timeout_s = timeout_s
        self.retry = retry

    def http_options(self) -> dict[str, Any]:
        """What httpx.Client and httpx.AsyncClient are built with."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeout_s}

    def start(self, plan: Plan[T]) -> PlanRun[T]:
        return PlanRun(plan, self.base_url)

    # -- sending, retrying, reading answers

    def request(self, method: str, path: str, **kwargs: Any) -> Plan[httpx.Response]:
        """Any request (httpx's keyword arguments); the last answer whatever its status."""
        return (yield from self._answer(Request(method, path, kwargs)))

    def _answer(self, request: Request) -> Plan[Any]:
        """The answer to `request`. A 503 (server busy), or a 429 (rate limited) whose Retry-After is within
        the policy's longest wait, is sent again, waiting as Retry-After says, up to the policy's retries; the
        last answer is returned whatever its status (a daily quota's 429 says to come back tomorrow: raised)."""
        retry = 0
        while True:
            answer = yield Send(request)
            response = answer.response if isinstance(answer, Stream) else answer
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
            busy = response.status_code == 503
            limited = response.status_code == 429 and retry_after is not None and retry_after <= self.retry.max_wait_s
            if not (busy or limited) or retry >= self.retry.max_retries:
                return answer
            yield Pause(self.retry.delay_s(retry, retry_after))
            retry += 1

    def _json(self, request: Request) -> Plan[Any]:
        return _json_of((yield from self._answer(request)))

    def _job(self, request: Request) -> Plan[JobView]:
        return JobView.model_validate((yield from self._json(request)))

    def _generation(self, request: Request) -> Plan[Generation]:
        return Generation.from_json((yield from self._json(request)))

    def _events(self, request: Request) -> Plan[EventReader]:
        """Open a stream of server-sent events (retrying a 503 as any request)."""
        answer = yield from self._answer(request)
        if isinstance(answer, httpx.Response):  # an error: the driver read it whole
            raise SDServeError.from_response(answer)
        return EventReader(answer)

    def _probe(self, path: str) -> Plan[bool | None]:
        """200 -> True, 503 -> False, 404 -> None (the server has no such route). Sent once: a probe
        reports a busy server rather than wait it out."""
        response = yield Send(Request("GET", path))
        if response.status_code == 404:
            return None
        if response.status_code in (200, 503):
            return response.status_code == 200
        raise SDServeError.from_response(response)

    # -- generating

    def generate(self, prompt: str, **options: Unpack[GenerateOptions]) -> Plan[Generation]:
        return (yield from self._generation(requests.generate(prompt, options)))

    def img2img(self, prompt: str, init_image: InitImage, **options: Unpack[Img2ImgOptions]) -> Plan[Generation]:
        return (yield from self._generation(requests.img2img(prompt, init_image, options)))

    def generate_prompts(
        self, entries: Sequence[str | Mapping[str, Any]], **shared: Unpack[GenerateOptions]
    ) -> Plan[list[Generation]]:
        data = yield from self._json(requests.generate_prompts(entries, shared))
        return [Generation.from_json(result) for result in data["results"]]

    def stream(self, prompt: str, **options: Unpack[GenerateOptions]) -> Plan[None]:
        """Emits ("progress", {...}) as the request runs, then ("succeeded", Generation)."""
        events = yield from self._events(requests.generate_streamed(prompt, options))
        while (event := (yield from events.next())) is not None:
            kind, data = event
            if kind == "failed":
                error = data.get("error", {})
                raise SDServeError(error.get("message", "failed"), code=error.get("code", ""), field=error.get("field"))
            if kind == "succeeded":
                yield Emit((kind, Generation.from_json(data)))
                return
            yield Emit(event)
        raise SDServeError("the server's event stream ended before the images came")

    # -- jobs

    def submit(self, prompt: str, **options: Unpack[JobOptions]) -> Plan[JobView]:
        return (yield from self._job(requests.submit(prompt, options)))

    def job(self, job_id: str) -> Plan[JobView]:
        return (yield from self._job(requests.job(job_id)))

    def jobs(self, status: str | None, limit: int, cursor: str | None) -> Plan[tuple[list[JobView], str | None]]:
        data = yield from self._json(requests.jobs(status, limit, cursor))
        return [JobView.model_validate(job) for job in data["jobs"]], data["next_cursor"]

    def cancel(self, job_id: str) -> Plan[JobView]:
        return (yield from self._job(requests.cancel(job_id)))

    def download(
        self, job_id: str, index: int, output_format: OutputFormat, quality: int | None
    ) -> Plan[GeneratedImage]:
        response = yield from self._answer(requests.job_image(job_id, index, output_format, quality))
        if response.is_error:
            raise SDServeError.from_response(response)
        image = (yield from self.job(job_id)).images[index]
        media_type = response.headers.get("content-type", f"image/{output_format}")
        return GeneratedImage(response.content, image.seed, media_type, image.metadata.get("batch_size", 0))

    def events(self, job_id: str) -> Plan[None]:
        """Emits each (kind, data) of the job's stream as it comes."""
        events = yield from self._events(requests.job_events(job_id))
        while (event := (yield from events.next())) is not None:
            yield Emit(event)

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[dict], Any] | None = None,
        on_event: Callable[[str, dict], Any] | None = None,
    ) -> Plan[JobView]:
        """Follow the job's events until its final one, then read the job as it ended. A stream that
        ends before the job does (a proxy's idle time-out, a restarted queue holder) is opened again
        after a pause, for as long as the job has not ended."""
        while True:
            events = yield from self._events(requests.job_events(job_id))
            while (event := (yield from events.next())) is not None:
                kind, data = event
                if on_event is not None:
                    on_event(kind, data)
                if kind == "progress" and on_progress is not None:
                    on_progress(data)
                if kind in FINAL_STATES:
                    yield from events.close()
                    break
            job = yield from self.job(job_id)
            if job.status.final:
                return job
            yield Pause(self.refollow_pause_s)

    # -- the server

    def info(self) -> Plan[dict[str, Any]]:
        return (yield from self._json(Request("GET", "/info")))

    def live(self) -> Plan[bool]:
        return (yield from self._probe("/healthz")) is True

    def ready(self) -> Plan[bool | None]:
        return (yield from self._probe("/readyz"))

    def health(self) -> Plan[HealthReport]:
        live = yield from self.live()
        ready = yield from self.ready()
        try:
            info = (yield from self.info()) if live else None
        except SDServeError:
            info = None
        return HealthReport(live=live, ready=ready, info=info)


class EventReader:
    """The server-sent events of a stream, one at a time: each blank line ends an event."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self._lines: list[str] = []

    def next(self) -> Plan[tuple[str, dict] | None]:
        """The next event as (kind, data); None once the stream has ended."""
        while (line := (yield NextLine(self.stream))) is not None:
            if (event := self._feed(line)) is not None:
                return event
        return None

    def close(self) -> Plan[None]:
        yield Close(self.stream)

    def _feed(self, line: str) -> tuple[str, dict] | None:
        if line:
            self._lines.append(line)
            return None
        lines, self._lines = self._lines, []
        kind, data = "message", []
        for entry in lines:
            if entry.startswith("event:"):
                kind = entry.partition(":")[2].strip()
            elif entry.startswith("data:"):
                data.append(entry.partition(":")[2].strip())
        return (kind, json.loads("\n".join(data))) if data else None


def _json_of(response: httpx.Response) -> Any:
    if response.is_error:
        raise SDServeError.from_response(response)
    return response.json()


def warn_renamed(old: str, new: str) -> None:
    """A method's old name still works, once warned (DeprecationWarning, pointing at the caller's line)."""
    warnings.warn(f"{old} is now {new}; the old name will go", DeprecationWarning, stacklevel=3)
