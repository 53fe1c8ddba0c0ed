"""A scripted stepper and a step engine driven tick by tick: no model, no threads, no sleeps.

The engines' policy tests (`tests/unit/test_engines.py`, `tests/unit/test_admission.py`) drive a `StepEngine`
through `Harness`: every denoiser call, prompt encoding and decode is recorded by prompt.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from serve_app.pipeline.engines import EngineLimits, LoopCounters, StepEngine, Ticket
from serve_app.pipeline.errors import GenerationError
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask


def job(
    prompt="p", steps=3, size=64, seed=0, guidance_scale=7.5, tenant="shared", priority="normal", weight=1.0, **params
) -> ImageTask:
    """One image task for the scripted engine, named by its prompt; `tenant`, `priority` and `weight` as the
    ingress stamps them."""
    return ImageTask(
        ImageParams(
            prompt=prompt,
            seed=seed,
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=guidance_scale,
            **params,
        ),
        tenant=tenant,
        priority=priority,
        weight=weight,
    )


class FakeState:
    def __init__(self, job: ImageTask):
        self.job = job
        self.step_index = 0
        self.total_steps = job.params.num_inference_steps
        self.error = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.step_index >= self.total_steps


class FakeStepper:
    """Records every call; 'bad' prompts fail to start, 'nan' ones fail at their second step."""

    def __init__(self, oom_above: int | None = None):
        self.started: list[list[str]] = []
        self.calls: list[list[str]] = []
        self.decoded: list[list[str]] = []
        self.oom_above = oom_above

    def start(self, jobs):
        self.started.append([j.params.prompt for j in jobs])
        return [GenerationError("cannot encode", "prompt") if j.params.prompt == "bad" else FakeState(j) for j in jobs]

    def step(self, states):
        if self.oom_above is not None and len(states) > self.oom_above:
            raise torch.OutOfMemoryError("simulated")
        self.calls.append([s.job.params.prompt for s in states])
        errors = []
        for state in states:
            state.step_index += 1
            if state.job.params.prompt == "nan" and state.step_index == 2:
                state.error = GenerationError("non-finite latents")
            errors.append(state.error)
        return errors

    def decode(self, states):
        self.decoded.append([s.job.params.prompt for s in states])
        return [np.full((s.job.params.height, s.job.params.width, 3), s.job.seed % 256, np.uint8) for s in states]


class GatedStepper(FakeStepper):
    """A stepper whose denoiser call waits until `release` is set (`entered` says it is inside one): what the loop
    holds stays put while a test looks."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def step(self, states):
        self.entered.set()
        self.release.wait(10)
        return super().step(states)


class FakeModel:
    device = torch.device("cpu")

    def note_failure(self, exc):
        pass


class Harness:
    """A StepEngine driven one tick at a time; results and progress recorded per prompt."""

    def __init__(self, **limits):
        self.stepper = FakeStepper(limits.pop("oom_above", None))
        self.counters = LoopCounters()
        self.engine = StepEngine(FakeModel(), self.stepper, EngineLimits(**limits), self.counters)
        self.results: dict[str, ImageResult | Exception] = {}
        self.progress: dict[str, list[tuple[int, int]]] = {}

    def submit(self, *jobs: ImageTask) -> list[Ticket]:
        tickets = []
        for j in jobs:
            name = j.params.prompt
            ticket = Ticket(
                j,
                [],
                on_done=lambda r, name=name: self.results.__setitem__(name, r),
                on_progress=lambda p, name=name: self.progress.setdefault(name, []).append((p.step, p.total_steps)),
            )
            self.engine.waiting.append(ticket)
            tickets.append(ticket)
        return tickets

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.engine.tick()

    def run(self) -> None:
        while self.engine.has_work():
            self.engine.tick()
