"""SD3 and FLUX.1 through LoadedModel (the request engine: whole diffusers calls) and through the engine loop
(the step engine: FlowStepper), against the plain diffusers pipelines; what `describe` says of a flow model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import run_through_loop
from PIL import Image

from serve_app.pipeline.engines import EngineLimits, EngineLoop, LoopCounters, TaskCancelled, make_engine
from serve_app.pipeline.loading import PipelineOptions
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask, to_uint8

INIT = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def load(preset: str) -> LoadedModel:
    model = LoadedModel.load(f"synthetic:{preset}", PipelineOptions(device="cpu", torch_threads=1))
    model.defaults = GenerationDefaults(num_inference_steps=3).over(model.defaults)
    return model


@pytest.fixture(scope="module")
def models():
    return {"sd3": load("tiny-sd3"), "dev": load("tiny-flux-dev")}


@pytest.fixture
def sd3(models):
    return models["sd3"]


@pytest.fixture
def dev(models):
    return models["dev"]


def pixels(result) -> np.ndarray:
    assert isinstance(result, ImageResult), result
    return result.pixels.astype(int)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def plain(model: LoadedModel, tasks: list[ImageTask], **call) -> list[np.ndarray]:
    """The plain pipeline's images (its own scheduler), as diffusers' documentation calls it."""
    from diffusers import AutoPipelineForImage2Image

    tasks = [model.prepare(task)[0] for task in tasks]
    p = tasks[0].params
    pipe = model.pipe if tasks[0].init_image is None else AutoPipelineForImage2Image.from_pipe(model.pipe)
    pipe.scheduler = type(model.model_scheduler).from_config(model.model_scheduler.config)
    kwargs = {
        "prompt": [t.params.prompt for t in tasks],
        "num_inference_steps": p.num_inference_steps,
        "guidance_scale": p.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(t.seed) for t in tasks],
        "max_sequence_length": model.max_sequence_length,
        "width": p.width,
        "height": p.height,
        "output_type": "np",
        **call,
    }
    if tasks[0].init_image is not None:
        kwargs.update(image=[Image.fromarray(t.init_image) for t in tasks], strength=p.strength)
    with torch.inference_mode():
        return list(to_uint8(pipe(**kwargs).images).astype(int))


def test_describe_names_the_family_its_samplers_and_text_length(sd3, dev):
    info = sd3.describe()
    assert (info["family"], info["pipeline"], info["max_sequence_length"], info["max_prompt_tokens"]) == (
        "sd3",
        "StableDiffusion3Pipeline",
        64,
        64,
    )
    assert "flow_euler" in info["schedulers"] and "euler" not in info["schedulers"]
    assert "flow_unipc" in info["schedulers"] and "flow_unipc" not in info["image_to_image_schedulers"]
    assert dev.describe()["family"] == "flux"
    assert (dev.defaults.width, dev.defaults.guidance_scale) == (64, 3.5)  # the preset's own defaults


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_the_request_engine_makes_the_plain_sd3_pipelines_images(sd3, kind, record_property):
    init = INIT if kind == "img2img" else None
    tasks = [
        ImageTask(ImageParams(prompt=f"a harbour {i}", seed=i, negative_prompt="fog" * (i % 2)), init_image=init)
        for i in range(3)
    ]
    results = sd3.generate(tasks)
    assert [r.batch_size for r in results] == [3] * 3
    reference = plain(sd3, tasks, negative_prompt=[t.params.negative_prompt for t in tasks])
    diff = max(int(np.abs(pixels(r) - ref).max()) for r, ref in zip(results, reference))
    record_property(f"max_diff_request_engine[sd3-{kind}]", diff)
    assert diff == 0  # the same call, the same batch


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_the_request_engine_makes_the_plain_flux_pipelines_images_with_and_without_true_cfg(dev, kind, record_property):
    init = INIT if kind == "img2img" else None
    plain_tasks = [ImageTask(ImageParams(prompt=f"a harbour {i}", seed=i), init_image=init) for i in range(2)]
    true_cfg = [
        ImageTask(ImageParams(prompt="a harbour", seed=7, negative_prompt="fog", true_cfg_scale=4.0), init_image=init)
    ]
    results = dev.generate(plain_tasks + true_cfg)
    assert [r.batch_size for r in results] == [2, 2, 1]  # true_cfg_scale is part of the call key
    reference = plain(dev, plain_tasks) + plain(dev, true_cfg, negative_prompt=["fog"], true_cfg_scale=4.0)
    diff = max(int(np.abs(pixels(r) - ref).max()) for r, ref in zip(results, reference))
    record_property(f"max_diff_request_engine[flux-dev-{kind}]", diff)
    assert diff == 0


def test_prompts_are_counted_in_t5_tokens_against_the_models_text_length(sd3):
    _, warnings = sd3.prepare(ImageTask(ImageParams(prompt="word " * 40, seed=1)))
    assert len(warnings) == 1 and "the model reads the first 64" in warnings[0]
    assert sd3.prepare(ImageTask(ImageParams(prompt="a short prompt", seed=1)))[1] == []


def test_both_engines_make_the_same_images_from_one_mixed_burst_of_flow_tasks(dev, record_property):
    tasks = [
        ImageTask(ImageParams(prompt="one", seed=1, num_inference_steps=2)),
        ImageTask(ImageParams(prompt="two", seed=2, num_inference_steps=4, guidance_scale=5.0)),
        ImageTask(ImageParams(prompt="three", seed=3, strength=0.7), init_image=INIT),
        ImageTask(ImageParams(prompt="four", seed=4, true_cfg_scale=2.0, negative_prompt="fog")),
        ImageTask(ImageParams(prompt="five", seed=5, width=128, height=64)),
        ImageTask(ImageParams(prompt="six", seed=6, width=64, height=128)),
    ]
    reference = dev.generate(tasks)
    results, counters = run_through_loop(dev, "step", tasks)
    diffs = [max_diff(ref, got) for ref, got in zip(reference, results)]
    record_property("max_diff_step_engine_vs_request_engine[flux-dev]", max(diffs))
    assert max(diffs) <= 1
    assert [r.pixels.shape for r in results[-2:]] == [(64, 128, 3), (128, 64, 3)]
    calls = counters.snapshot()["model_calls_by_batch_size"]
    assert max(int(k) for k in calls) == 4  # the four 64x64 images in one call; the two odd sizes apart


def test_the_step_engine_reports_progress_and_lets_a_cancelled_image_go(sd3):
    loop = EngineLoop(make_engine(sd3, "step", EngineLimits(), LoopCounters()), sd3.prepare)
    assert loop.engine.kind == "step" and type(loop.engine.stepper).__name__ == "FlowStepper"
    progress: dict[str, list[int]] = {"kept": [], "cancelled": []}
    outcomes: dict[str, object] = {}
    done = threading.Event()
    tickets = {}

    def on_progress(name):
        def record(p):
            progress[name].append(p.step)
            if name == "cancelled" and p.step == 2:
                tickets["cancelled"].cancel()

        return record

    def on_done(name):
        def record(result):
            outcomes[name] = result
            if len(outcomes) == 2:
                done.set()

        return record

    try:
        for name, steps in (("kept", 6), ("cancelled", 8)):
            task = ImageTask(ImageParams(prompt=name, seed=1, num_inference_steps=steps), preview_every=3)
            tickets[name] = loop.submit(task, on_done(name), on_progress(name))
        assert done.wait(60)
    finally:
        loop.stop()
    assert isinstance(outcomes["kept"], ImageResult) and progress["kept"] == list(range(7))
    assert isinstance(outcomes["cancelled"], TaskCancelled) and progress["cancelled"][-1] < 8
    assert loop.counters.cancelled_in_flight == 1


def test_a_pipeline_no_stepper_knows_runs_whole_calls_with_the_reason_logged(sd3, caplog):
    from diffusers import AutoPipelineForImage2Image

    img2img_only = LoadedModel(AutoPipelineForImage2Image.from_pipe(sd3.pipe), sd3.source, sd3.options, sd3.defaults)
    with caplog.at_level("WARNING"):
        engine = make_engine(img2img_only, "step", EngineLimits(), LoopCounters())
    assert engine.kind == "request" and "StableDiffusion3Img2ImgPipeline" in caplog.text
