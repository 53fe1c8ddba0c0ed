"""Inpainting, outpainting and hires fix in the step engine's UNet mechanics (serve_app/pipeline/steppers/unet.py),
against the plain diffusers pipelines.

The invariant, as for text and image to image (tests/unit/test_unet_stepper.py): an image made by UNetStepper
equals the one diffusers makes for the same parameters and seed, bit for bit alone, within 1/255 beside others.
Masked rows of a text-to-image model (the unmasked area re-noised after each step, as
`StableDiffusion(XL)InpaintPipeline` does with a 4-channel UNet) share the UNet call with text-to-image and
image-to-image rows; an inpainting model (`synthetic:tiny-inpaint`, a 9-channel UNet) reads the mask itself.
Hires fix equals two plain calls: text to image, the upscale, image to image.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import lazy_fixtures, started, step_to_the_end
from PIL import Image

from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.hires import second_phase_task, upscale_latents, upscale_pixels, upscales_latents
from serve_app.pipeline.loading import ModelSource, PipelineOptions, inpainting, load_pipeline
from serve_app.pipeline.masks import masked_inputs, overlay
from serve_app.pipeline.params import GenerationDefaults, HiresParams, ImageParams, InpaintParams
from serve_app.pipeline.schedulers import SchedulerTemplates, make_scheduler
from serve_app.pipeline.steppers.unet import UNetStepper
from serve_app.pipeline.tasks import ImageTask, to_uint8

DEFAULTS = GenerationDefaults(width=64, height=64, num_inference_steps=3, guidance_scale=7.5, strength=0.75)
INIT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), dtype=np.uint8)
MASK[16:48, 8:40] = 255  # a box, not aligned to the 8x8 latent cells on every side
# Exactly the pipeline's: no paste-back (diffusers' pipeline does not paste back without a crop).
AS_DIFFUSERS = InpaintParams(mask_blur=0, paste_back=False)


class Model:
    """A tiny pipeline, its img2img and inpaint twins, and a UNetStepper over them."""

    def __init__(self, source: str):
        from diffusers import AutoPipelineForImage2Image

        self.pipe = load_pipeline(ModelSource.parse(source), PipelineOptions(device="cpu", torch_threads=1))
        self.model_scheduler = self.pipe.scheduler
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        self.img2img.set_progress_bar_config(disable=True)
        self.inpaint = inpainting(self.pipe)
        self.stepper = UNetStepper(self.pipe, SchedulerTemplates(self.model_scheduler), img2img_pipe=self.img2img)
        self._fresh: dict = {}

    def scheduler(self, name: str):
        if name not in self._fresh:
            self._fresh[name] = make_scheduler(name, self.model_scheduler)
        return copy.deepcopy(self._fresh[name])

    def common(self, job: ImageTask) -> dict:
        p = job.params
        return {
            "prompt": [p.prompt],
            "negative_prompt": [p.negative_prompt] if p.negative_prompt else None,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(p.seed)],
            "output_type": "np",
        }

    def reference(self, job: ImageTask) -> np.ndarray:
        """The image the plain pipeline makes for this task."""
        p = job.params
        if job.mask is not None:
            return self.inpaint_reference(job)
        if p.hires is not None:
            return self.hires_reference(job)
        kwargs = self.common(job)
        if job.init_image is None:
            pipe = self.pipe
            kwargs.update(width=p.width, height=p.height)
        else:
            pipe = self.img2img
            kwargs.update(image=[Image.fromarray(job.init_image)], strength=p.strength)
        pipe.scheduler = self.scheduler(p.scheduler)
        with torch.inference_mode():
            return to_uint8(pipe(**kwargs).images)[0]

    def inpaint_reference(self, job: ImageTask) -> np.ndarray:
        """StableDiffusion(XL)InpaintPipeline for the same inputs (filled image, blurred mask, crop), then the
        paste-back the server adds when asked."""
        p = job.params
        inputs = masked_inputs(job)
        kwargs = {**self.common(job), "strength": p.strength, "width": p.width, "height": p.height}
        kwargs.update(image=inputs.image, mask_image=inputs.mask)
        if inputs.crop is not None:
            kwargs.update(padding_mask_crop=inputs.padding, output_type="pil")
        self.inpaint.scheduler = self.scheduler(p.scheduler)
        with torch.inference_mode():
            out = self.inpaint(**kwargs).images
        if inputs.crop is not None:
            return np.asarray(out[0])
        pixels = to_uint8(out)[0]
        return overlay(inputs, pixels, self.inpaint.image_processor) if inputs.paste_back else pixels

    def hires_reference(self, job: ImageTask) -> np.ndarray:
        """Two plain calls: text to image (latents or pixels), the upscale, image to image from the same seed."""
        p, hires = job.params, job.params.hires
        width, height = hires.target_size(p.width, p.height)
        latent = upscales_latents(hires)
        self.pipe.scheduler = self.scheduler(p.scheduler)
        first = {**self.common(job), "width": p.width, "height": p.height}
        first["output_type"] = "latent" if latent else "np"
        with torch.inference_mode():
            out = self.pipe(**first).images
            if latent:
                image = upscale_latents(out, hires, width, height, 8)
            else:
                image = [Image.fromarray(upscale_pixels(to_uint8(out)[0], hires, width, height))]
            second = second_phase_task(job, flow=False).params
            kwargs = {**self.common(job), "image": image, "strength": second.strength}
            kwargs.update(prompt=[second.prompt], num_inference_steps=second.num_inference_steps)
            self.img2img.scheduler = self.scheduler(second.scheduler)
            return to_uint8(self.img2img(**kwargs).images)[0]

    def start(self, *jobs: ImageTask):
        return started(self.stepper, *jobs)

    def finish(self, *states) -> list[np.ndarray]:
        """Step the states together (each leaves when done; a hires first pass goes on as its second), decode."""

        def second_phases(states: list, running: list) -> None:
            for state in [s for s in running if s.done and s.task.params.hires is not None]:
                [second] = self.stepper.second_phase([state])
                states[states.index(state)] = second
                running.append(second)

        return self.stepper.decode(step_to_the_end(self.stepper, states, second_phases))

    def alone(self, job: ImageTask) -> np.ndarray:
        return self.finish(*self.start(job))[0]


@pytest.fixture(scope="module")
def sd():
    return Model("synthetic:tiny")


@pytest.fixture(scope="module")
def xl():
    return Model("synthetic:tiny-xl")


@pytest.fixture(scope="module")
def nine():
    return Model("synthetic:tiny-inpaint")


@pytest.fixture
def models(request):
    """models[name]: the model of that fixture, loaded when first asked for (a test needs one of them)."""
    return lazy_fixtures(request, {"inpainting-model": "nine"})


def fast_only(*fast, cases):
    """pytest params of `cases` (tuples), all but those in `fast` marked slow: `make test` runs every one."""
    return [pytest.param(*case, marks=() if case in fast else pytest.mark.slow) for case in cases]


def job(*, init_image=None, mask=None, **params) -> ImageTask:
    values = {"prompt": "a cat", "seed": 3, **params}
    return ImageTask(ImageParams(**values), init_image=init_image, mask=mask).with_defaults(DEFAULTS)


def masked_job(mask=MASK, inpaint=AS_DIFFUSERS, **params) -> ImageTask:
    return job(init_image=INIT, mask=mask, inpaint=inpaint, **params)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# -- alone: bit for bit --------------------------------------------------------------------


ALONE = [
    (model, scheduler, strength)
    for model in ("sd", "xl", "inpainting-model")
    for scheduler in ("default", "euler_a", "dpmpp_2m", "heun")
    for strength in (0.75, 1.0)
]


@pytest.mark.parametrize(
    ("model", "scheduler", "strength"),
    fast_only(
        ("sd", "default", 0.75),
        ("sd", "euler_a", 1.0),
        ("xl", "dpmpp_2m", 1.0),
        ("inpainting-model", "euler_a", 0.75),
        cases=ALONE,
    ),
)
def test_a_masked_image_alone_equals_the_inpaint_pipeline(models, model, scheduler, strength, record_property):
    m = models[model]
    task = masked_job(scheduler=scheduler, strength=strength, negative_prompt="blurry", seed=11)
    diff = max_diff(m.alone(task), m.reference(task))
    record_property(f"max_diff_inpaint_alone[{model}-{scheduler}-{strength}]", diff)
    assert diff == 0


OPTIONS = {
    "noise-blur-paste": InpaintParams(mask_blur=4, fill="noise", paste_back=True),
    "blurred": InpaintParams(mask_blur=0, fill="blurred", paste_back=False),
    "only-masked": InpaintParams(mask_blur=2, only_masked=True, only_masked_padding=8),
}


@pytest.mark.parametrize(
    ("model", "inpaint"),
    fast_only(
        ("sd", OPTIONS["only-masked"]),
        ("inpainting-model", OPTIONS["noise-blur-paste"]),
        cases=[(model, options) for model in ("sd", "inpainting-model") for options in OPTIONS.values()],
    ),
)
def test_fill_blur_and_only_masked_alone_equal_the_pipeline(models, model, inpaint, record_property):
    m = models[model]
    task = masked_job(inpaint=inpaint, scheduler="euler", seed=5)
    diff = max_diff(m.alone(task), m.reference(task))
    record_property(f"max_diff_inpaint_options[{model}-{inpaint.fill}-{inpaint.only_masked}]", diff)
    assert diff == 0


@pytest.mark.parametrize("blur", [pytest.param(0, marks=pytest.mark.slow), 4])
def test_paste_back_keeps_every_pixel_outside_the_mask(sd, blur):
    task = masked_job(inpaint=InpaintParams(mask_blur=blur, paste_back=True), seed=2)
    image = sd.alone(task)
    outside = np.asarray(masked_inputs(task).mask) == 0  # the blurred mask (the mask itself when blur is 0)
    assert (image[outside] == INIT[outside]).all()
    if blur == 0:
        assert (outside == (MASK < 128)).all()
    raw = sd.alone(masked_job(inpaint=InpaintParams(mask_blur=blur, paste_back=False), seed=2))
    assert max_diff(raw[outside], INIT[outside]) > 10  # without it the VAE round trip moves them


def test_outpainting_is_inpainting_of_the_new_border(sd, record_property):
    padded = np.pad(INIT[16:48, 16:48], ((16, 16), (16, 16), (0, 0)), mode="edge")
    border = np.full((64, 64), 255, dtype=np.uint8)
    border[16:48, 16:48] = 0
    task = job(init_image=padded, mask=border, inpaint=InpaintParams(mask_blur=0), seed=4, strength=1.0)
    image = sd.alone(task)
    assert max_diff(image, sd.reference(task)) == 0
    assert (image[16:48, 16:48] == INIT[16:48, 16:48]).all()  # the original, pasted back exactly


# -- together: one UNet call per tick ----------------------------------------------------------


@pytest.mark.parametrize("model", ["sd", pytest.param("xl", marks=pytest.mark.slow)])
def test_masked_rows_share_the_unet_call_with_others_at_other_steps(models, model, record_property):
    m = models[model]
    first = job(prompt="a lighthouse", seed=5, scheduler="euler", num_inference_steps=4)
    others = [
        masked_job(prompt="a boat", seed=8, scheduler="dpmpp_2m", num_inference_steps=4, strength=0.8),
        masked_job(prompt="a dog", seed=9, scheduler="euler_a", num_inference_steps=2, strength=1.0),
        job(init_image=INIT, prompt="an owl", seed=10, scheduler="euler", num_inference_steps=4, strength=0.5),
        masked_job(prompt="a boat", seed=12, scheduler="dpmpp_2m", num_inference_steps=4, strength=0.8),
    ]
    [a] = m.start(first)
    calls = []
    handle = m.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        m.stepper.step([a])
        states = m.start(*others)
        assert states[0].scheduler is states[3].scheduler  # masked rows in lockstep share a cohort too
        images = m.finish(a, *states)
    finally:
        handle.remove()
    assert calls[1] == 2 * 5  # the text-to-image row and four others in one call, each with guidance
    diffs = [max_diff(image, m.reference(j)) for image, j in zip(images, (first, *others))]
    record_property(f"max_diff_inpaint_batched[{model}]", max(diffs))
    assert max(diffs) <= 1


@pytest.mark.slow
def test_an_inpainting_model_batches_its_masked_rows(nine, record_property):
    mask_b = np.zeros((64, 64), dtype=np.uint8)
    mask_b[:32] = 255
    jobs = [
        masked_job(prompt="a", seed=1, scheduler="euler", num_inference_steps=4),
        masked_job(prompt="b", seed=2, scheduler="dpmpp_2m", mask=mask_b, guidance_scale=1.0, strength=0.6),
        masked_job(prompt="c", seed=3, scheduler="euler", num_inference_steps=4),
    ]
    states = nine.start(*jobs)
    nine.stepper.step(states[:1])
    images = nine.finish(*states)
    diffs = [max_diff(image, nine.reference(j)) for image, j in zip(images, jobs)]
    record_property("max_diff_inpainting_model_batched", max(diffs))
    assert max(diffs) <= 1


@pytest.mark.slow
def test_a_masked_cohort_splits_exactly(sd, record_property):
    jobs = [masked_job(prompt=f"p{i}", seed=40 + i, scheduler="dpmpp_2m", num_inference_steps=4) for i in range(3)]
    states = sd.start(*jobs)
    sd.stepper.step(states)
    kept = [states[0], states[2]]
    while not kept[0].done:
        sd.stepper.step(kept)
    while not states[1].done:
        sd.stepper.step([states[1]])
    diffs = [max_diff(image, sd.reference(j)) for image, j in zip(sd.stepper.decode(states), jobs)]
    record_property("max_diff_inpaint_split", max(diffs))
    assert max(diffs) <= 1


# -- hires fix: a second phase of the same image ---------------------------------------------


HIRES = [
    HiresParams(scale=2, upscaler="Latent", denoising_strength=0.5),
    HiresParams(scale=1.5, upscaler="Latent (nearest)", steps=3, denoising_strength=0.7, prompt="a tiger"),
    HiresParams(width=128, upscaler="Lanczos", steps=2, denoising_strength=0.6, scheduler="euler"),
    HiresParams(scale=2, upscaler="None", denoising_strength=1.0),
]


@pytest.mark.parametrize(
    ("model", "hires"),
    fast_only(("sd", HIRES[0]), cases=[(model, hires) for model in ("sd", "xl") for hires in HIRES]),
)
def test_hires_fix_equals_two_plain_calls(models, model, hires, record_property):
    m = models[model]
    task = job(hires=hires, scheduler="dpmpp_2m", num_inference_steps=4, seed=21)
    image = m.alone(task)
    assert image.shape[:2] == hires.target_size(64, 64)[::-1]
    diff = max_diff(image, m.reference(task))
    record_property(f"max_diff_hires[{model}-{hires.upscaler}]", diff)
    assert diff == 0


def test_hires_second_pass_runs_exactly_its_steps(sd):
    task = job(hires=HiresParams(steps=3, denoising_strength=0.7), num_inference_steps=4, scheduler="euler")
    [first] = sd.start(task)
    assert sd.stepper.second_phase_steps(task) == 3
    while not first.done:
        sd.stepper.step([first])
    [second] = sd.stepper.second_phase([first])
    assert (second.total_steps, second.task.params.num_inference_steps) == (3, 4)  # the last 3 of int(3 / 0.7)
    assert second.shape_key != first.shape_key  # a new size: another group


# -- refusals --------------------------------------------------------------------------------------------------


def test_masks_that_repaint_nothing_or_do_not_fit_are_refused(sd, nine):
    cases = [
        (np.zeros((64, 64), dtype=np.uint8), "selects no pixel"),
        (np.zeros((32, 32), dtype=np.uint8), "is 32x32 pixels and the image 64x64"),
        (np.zeros((64, 64, 3), dtype=np.uint8), "greyscale"),
    ]
    speck = np.zeros((64, 64), dtype=np.uint8)
    speck[3, 3] = 255  # between the latent cells' samples
    cases.append((speck, "covers too little"))
    for mask, message in cases:
        [error] = sd.stepper.start([masked_job(mask=mask)])
        assert isinstance(error, InvalidTaskError) and error.field == "mask" and message in str(error), error
    [error] = nine.stepper.start([job(prompt="no mask")])
    assert isinstance(error, InvalidTaskError) and error.field == "mask" and "inpainting model" in str(error)
    [error] = sd.stepper.start([job(init_image=INIT, hires=HiresParams())])
    assert isinstance(error, InvalidTaskError) and error.field == "hires"
    [error] = sd.stepper.start([job(hires=HiresParams(width=128, height=64))])  # A1111 would crop: not offered
    assert isinstance(error, InvalidTaskError) and error.field == "hires" and "aspect ratio" in str(error)
