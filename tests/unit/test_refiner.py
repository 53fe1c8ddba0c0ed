"""SDXL's refiner on the toy SDXL pair (synthetic:tiny-xl + synthetic:tiny-xl-refiner): loaded on first use,
sharing the base's second text encoder and VAE; an ensemble of experts for text to image, the refiner alone
for image to image; the same image through either engine and alone or batched."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_through_loop

from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.params import ImageParams
from serve_app.pipeline.tasks import ImageResult, ImageTask


def load_model():
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    options = PipelineOptions(device="cpu", torch_threads=1)
    return LoadedModel.load("synthetic:tiny-xl", options, refiner="synthetic:tiny-xl-refiner")


@pytest.fixture(scope="module")
def model():
    return load_model()


def _job(seed: int, refiner: dict | None = None, steps: int = 4, init_image=None, strength=None) -> ImageTask:
    params = ImageParams(
        prompt=f"a lighthouse {seed}", seed=seed, num_inference_steps=steps, refiner=refiner, strength=strength
    )
    return ImageTask(params, init_image=init_image)


def _pixels(result) -> np.ndarray:
    assert isinstance(result, ImageResult), result
    return result.pixels.astype(int)


def test_the_refiner_loads_on_first_use_and_shares_the_bases_text_encoder_and_vae():
    fresh = load_model()  # not the module's model: other tests may have used its refiner already
    assert fresh.describe()["refiner"] == {"model": "synthetic:tiny-xl-refiner", "loaded": False, "load_s": None}
    [plain] = fresh.generate([_job(1)])
    assert isinstance(plain, ImageResult) and fresh.describe()["refiner"]["loaded"] is False  # not needed yet
    [refined] = fresh.generate([_job(1, {})])
    assert isinstance(refined, ImageResult)
    described = fresh.describe()["refiner"]
    assert described["loaded"] is True and described["load_s"] > 0  # loaded by the first image that asked
    refiner = fresh.refiner
    assert refiner.vae is fresh.pipe.vae and refiner.text_encoder_2 is fresh.pipe.text_encoder_2
    assert refiner.text_encoder is None


def test_ensemble_of_experts_finishes_the_bases_image_and_the_split_changes_it(model):
    base, half, default, explicit = model.generate(
        [_job(1), _job(1, {"denoising_start": 0.5}), _job(1, {}), _job(1, {"denoising_start": 0.8})]
    )
    assert np.abs(_pixels(half) - _pixels(base)).max() > 5  # the refiner ran the second half
    assert np.abs(_pixels(half) - _pixels(default)).max() > 5
    assert np.array_equal(_pixels(default), _pixels(explicit))  # 0.8 is the default split
    assert default.params.refiner.denoising_start == 0.8


def test_the_step_engine_runs_refiner_jobs_whole_beside_stepped_ones_with_the_same_images(model):
    jobs = [_job(1, {}), _job(2), _job(3, {"denoising_start": 0.5})]
    alone = [model.generate([job])[0] for job in jobs]
    for kind in ("step", "request"):
        results, _ = run_through_loop(model, kind, jobs)
        for one, through_loop in zip(alone, results):
            assert np.abs(_pixels(one) - _pixels(through_loop)).max() <= 1, kind


def test_image_to_image_with_the_refiner_redoes_the_init_image_at_strength(model):
    init = np.full((64, 64, 3), 120, dtype=np.uint8)
    with_base, with_refiner = model.generate(
        [_job(1, init_image=init, strength=0.5), _job(1, {}, init_image=init, strength=0.5)]
    )
    assert np.abs(_pixels(with_base) - _pixels(with_refiner)).max() > 5


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (_job(1, {"denoising_start": 0.1}, steps=2), "refiner.denoising_start"),  # no step left for the base
        (_job(1, {"denoising_start": 0.5}, init_image=np.zeros((64, 64, 3), np.uint8), strength=0.5), "refiner."),
    ],
)
def test_a_refiner_request_that_cannot_run_fails_naming_the_field(model, job, field):
    [error] = model.generate([job])
    assert isinstance(error, InvalidTaskError) and error.field.startswith(field)


def test_a_model_without_a_refiner_says_so():
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    plain = LoadedModel.load("synthetic:tiny", PipelineOptions(device="cpu", torch_threads=1))
    [error] = plain.generate([_job(1, {})])
    assert isinstance(error, InvalidTaskError) and error.field == "refiner"
