"""Helpers for tests that read images out of responses (unit route tests and end-to-end tests)."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
from PIL import Image


def decode(data: bytes | str) -> Image.Image:
    if isinstance(data, str):
        data = base64.b64decode(data)
    return Image.open(io.BytesIO(data))


def png(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return decode(response.content)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def b64(data: bytes) -> str:
    """Bytes as the base64 text JSON bodies carry images in."""
    return base64.b64encode(data).decode()


def error_of(response: httpx.Response) -> dict:
    """The error document of a 4xx answer (failing on any other status)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return response.json()["error"]


def png_bytes(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def burst(url: str, requests: list[tuple[str, dict]], timeout: float = 120) -> list[httpx.Response]:
    """Send (path, json) requests all at once from threads; answers in request order."""
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(base_url=url, timeout=timeout) as http, ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda item: http.post(item[0], json=item[1]), requests))


# -- the engine loop, in-process ------------------------------------------------------------


class Collector:
    """on_done for `EngineLoop.submit_all`: every job's result by index; `all_done` once all came."""

    def __init__(self, expected: int):
        self.results: dict[int, object] = {}
        self.expected = expected
        self.all_done = threading.Event()

    def __call__(self, index, result):
        self.results[index] = result
        if len(self.results) == self.expected:
            self.all_done.set()


def run_through_loop(model, kind: str, jobs: list, limits=None):
    """Every job's result through a real engine loop of `kind` ("step" or "request"), and its counters."""
    from serve_app.pipeline.engines import EngineLimits, EngineLoop, LoopCounters, make_engine

    counters = LoopCounters()
    loop = EngineLoop(make_engine(model, kind, limits or EngineLimits(), counters), model.prepare)
    try:
        done = Collector(len(jobs))
        loop.submit_all(jobs, done)
        assert done.all_done.wait(120)
        return [done.results[i] for i in range(len(jobs))], counters
    finally:
        loop.stop()


def lazy_fixtures(request, aliases: dict[str, str] | None = None) -> dict:
    """fixtures[name]: the fixture `name` (or the one `aliases` maps it to), set up when a test first asks for it
    (module-scoped models a test needs one of, without loading the others)."""
    aliases = aliases or {}

    class Lazy(dict):
        def __missing__(self, name):
            return request.getfixturevalue(aliases.get(name, name))

    return Lazy()


def started(stepper, *tasks) -> list:
    """A stepper's states for tasks that must start (none may fail)."""
    states = stepper.start(list(tasks))
    for state in states:
        assert not isinstance(state, Exception), state
    return states


def step_to_the_end(stepper, states: list, after_each_step=None) -> list:
    """Step the states together until all are done (each leaves when it finishes); `after_each_step(running)`
    may add states to `running` or swap finished ones (a hires second phase). The states' latest list."""
    states, running = list(states), list(states)
    while running:
        errors = stepper.step(running)
        assert errors == [None] * len(running), errors
        if after_each_step is not None:
            after_each_step(states, running)
        running = [state for state in running if not state.done]
    return states
