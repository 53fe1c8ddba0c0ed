import numpy as np
import pytest
import torch

from serve_app.pipeline.errors import InsufficientMemoryError, InvalidTaskError
from serve_app.pipeline.loading import PipelineOptions
from serve_app.pipeline.model import GroupRun, LoadedModel
from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.schedulers import SCHEDULER_NAMES
from serve_app.pipeline.tasks import ImageResult, ImageTask


def make_job(init_image=None, **params) -> ImageTask:
    return ImageTask(ImageParams(**params), init_image=init_image)


@pytest.fixture(scope="module")
def model():
    return LoadedModel.load("synthetic:tiny", PipelineOptions(device="cpu", torch_threads=1))


def max_pixel_diff(a: ImageResult, b: ImageResult) -> int:
    return int(np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max())


def test_defaults_come_from_the_preset_and_overrides(model):
    assert (model.defaults.width, model.defaults.num_inference_steps) == (64, 2)
    overridden = LoadedModel(
        model.pipe, model.source, model.options, GenerationDefaults(width=128).over(model.defaults)
    )
    assert overridden.prepare(make_job(prompt="p", seed=0))[0].params.width == 128


def test_same_seed_same_image_alone_or_inside_a_batch(model):
    jobs = [make_job(prompt=f"prompt {i}", seed=100 + i, negative_prompt="ugly" * (i % 2)) for i in range(8)]
    batched = model.generate(jobs)
    assert [image.batch_size for image in batched] == [8] * 8
    for job, in_batch in zip(jobs, batched):
        alone = model.generate([job])[0]
        assert alone.batch_size == 1
        assert max_pixel_diff(alone, in_batch) <= 1  # batched kernels round differently: 1/255 at most


def test_different_seeds_give_different_images(model):
    a, b = model.generate([make_job(prompt="x", seed=1), make_job(prompt="x", seed=2)])
    assert max_pixel_diff(a, b) > 10


def test_a_mixed_batch_runs_one_call_per_group_and_keeps_order(model):
    sizes = [64, 128, 64, 128, 96]
    results = model.generate([make_job(prompt="x", seed=i, width=s, height=s) for i, s in enumerate(sizes)])
    assert [r.pixels.shape[:2] for r in results] == [(s, s) for s in sizes]
    assert [r.batch_size for r in results] == [2, 2, 2, 2, 1]
    assert [r.seed for r in results] == list(range(5))
    assert [r.params.width for r in results] == sizes


@pytest.mark.slow  # seconds: out of the fast loop
def test_every_named_scheduler_runs_and_default_is_the_models(model):
    for name in SCHEDULER_NAMES:
        result = model.generate([make_job(prompt="x", seed=1, scheduler=name, num_inference_steps=3)])[0]
        assert isinstance(result, ImageResult), (name, result)
    # A request for another sampler must not leak into the next default request.
    first = model.generate([make_job(prompt="x", seed=5)])[0]
    model.generate([make_job(prompt="x", seed=5, scheduler="euler_a")])
    again = model.generate([make_job(prompt="x", seed=5)])[0]
    assert max_pixel_diff(first, again) == 0


def test_img2img_shares_weights_and_strength_changes_the_result(model):
    init = model.generate([make_job(prompt="init", seed=9)])[0].pixels
    weak, strong = model.generate(
        [
            make_job(prompt="x", seed=1, init_image=init, strength=0.3, num_inference_steps=10),
            make_job(prompt="x", seed=1, init_image=init, strength=0.9, num_inference_steps=10),
        ]
    )
    assert model.img2img.unet is model.pipe.unet
    assert weak.batch_size == strong.batch_size == 1  # strength is part of the batch key
    # Random VAE weights do not reconstruct the init image, so compare outputs, not distances to it.
    assert max_pixel_diff(weak, strong) > 10
    again = model.generate([make_job(prompt="x", seed=1, init_image=init, strength=0.3, num_inference_steps=10)])
    assert max_pixel_diff(weak, again[0]) == 0


def test_strength_too_small_for_the_steps_is_a_job_error(model):
    init = np.zeros((64, 64, 3), np.uint8)
    [error] = model.generate([make_job(prompt="x", seed=1, init_image=init, strength=0.1, num_inference_steps=4)])
    assert isinstance(error, InvalidTaskError) and error.field == "strength"


def test_long_prompts_are_truncated_with_a_warning(model):
    [image] = model.generate([make_job(prompt="word " * 100, seed=1)])
    assert any("prompt has" in warning and "77" in warning for warning in image.warnings)


def test_out_of_memory_splits_the_batch_before_failing_anyone(model, monkeypatch):
    real_run = model.run_group
    calls = []

    def run_group_with_4_image_memory(jobs, on_step=None):
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(job.params.width > 64 for job in jobs):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(jobs, on_step)

    monkeypatch.setattr(model, "run_group", run_group_with_4_image_memory)
    results = model.generate([make_job(prompt="x", seed=i) for i in range(5)])
    assert all(isinstance(r, ImageResult) for r in results)
    assert calls == [5, 2, 3, 1, 2]
    [too_big] = model.generate([make_job(prompt="x", seed=1, width=128, height=128)])
    assert isinstance(too_big, InsufficientMemoryError) and "128x128" in too_big.message


def test_an_unexpected_failure_reaches_every_job_of_the_call(model, monkeypatch):
    def broken(jobs, on_step=None):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(model, "run_group", broken)
    results = model.generate([make_job(prompt="x", seed=i) for i in range(3)])
    assert all(r.status == 500 and "RuntimeError" in r.message for r in results)


def test_calls_are_counted_by_batch_size(model):
    model.calls_by_batch_size.clear()
    model.generate([make_job(prompt="x", seed=i) for i in range(3)])
    model.generate([make_job(prompt="x", seed=1)])
    assert dict(model.calls_by_batch_size) == {3: 1, 1: 1}


def test_group_run_reports_its_duration(model):
    run = model.run_group([make_job(prompt="x", seed=1).with_defaults(model.defaults)])
    assert isinstance(run, GroupRun) and run.seconds > 0 and run.images[0].dtype == np.uint8


def test_describe_names_device_dtype_and_defaults(model):
    info = model.describe()
    assert info["model"] == "synthetic:tiny" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["defaults"]["width"] == 64 and "euler_a" in info["schedulers"]


def test_sdxl_empty_and_nonempty_negative_prompts_do_not_share_a_call():
    xl = LoadedModel.load("synthetic:tiny-xl", PipelineOptions(device="cpu"))
    jobs = [make_job(prompt="x", seed=1), make_job(prompt="x", seed=2, negative_prompt="bad")]
    batched = xl.generate(jobs + [make_job(prompt="y", seed=3)])
    assert [r.batch_size for r in batched] == [2, 1, 2]
    assert max_pixel_diff(batched[0], xl.generate(jobs[:1])[0]) <= 1


def test_health_check_fails_once_the_pipeline_is_broken(model):
    from serve_app.pipeline.errors import PipelineUnavailableError

    model.check_health()  # healthy: returns quietly
    model._fatal_error = "CUDA error: an illegal memory access was encountered"
    try:
        with pytest.raises(PipelineUnavailableError, match="needs a restart"):
            model.check_health()
    finally:
        model._fatal_error = None


def test_a_cuda_error_marks_the_engine_broken(model, monkeypatch):
    def cuda_failure(jobs, on_step=None):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(model, "run_group", cuda_failure)
    monkeypatch.setattr(model, "device", torch.device("cuda"))
    [result] = model.generate([make_job(prompt="x", seed=1)])
    assert result.status == 500
    assert model._fatal_error and "device-side assert" in model._fatal_error
    model._fatal_error = None


def test_checking_jobs_never_shares_a_tokenizer_with_prompt_encoding(model):
    """A fast tokenizer sets padding per call: checking a job on the caller's thread while the model
    thread encodes prompts on the same tokenizer made 10-token prompt embeddings instead of 77."""
    assert model._counting_tokenizer is not model.pipe.tokenizer
    assert model._counting_tokenizer._tokenizer is not model.pipe.tokenizer._tokenizer
    assert len(model._counting_tokenizer("a cat").input_ids) == len(model.pipe.tokenizer("a cat").input_ids)
