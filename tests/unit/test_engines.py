"""The engine loop's policy, tick by tick, with a scripted stepper (no model, no threads, no sleeps);
then the loop's thread and both engines on the real tiny model."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from helpers import Collector, run_through_loop
from scripted import FakeModel, FakeStepper, GatedStepper, Harness, job

from serve_app.pipeline.engines import (
    EngineLimits,
    EngineLoop,
    LoopCounters,
    RequestEngine,
    StepEngine,
    TaskCancelled,
    Ticket,
    make_engine,
)
from serve_app.pipeline.errors import GenerationError, InsufficientMemoryError
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask


def test_a_job_joins_the_running_batch_at_the_next_tick_and_leaves_when_done():
    h = Harness(max_batch_size=8)
    h.submit(job("long", steps=5))
    h.tick(2)
    h.submit(job("short", steps=2))
    h.run()
    assert h.stepper.calls == [["long"], ["long"], ["long", "short"], ["long", "short"], ["long"]]
    assert h.stepper.decoded == [["short"], ["long"]]  # the short one is handed back first
    assert h.counters.admitted == 2 and h.counters.admitted_mid_flight == 1
    assert h.counters.model_calls_by_batch_size == {1: 3, 2: 2}
    assert h.progress["short"] == [(0, 2), (1, 2), (2, 2)]
    assert isinstance(h.results["short"], ImageResult) and h.results["short"].batch_size == 2
    assert h.counters.succeeded == 2


def test_jobs_that_arrive_together_start_together_different_parameters_included():
    h = Harness()
    h.submit(job("a", steps=2), job("b", steps=4, scheduler="euler"), job("c", steps=3, guidance_scale=1.0))
    h.run()
    assert h.stepper.started == [["a", "b", "c"]]  # one batched prompt encoding
    assert h.stepper.calls[0] == ["a", "b", "c"]


def test_max_batch_size_caps_each_size_and_sizes_take_turns():
    h = Harness(max_batch_size=2)
    h.submit(job("a1"), job("a2"), job("a3"), job("b1", size=128))
    h.tick(4)
    assert h.stepper.calls == [["a1", "a2"], ["b1"], ["a1", "a2"], ["b1"]]  # a3 waits: its size is full
    h.run()
    assert h.stepper.calls.count(["a3"]) == 3 and all(len(call) <= 2 for call in h.stepper.calls)


def test_max_active_requests_bounds_images_in_flight_across_sizes():
    h = Harness(max_batch_size=8, max_active_requests=2)
    h.submit(job("a"), job("b", size=128), job("c", size=256))
    h.tick()
    assert h.stepper.started == [["a", "b"]] and h.engine.active == 2 and len(h.engine.waiting) == 1


def test_fewest_steps_admission_lets_short_jobs_pass_long_ones():
    h = Harness(max_batch_size=1, admission="fewest_steps")
    h.submit(job("long", steps=9), job("short", steps=1))
    h.tick()
    assert h.stepper.started == [["short"]]
    fifo = Harness(max_batch_size=1)
    fifo.submit(job("long", steps=9), job("short", steps=1))
    fifo.tick()
    assert fifo.stepper.started == [["long"]]


def test_a_cancelled_job_stops_costing_rows_at_the_next_tick():
    h = Harness()
    [keep, gone] = h.submit(job("keep", steps=4), job("gone", steps=4))
    h.tick()
    gone.cancel()
    h.run()
    assert h.stepper.calls == [["keep", "gone"], ["keep"], ["keep"], ["keep"]]
    assert isinstance(h.results["gone"], TaskCancelled) and h.counters.cancelled_in_flight == 1
    assert isinstance(h.results["keep"], ImageResult)


def test_a_job_cancelled_while_waiting_never_starts():
    h = Harness()
    [ticket] = h.submit(job("never"))
    ticket.cancel()
    h.run()
    assert h.stepper.started == [] and h.counters.cancelled_before_start == 1
    assert isinstance(h.results["never"], TaskCancelled)


def test_a_job_failing_alone_does_not_fail_its_neighbours():
    h = Harness()
    h.submit(job("bad"), job("nan"), job("fine"))
    h.run()
    assert h.results["bad"].field == "prompt" and "non-finite" in h.results["nan"].message
    assert isinstance(h.results["fine"], ImageResult)
    assert h.stepper.calls == [["nan", "fine"], ["nan", "fine"], ["fine"]]
    assert (h.counters.failed, h.counters.succeeded) == (2, 1)


def test_out_of_memory_steps_the_group_in_halves_and_fails_only_what_cannot_fit():
    h = Harness(oom_above=2)
    h.submit(*(job(f"j{i}", steps=1) for i in range(5)))
    h.tick()
    assert h.stepper.calls == [["j0", "j1"], ["j2"], ["j3", "j4"]]
    assert all(isinstance(h.results[f"j{i}"], ImageResult) for i in range(5))
    lone = Harness(oom_above=0)
    lone.submit(job("huge", size=256))
    lone.run()
    assert isinstance(lone.results["huge"], InsufficientMemoryError) and "256x256" in lone.results["huge"].message


# -- the loop's thread ----------------------------------------------------------------------------


def test_the_loop_thread_runs_jobs_submitted_from_elsewhere_and_a_failing_model_call_fails_only_its_images():
    class BuggyStepper(FakeStepper):
        def step(self, states):
            if any(s.job.params.prompt == "explode" for s in states):
                raise KeyError("a bug")  # not one image's error: the whole model call fails
            return super().step(states)

    engine = StepEngine(FakeModel(), BuggyStepper(), EngineLimits(), LoopCounters())
    loop = EngineLoop(engine, prepare=lambda j: (j, []))
    try:
        done = Collector(3)
        loop.submit_all([job("ok", seed=1), job("explode", size=128), job("ok2", seed=2)], done)
        assert done.all_done.wait(10)
        assert isinstance(done.results[0], ImageResult) and isinstance(done.results[2], ImageResult)
        assert isinstance(done.results[1], GenerationError) and "KeyError" in done.results[1].message
    finally:
        loop.stop()


def test_when_a_tick_itself_breaks_every_ticket_it_held_still_ends():
    class BrokenEngine(StepEngine):
        def tick(self):
            super().tick()
            raise RuntimeError("a bug in the policy")

    engine = BrokenEngine(FakeModel(), FakeStepper(), EngineLimits(), LoopCounters())
    loop = EngineLoop(engine, prepare=lambda j: (j, []))
    try:
        done = Collector(2)
        loop.submit_all([job("a", steps=5), job("b", steps=5)], done)
        assert done.all_done.wait(10)
        assert all(isinstance(r, GenerationError) and "RuntimeError" in r.message for r in done.results.values())
        assert engine.active == 0
    finally:
        loop.stop()


def test_a_bad_job_is_answered_at_once_without_reaching_the_thread():
    def refuse(j):
        raise GenerationError("no", "strength")

    loop = EngineLoop(StepEngine(FakeModel(), FakeStepper(), EngineLimits(), LoopCounters()), prepare=refuse)
    try:
        got = []
        loop.submit(job("x"), on_done=got.append)
        assert got and got[0].field == "strength" and loop.counters.failed == 1
    finally:
        loop.stop()


# -- whole pipeline calls ---------------------------------------------------------------------


class ScriptedEngine(FakeModel):
    """An LoadedModel's request-level surface: groups by steps, one 'call' per group."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def groups(self, jobs):
        by_steps: dict[int, list[int]] = {}
        for index, j in enumerate(jobs):
            by_steps.setdefault(j.params.num_inference_steps, []).append(index)
        return list(by_steps.values())

    def run_prepared(self, members, on_step=None):
        self.calls.append([j.params.prompt for j, _ in members])
        steps = members[0][0].params.num_inference_steps
        for step in range(1, steps + 1):
            if on_step(step, steps):
                break
        return [ImageResult(np.zeros((8, 8, 3), np.uint8), j.params, len(members), 0.01, w) for j, w in members]


def test_request_batcher_runs_one_call_per_group_and_reports_progress():
    counters = LoopCounters()
    model = ScriptedEngine()
    engine = RequestEngine(model, EngineLimits(max_batch_size=3), counters)
    progress: list = []
    results: list = []
    for name, steps in (("a", 2), ("b", 3), ("c", 2), ("d", 2)):
        engine.waiting.append(
            Ticket(
                job(name, steps=steps),
                [],
                on_done=results.append,
                on_progress=lambda p, n=name: progress.append((n, p.step)),
            )
        )
    engine.tick()
    assert model.calls == [["a", "c"], ["b"]]  # d waits: max_batch_size 3
    assert ("a", 2) in progress and ("b", 3) in progress
    engine.tick()
    assert model.calls[-1] == ["d"] and counters.model_calls_by_batch_size == {2: 1, 1: 2}
    assert len(results) == 4 and counters.succeeded == 4


def test_request_batcher_stops_a_call_whose_jobs_were_all_cancelled():
    model = ScriptedEngine()
    stopped_at = []
    original = model.run_prepared

    def run(members, on_step=None):
        def watch(step, total):
            stop = on_step(step, total)
            if stop:
                stopped_at.append(step)
            return stop

        return original(members, watch)

    model.run_prepared = run
    engine = RequestEngine(model, EngineLimits(), LoopCounters())
    results = []
    ticket = Ticket(job("gone", steps=5), [], on_done=results.append, on_progress=lambda p: ticket.cancel())
    engine.waiting.append(ticket)
    engine.tick()
    assert stopped_at == [1] and isinstance(results[0], TaskCancelled)


# -- the real tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    return LoadedModel.load("synthetic:tiny", PipelineOptions(device="cpu", torch_threads=1))


def test_both_engines_make_the_plain_pipelines_images_from_one_mixed_burst(model):
    jobs = [
        ImageTask(ImageParams(prompt=f"mixed {i}", seed=i, num_inference_steps=steps, scheduler=sampler))
        for i, (steps, sampler) in enumerate([(2, "default"), (6, "euler"), (3, "dpmpp_2m"), (4, "euler_a")] * 2)
    ]
    reference = model.generate(jobs)  # whole pipeline calls, grouped by parameters
    for kind in ("step", "request"):
        results, counters = run_through_loop(model, kind, jobs)
        for ref, got in zip(reference, results):
            assert isinstance(got, ImageResult), got
            assert np.abs(got.pixels.astype(int) - ref.pixels.astype(int)).max() <= 1, kind
    # The step engine ran the 8 different requests together: one size, so every call held them all at first.
    _, counters = run_through_loop(model, "step", jobs)
    assert max(int(k) for k in counters.snapshot()["model_calls_by_batch_size"]) == 8


def test_make_batcher_steps_models_it_knows(model):
    assert make_engine(model, "step", EngineLimits(), LoopCounters()).kind == "step"
    assert make_engine(model, "request", EngineLimits(), LoopCounters()).kind == "request"


def test_a_job_that_could_not_finish_before_its_deadline_is_refused_at_once():
    import time

    from serve_app.pipeline.errors import OverloadedError

    stepper = GatedStepper()
    engine = StepEngine(FakeModel(), stepper, EngineLimits(), LoopCounters())
    loop = EngineLoop(engine, prepare=lambda j: (j, []))
    try:
        loop.submit(job("long", steps=40), on_done=lambda r: None)  # no rate measured yet: admitted
        assert stepper.entered.wait(10)  # the loop holds 40 steps of work and is inside a UNet call
        loop.counters.step_rate = 10.0  # image-steps per second, as if measured: 4 s of work ahead
        refused: list = []
        loop.submit(dataclasses.replace(job("late", steps=10), deadline=time.time() + 2), on_done=refused.append)
        assert isinstance(refused[0], OverloadedError) and refused[0].status == 503
        assert refused[0].retry_after_s == 4 and "deadline" in refused[0].message
        accepted: list = []
        loop.submit(dataclasses.replace(job("in time", steps=10), deadline=time.time() + 60), on_done=accepted.append)
        assert not accepted and loop.counters.refused == 1 and loop.waiting == 1  # queued, not refused
    finally:
        stepper.release.set()
        loop.stop()


def test_a_job_asking_for_previews_gets_a_small_png_of_its_latents_every_k_steps(model):
    import io

    from PIL import Image

    previews: list = []
    counters = LoopCounters()
    loop = EngineLoop(make_engine(model, "step", EngineLimits(), counters), model.prepare)
    try:
        done = threading.Event()
        job = ImageTask(
            ImageParams(prompt="preview", seed=1, num_inference_steps=6, scheduler="euler"), preview_every=2
        )
        loop.submit(job, on_done=lambda r: done.set(), on_progress=previews.append)
        assert done.wait(60)
    finally:
        loop.stop()
    with_image = [p for p in previews if p.preview is not None]
    assert [p.step for p in with_image] == [2, 4]  # every 2 steps, none for the finished image
    assert Image.open(io.BytesIO(with_image[0].preview)).size == (8, 8)  # latent resolution of 64x64
