"""Masks and hires fix through both engines on the real tiny models: the same images from whole diffusers calls
(the request engine) and from the step engine, where a hires image is one ticket in two phases: its progress runs
once over both, and cancelling it in its second phase ends it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import run_through_loop

from serve_app.pipeline.engines import EngineLimits, EngineLoop, LoopCounters, TaskCancelled, make_engine
from serve_app.pipeline.loading import PipelineOptions
from serve_app.pipeline.masks import model_mask
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import HiresParams, ImageParams, InpaintParams
from serve_app.pipeline.tasks import ImageResult, ImageTask

INIT = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), dtype=np.uint8)
MASK[8:40, 24:56] = 255


@pytest.fixture(scope="module")
def tiny():
    return LoadedModel.load("synthetic:tiny", PipelineOptions(device="cpu", torch_threads=1))


def task(prompt: str, seed: int, **fields) -> ImageTask:
    init_image, mask = fields.pop("init_image", None), fields.pop("mask", None)
    return ImageTask(ImageParams(prompt=prompt, seed=seed, num_inference_steps=3, **fields), init_image, mask=mask)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.slow
def test_both_engines_make_the_same_edits_from_one_mixed_burst(tiny, record_property):
    jobs = [
        task("plain", 1),
        task("masked", 2, init_image=INIT, mask=MASK, strength=0.8),
        task("masked, only the region", 3, init_image=INIT, mask=MASK, inpaint=InpaintParams(only_masked=True)),
        task("hires latent", 4, hires=HiresParams(scale=1.5, denoising_strength=0.6)),
        task("hires lanczos", 5, hires=HiresParams(upscaler="Lanczos", steps=2, denoising_strength=0.5)),
        task("image to image", 6, init_image=INIT, strength=0.5, scheduler="euler"),
    ]
    by_engine = {}
    for kind in ("step", "request"):
        results, _ = run_through_loop(tiny, kind, jobs)
        assert all(isinstance(r, ImageResult) for r in results), results
        by_engine[kind] = results
    diffs = [max_diff(a.pixels, b.pixels) for a, b in zip(by_engine["step"], by_engine["request"])]
    record_property("max_diff_edits_step_vs_request", max(diffs))
    assert max(diffs) <= 1
    sizes = [r.pixels.shape[:2] for r in by_engine["step"]]
    assert sizes == [(64, 64)] * 3 + [(96, 96), (128, 128), (64, 64)]
    outside = np.asarray(model_mask(MASK, InpaintParams().mask_blur)) == 0
    for result in by_engine["step"][1:3]:  # pasted back (the default): the input's pixels outside the blurred mask
        assert (result.pixels[outside] == INIT[outside]).all()


def test_a_hires_image_reports_progress_over_both_phases_and_cancels_in_the_second(tiny):
    counters = LoopCounters()
    loop = EngineLoop(make_engine(tiny, "step", EngineLimits(), counters), tiny.prepare)
    try:
        progress, done = [], threading.Event()
        results: list = []
        hires = HiresParams(steps=2, denoising_strength=0.5)
        first = task("two phases", 1, hires=hires, scheduler="euler")
        loop.submit(first, lambda r: (results.append(r), done.set()), progress.append)
        assert done.wait(60)
        assert isinstance(results[0], ImageResult) and results[0].pixels.shape == (128, 128, 3)
        steps = [(p.step, p.total_steps) for p in progress]
        assert steps[0] == (0, 3 + 2) and steps[-1] == (5, 5)  # 3 steps, then the second pass's 2
        assert [s for s, _ in steps] == sorted(s for s, _ in steps) and {t for _, t in steps} == {5}

        cancelled, ended = [], threading.Event()
        holder: list = []

        def on_progress(p):
            if p.step >= 4 and holder:  # inside the second phase
                holder[0].cancel()

        holder.append(
            loop.submit(
                task("cancelled later", 2, hires=hires, scheduler="euler"),
                lambda r: (cancelled.append(r), ended.set()),
                on_progress,
            )
        )
        assert ended.wait(60)
        assert isinstance(cancelled[0], TaskCancelled)
        assert counters.cancelled_in_flight == 1
    finally:
        loop.stop()


def test_an_inpainting_model_through_both_engines(record_property):
    model = LoadedModel.load("synthetic:tiny-inpaint", PipelineOptions(device="cpu", torch_threads=1))
    jobs = [task("a", 1, init_image=INIT, mask=MASK), task("b", 2, init_image=INIT, mask=255 - MASK, strength=0.7)]
    step, _ = run_through_loop(model, "step", jobs)
    request, _ = run_through_loop(model, "request", jobs)
    diffs = [max_diff(a.pixels, b.pixels) for a, b in zip(step, request)]
    record_property("max_diff_inpainting_model_step_vs_request", max(diffs))
    assert max(diffs) <= 1
    [refused], _ = run_through_loop(model, "step", [task("no mask", 3)])
    assert refused.field == "mask" and "inpainting model" in refused.message
    assert model.warmup() > 0  # its warm-up image has a mask
