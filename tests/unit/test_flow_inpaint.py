"""Inpainting on the flow-matching transformers (serve_app/pipeline/steppers/flow.py): SD3 and FLUX.1 masked rows
stepped beside others, against diffusers' StableDiffusion3InpaintPipeline and FluxInpaintPipeline.

Each masked row follows its inpaint pipeline's recipe: after every step the unmasked area is the image's latents
`scale_noise`d to the next sigma (FLUX.1: packed). Alone bit for bit, beside others within 1/255. SD3's inpaint
pipeline decodes without the VAE's shift factor (diffusers 0.42); its masked images are decoded as it does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import started, step_to_the_end
from PIL import Image

from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.loading import PipelineOptions, inpainting
from serve_app.pipeline.masks import masked_inputs, overlay
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import GenerationDefaults, HiresParams, ImageParams, InpaintParams
from serve_app.pipeline.schedulers import make_scheduler
from serve_app.pipeline.steppers.flow import FlowStepper
from serve_app.pipeline.tasks import ImageTask, to_uint8

INIT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
MASK = np.zeros((64, 64), dtype=np.uint8)
MASK[16:48, 8:40] = 255
AS_DIFFUSERS = InpaintParams(mask_blur=0, paste_back=False)


class FlowModel:
    def __init__(self, preset: str):
        self.model = LoadedModel.load(f"synthetic:{preset}", PipelineOptions(device="cpu", torch_threads=1))
        self.model.defaults = GenerationDefaults(num_inference_steps=4).over(self.model.defaults)
        self.pipe = self.model.pipe
        self.inpaint = inpainting(self.pipe)
        self.stepper = FlowStepper.for_model(self.model)
        self.is_flux = type(self.pipe).__name__ == "FluxPipeline"

    def job(self, *, init_image=INIT, mask=MASK, inpaint=AS_DIFFUSERS, **params) -> ImageTask:
        values = {"prompt": "a lighthouse at dusk", "seed": 3, **params}
        if mask is not None:
            values["inpaint"] = inpaint
        task, _ = self.model.prepare(ImageTask(ImageParams(**values), init_image=init_image, mask=mask))
        return task

    def reference(self, job: ImageTask) -> np.ndarray:
        p = job.params
        inputs = masked_inputs(job)
        self.inpaint.scheduler = make_scheduler(p.scheduler, self.model.model_scheduler)
        kwargs = {
            "prompt": [p.prompt],
            "image": inputs.image,
            "mask_image": inputs.mask,
            "strength": p.strength,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(p.seed)],
            "output_type": "np",
            "max_sequence_length": self.model.max_sequence_length,
            "width": p.width,
            "height": p.height,
        }
        if not self.is_flux:
            kwargs["negative_prompt"] = [p.negative_prompt]
        elif p.true_cfg_scale is not None:
            kwargs.update(negative_prompt=[p.negative_prompt], true_cfg_scale=p.true_cfg_scale)
        if inputs.crop is not None:
            kwargs.update(padding_mask_crop=inputs.padding, output_type="pil")
        with torch.inference_mode():
            out = self.inpaint(**kwargs).images
        if inputs.crop is not None:
            return np.asarray(out[0])
        pixels = to_uint8(out)[0]
        return overlay(inputs, pixels, self.inpaint.image_processor) if inputs.paste_back else pixels

    def finish(self, *jobs: ImageTask, late: ImageTask | None = None) -> list[np.ndarray]:
        """Step the tasks together until done (`late` joins after the first step), then decode them."""
        waiting = [late] if late is not None else []

        def join_late(states: list, running: list) -> None:
            if waiting:
                joined = started(self.stepper, waiting.pop())
                states.extend(joined)
                running.extend(joined)

        states = step_to_the_end(self.stepper, started(self.stepper, *jobs), join_late)
        return self.stepper.decode(states)


@pytest.fixture(scope="module")
def sd3():
    return FlowModel("tiny-sd3")


@pytest.fixture(scope="module")
def schnell():
    return FlowModel("tiny-flux-schnell")


@pytest.fixture
def models(request):
    return lambda name: request.getfixturevalue(name)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("sd3", {"strength": 0.75, "guidance_scale": 5.0, "negative_prompt": "fog"}),
        pytest.param("sd3", {"strength": 1.0, "scheduler": "flow_heun"}, marks=pytest.mark.slow),
        ("schnell", {"strength": 0.8}),
        pytest.param(
            "schnell", {"strength": 1.0, "true_cfg_scale": 2.0, "negative_prompt": "x"}, marks=pytest.mark.slow
        ),
    ],
    ids=["sd3-cfg", "sd3-heun-full", "schnell", "schnell-true-cfg"],
)
def test_a_masked_image_alone_equals_the_inpaint_pipeline(models, model, params, record_property):
    m = models(model)
    task = m.job(seed=11, **params)
    diff = max_diff(m.finish(task)[0], m.reference(task))
    record_property(f"max_diff_flow_inpaint_alone[{model}-{params.get('scheduler', 'default')}]", diff)
    assert diff == 0


@pytest.mark.parametrize("model", ["sd3", pytest.param("schnell", marks=pytest.mark.slow)])
def test_only_masked_and_paste_back_alone_equal_the_pipeline(models, model, record_property):
    m = models(model)
    for inpaint in (InpaintParams(mask_blur=3, fill="noise"), InpaintParams(only_masked=True, only_masked_padding=8)):
        task = m.job(seed=5, inpaint=inpaint)
        image = m.finish(task)[0]
        diff = max_diff(image, m.reference(task))
        record_property(f"max_diff_flow_inpaint_options[{model}-{inpaint.only_masked}]", diff)
        assert diff == 0
        outside = np.asarray(masked_inputs(task).mask) == 0
        assert (image[outside] == INIT[outside]).all()


@pytest.mark.parametrize("model", ["sd3", "schnell"])
def test_masked_rows_share_the_transformer_call_with_others(models, model, record_property):
    m = models(model)
    jobs = [
        m.job(prompt="a text-to-image row", init_image=None, mask=None, seed=1),
        m.job(prompt="a masked row", seed=2, strength=0.9),
        m.job(prompt="an image-to-image row", mask=None, seed=3, strength=0.6),
    ]
    late = m.job(prompt="a late masked row", seed=4, strength=1.0)
    images = m.finish(*jobs, late=late)
    references = [m.reference(j) if j.mask is not None else None for j in (*jobs, late)]
    diffs = [max_diff(image, ref) for image, ref in zip(images, references) if ref is not None]
    record_property(f"max_diff_flow_inpaint_batched[{model}]", max(diffs))
    assert max(diffs) <= 1


def test_the_request_engine_makes_the_same_masked_image(schnell, record_property):
    task = schnell.job(seed=9, inpaint=InpaintParams(mask_blur=2))
    [result] = schnell.model.generate([task])
    diff = max_diff(result.pixels, schnell.finish(task)[0])
    record_property("max_diff_flow_inpaint_request_engine", diff)
    assert diff == 0
    Image.fromarray(result.pixels)  # a plain RGB image


def test_hires_fix_on_flux_with_a_pixel_upscaler_equals_two_plain_calls(schnell, record_property):
    from diffusers import AutoPipelineForImage2Image

    hires = HiresParams(upscaler="Lanczos", steps=2, denoising_strength=0.6)
    task = schnell.job(init_image=None, mask=None, seed=6, hires=hires)
    states = schnell.stepper.start([task])
    while not states[0].done:
        schnell.stepper.step(states)
    [second] = schnell.stepper.second_phase(states)
    assert second.total_steps == schnell.stepper.second_phase_steps(task) == 2
    while not second.done:
        schnell.stepper.step([second])
    [image] = schnell.stepper.decode([second])
    # The reference: text to image, PIL's Lanczos to 128x128, image to image at the same seed.
    p, pipe = task.params, schnell.pipe
    common = {"prompt": [p.prompt], "guidance_scale": p.guidance_scale, "output_type": "np"}
    common["max_sequence_length"] = schnell.model.max_sequence_length
    pipe.scheduler = make_scheduler(p.scheduler, schnell.model.model_scheduler)
    generator = [torch.Generator("cpu").manual_seed(p.seed)]
    with torch.inference_mode():
        first = pipe(**common, num_inference_steps=4, width=64, height=64, generator=generator).images
        upscaled = Image.fromarray(to_uint8(first)[0]).resize((128, 128), Image.Resampling.LANCZOS)
        img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        img2img.scheduler = make_scheduler(p.scheduler, schnell.model.model_scheduler)
        generator = [torch.Generator("cpu").manual_seed(p.seed)]
        second_params = second.task.params
        reference = img2img(
            **common, image=upscaled, strength=second_params.strength, width=128, height=128,
            num_inference_steps=second_params.num_inference_steps, generator=generator,
        ).images  # fmt: skip
    diff = max_diff(image, to_uint8(reference)[0])
    record_property("max_diff_flux_hires", diff)
    assert diff == 0
    [whole] = schnell.model.generate([task])  # the request engine: the same two calls
    assert max_diff(whole.pixels, image) == 0
    with pytest.raises(InvalidTaskError, match="Lanczos") as refused:  # the Latent upscalers: not for flow models
        schnell.job(init_image=None, mask=None, hires=HiresParams())
    assert refused.value.field == "hires.upscaler"
