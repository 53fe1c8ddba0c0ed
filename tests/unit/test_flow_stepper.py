"""Flow-matching step-level batching (serve_app/pipeline/steppers/flow.py), against the plain diffusers
StableDiffusion3Pipeline and FluxPipeline (and their image-to-image twins).

The invariant, as for the UNets: an image made by FlowStepper equals the one the plain pipeline makes for
the same parameters and seed, bit for bit alone, within 1/255 per pixel beside other images.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from helpers import started, step_to_the_end
from PIL import Image

from serve_app.pipeline.errors import GenerationError, InvalidTaskError
from serve_app.pipeline.loading import PipelineOptions
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.schedulers import FLOW_SCHEDULER_NAMES, make_scheduler
from serve_app.pipeline.steppers import make_stepper
from serve_app.pipeline.steppers.flow import FlowStepper
from serve_app.pipeline.tasks import ImageTask, to_uint8

INIT = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


class FlowModel:
    """A tiny SD3 or FLUX.1 model, its img2img twin, and a FlowStepper over them; `reference` calls the plain
    diffusers pipeline as its documentation shows, independently of the engines."""

    def __init__(self, preset: str):
        from diffusers import AutoPipelineForImage2Image

        self.model = LoadedModel.load(f"synthetic:{preset}", PipelineOptions(device="cpu", torch_threads=1))
        # 4 steps everywhere (tiny-flux-dev's own default is 8): milliseconds per image.
        self.model.defaults = GenerationDefaults(num_inference_steps=4).over(self.model.defaults)
        self.pipe = self.model.pipe
        self.model_scheduler = self.pipe.scheduler
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        self.img2img.set_progress_bar_config(disable=True)
        self.stepper = FlowStepper.for_model(self.model)
        self.stepper._img2img = self.img2img
        self.is_flux = type(self.pipe).__name__ == "FluxPipeline"

    def job(self, *, init_image=None, **params) -> ImageTask:
        values = {"prompt": "a lighthouse at dusk", "seed": 3, **params}
        task, _ = self.model.prepare(ImageTask(ImageParams(**values), init_image=init_image))
        return task

    def reference(self, *jobs: ImageTask) -> list[np.ndarray]:
        """The plain pipeline's images for jobs that share every parameter but prompt, negative and seed."""
        p = jobs[0].params
        pipe = self.pipe if jobs[0].init_image is None else self.img2img
        pipe.scheduler = make_scheduler(p.scheduler, self.model_scheduler)
        kwargs = {
            "prompt": [job.params.prompt for job in jobs],
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            "output_type": "np",
            "max_sequence_length": self.model.max_sequence_length,
            "width": p.width,
            "height": p.height,
        }
        negatives = [job.params.negative_prompt for job in jobs]
        if not self.is_flux:
            kwargs["negative_prompt"] = negatives
        elif p.true_cfg_scale is not None:
            kwargs.update(negative_prompt=negatives, true_cfg_scale=p.true_cfg_scale)
        if jobs[0].init_image is not None:
            kwargs.update(image=[Image.fromarray(job.init_image) for job in jobs], strength=p.strength)
        with torch.inference_mode():
            return list(to_uint8(pipe(**kwargs).images))

    def start(self, *jobs: ImageTask):
        return started(self.stepper, *jobs)

    def finish(self, *states) -> list[np.ndarray]:
        """Step the states together until all are done (each leaves when it finishes), then decode them."""
        return self.stepper.decode(step_to_the_end(self.stepper, states))

    def alone(self, job: ImageTask) -> np.ndarray:
        return self.finish(*self.start(job))[0]


PRESETS = {"sd3": "tiny-sd3", "flux-schnell": "tiny-flux-schnell", "flux-dev": "tiny-flux-dev"}


@pytest.fixture(scope="module")
def models():
    return {family: FlowModel(preset) for family, preset in PRESETS.items()}


@pytest.fixture
def sd3(models):
    return models["sd3"]


@pytest.fixture
def schnell(models):
    return models["flux-schnell"]


@pytest.fixture
def dev(models):
    return models["flux-dev"]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@contextlib.contextmanager
def transformer_calls(pipe):
    """Rows of every transformer call made inside the block."""
    rows: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        yield rows
    finally:
        handle.remove()


# -- alone: bit for bit -----------------------------------------------------------------


# Guidance as each family defines it: SD3 classifier-free guidance with a negative prompt (or none at 1.0);
# FLUX.1 [schnell] none, or true CFG; [dev] its guidance embedding at two values, or with true CFG on top.
GUIDANCE = {
    "sd3": {"cfg": {"guidance_scale": 5.0, "negative_prompt": "blurry"}, "none": {"guidance_scale": 1.0}},
    "flux-schnell": {"none": {}, "true_cfg": {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}},
    "flux-dev": {
        "embedded": {"guidance_scale": 3.5},
        "embedded_low": {"guidance_scale": 1.0},
        "true_cfg": {"guidance_scale": 2.0, "true_cfg_scale": 4.0, "negative_prompt": "blurry"},
    },
}
CASES = [(family, guidance) for family, kinds in GUIDANCE.items() for guidance in kinds]


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
@pytest.mark.parametrize(("family", "guidance"), CASES)
def test_alone_equals_the_plain_pipeline(models, family, guidance, kind, record_property):
    m = models[family]
    init = INIT if kind == "img2img" else None
    request = m.job(init_image=init, seed=11, **GUIDANCE[family][guidance])
    diff = max_diff(m.alone(request), m.reference(request)[0])
    record_property(f"max_diff_alone[{family}-{guidance}-{kind}]", diff)
    assert diff == 0


# Every flow sampler each model accepts, both kinds where it accepts them; the fast loop runs the flow Euler
# (the default) above and one multistep sampler here, `make test` every one.
FAST_SAMPLERS = {"flow_dpmpp_2m"}
# What each model refuses (a 422): pinned by test_which_flow_samplers_each_model_accepts.
REFUSED = {("flux-schnell", "flow_heun"), ("flux-schnell", "flow_dpmpp_2m"), ("flux-dev", "flow_heun")}
SAMPLERS = [
    pytest.param(family, name, marks=() if name in FAST_SAMPLERS else pytest.mark.slow)
    for family in ("sd3", "flux-schnell", "flux-dev")
    for name in FLOW_SCHEDULER_NAMES
    if name != "default" and (family, name) not in REFUSED
]


@pytest.mark.parametrize("family,sampler", SAMPLERS)
def test_every_accepted_flow_sampler_alone_equals_the_plain_pipeline(models, family, sampler, record_property):
    m = models[family]
    diffs = {}
    for kind, init in (("txt2img", None), ("img2img", INIT)):
        if sampler not in m.model.schedulers.names(image_to_image=init is not None):
            continue
        request = m.job(init_image=init, seed=5, scheduler=sampler, num_inference_steps=5)
        diffs[kind] = max_diff(m.alone(request), m.reference(request)[0])
    assert diffs, f"{family} accepts {sampler} for neither txt2img nor img2img"
    record_property(f"max_diff_sampler[{family}-{sampler}]", max(diffs.values()))
    assert diffs == dict.fromkeys(diffs, 0)


def test_which_flow_samplers_each_model_accepts(sd3, schnell, dev):
    """FlowMatchHeun takes no custom sigmas (FluxPipeline passes them); DPM++ needs FLUX.1 [dev]'s dynamic
    shifting; DPM++ and UniPC cannot noise an init image (no scale_noise)."""
    assert sd3.model.schedulers.names() == FLOW_SCHEDULER_NAMES
    assert sd3.model.schedulers.names(image_to_image=True) == (
        "default",
        "flow_euler",
        "flow_euler_karras",
        "flow_heun",
    )
    assert schnell.model.schedulers.names() == ("default", "flow_euler", "flow_euler_karras", "flow_unipc")
    assert dev.model.schedulers.names() == ("default", "flow_euler", "flow_euler_karras", "flow_dpmpp_2m", "flow_unipc")
    assert (
        schnell.model.schedulers.names(True)
        == dev.model.schedulers.names(True)
        == (
            "default",
            "flow_euler",
            "flow_euler_karras",
        )
    )
    assert sd3.model.describe()["schedulers"] == list(FLOW_SCHEDULER_NAMES)


def test_total_steps_count_transformer_evaluations(sd3):
    states = sd3.start(
        sd3.job(num_inference_steps=4),
        sd3.job(num_inference_steps=4, scheduler="flow_heun"),
        sd3.job(num_inference_steps=4, init_image=INIT, strength=0.3),  # 4 - int(4 - 1.2) = 2 steps
        sd3.job(num_inference_steps=4, init_image=INIT, strength=0.1),  # at least one step at any strength
    )
    assert [s.total_steps for s in states] == [4, 7, 2, 1]
    assert all(s.step_index == 0 and not s.done for s in states)


# -- together: one transformer call per tick ----------------------------------------------


def test_sd3_images_at_other_steps_guidance_and_samplers_share_one_call(sd3, record_property):
    jobs = [
        sd3.job(prompt="one", seed=1, num_inference_steps=3, guidance_scale=5.0, negative_prompt="fog"),
        sd3.job(prompt="two", seed=2, num_inference_steps=5, guidance_scale=1.0),  # no unconditional row
        sd3.job(prompt="three", seed=3, num_inference_steps=4, init_image=INIT, strength=0.8, guidance_scale=3.0),
        sd3.job(prompt="four", seed=4, num_inference_steps=4, scheduler="flow_dpmpp_2m", guidance_scale=7.0),
    ]
    states = sd3.start(*jobs)
    assert [s.rows for s in states] == [2, 1, 2, 2]
    with transformer_calls(sd3.pipe) as rows:
        images = sd3.finish(*states)
    assert len(rows) == max(s.total_steps for s in states) == 5  # one call per tick
    assert rows[0] == sum(s.rows for s in states) == 7
    diffs = [max_diff(image, sd3.reference(j)[0]) for image, j in zip(images, jobs)]
    record_property("max_diff_batched_sd3", max(diffs))
    assert max(diffs) <= 1


@pytest.mark.parametrize("family", ["flux-schnell", "flux-dev"])
def test_flux_images_at_other_steps_and_guidance_share_one_call(models, family, record_property):
    m = models[family]
    jobs = [
        m.job(prompt="one", seed=1, num_inference_steps=3),
        m.job(prompt="two", seed=2, num_inference_steps=5, guidance_scale=5.0),
        m.job(prompt="three", seed=3, num_inference_steps=4, init_image=INIT, strength=0.6, guidance_scale=1.5),
        m.job(prompt="four", seed=4, num_inference_steps=4, true_cfg_scale=3.0, negative_prompt="fog"),
        m.job(prompt="five", seed=5, num_inference_steps=2, scheduler="flow_euler_karras"),
    ]
    states = m.start(*jobs)
    with transformer_calls(m.pipe) as rows:
        images = m.finish(*states)
    # One call per tick over every image; true CFG adds a second call over its image while it runs.
    assert rows[:2] == [5, 1]
    assert len(rows) == max(s.total_steps for s in states) + states[3].total_steps
    diffs = [max_diff(image, m.reference(j)[0]) for image, j in zip(images, jobs)]
    record_property(f"max_diff_batched[{family}]", max(diffs))
    assert max(diffs) <= 1


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_an_image_admitted_mid_flight_shares_the_call(models, family, record_property):
    m = models[family]
    first = m.job(prompt="a lighthouse", seed=5, num_inference_steps=6)
    later = m.job(prompt="a boat", seed=8, num_inference_steps=5, init_image=INIT, strength=0.6, guidance_scale=2.0)
    [a] = m.start(first)
    for _ in range(2):
        m.stepper.step([a])
    [b] = m.start(later)
    assert b.total_steps == 3 and a.step_index == 2
    images = m.finish(a, b)
    diffs = [max_diff(image, m.reference(j)[0]) for image, j in zip(images, (first, later))]
    record_property(f"max_diff_mid_flight[{family}]", max(diffs))
    assert max(diffs) <= 1


def test_flux_dev_schedules_depend_on_the_size_and_are_cached_per_size(dev, record_property):
    """[dev] shifts its sigmas by the image's latent patches (mu): 128x64 runs another schedule than 64x64."""
    small, wide = dev.start(dev.job(seed=1), dev.job(seed=1, width=128, height=64))
    assert small.sigmas[1] != wide.sigmas[1]
    assert dev.start(dev.job(seed=2))[0].sigmas is small.sigmas  # one template per (sampler, steps, size)
    image = dev.finish(wide)[0]
    assert image.shape == (64, 128, 3)
    assert max_diff(image, dev.reference(dev.job(seed=1, width=128, height=64))[0]) == 0


# -- what one call can hold -------------------------------------------------------------


def test_the_batch_key_keeps_width_and_height_apart_even_where_packed_latents_match(schnell, sd3):
    """FLUX.1's packed latents of 128x64 and 64x128 have the same shape and different positions: with random
    weights a wrong key shows only as 1/255, so the keys themselves are checked."""
    wide, tall = schnell.job(width=128, height=64), schnell.job(width=64, height=128)
    a, b = schnell.start(wide, tall)
    assert a.latents.shape == b.latents.shape
    assert a.shape_key != b.shape_key
    assert schnell.stepper.group_key(wide) != schnell.stepper.group_key(tall)
    with pytest.raises(ValueError, match="shape_key"):
        schnell.stepper.step([a, b])
    assert sd3.stepper.group_key(sd3.job(width=128, height=64)) != sd3.stepper.group_key(sd3.job(width=64, height=128))
    # The key holds the text length and dtype too: fixed per model, so equal for every task of one model.
    assert a.shape_key[2:4] == (schnell.model.max_sequence_length, torch.float32)


def test_misuse_is_refused_with_a_reason(sd3):
    first, second = sd3.start(sd3.job(seed=1), sd3.job(seed=2))
    with pytest.raises(ValueError, match="twice"):
        sd3.stepper.step([first, first])
    with pytest.raises(ValueError, match="not finished"):
        sd3.stepper.decode([first])
    with pytest.raises(ValueError, match="with_defaults"):
        sd3.stepper.start([ImageTask(ImageParams(prompt="x", seed=1))])


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_a_unet_sampler_asked_of_a_flow_model_is_refused_naming_the_field_and_the_choices(models, family):
    m = models[family]
    raw = ImageTask(ImageParams(prompt="x", seed=1, scheduler="euler"))
    with pytest.raises(InvalidTaskError) as caught:
        m.model.prepare(raw)
    assert caught.value.field == "scheduler" and "flow_euler" in caught.value.message
    [result] = m.stepper.start([raw.with_defaults(m.model.defaults)])
    assert isinstance(result, InvalidTaskError) and result.field == "scheduler"
    [result] = m.model.generate([raw])  # never a silently wrong image from the request engine either
    assert isinstance(result, InvalidTaskError) and result.field == "scheduler"


def test_a_flow_sampler_asked_of_a_unet_model_is_refused():
    from serve_app.pipeline.schedulers import SchedulerTemplates
    from serve_app.pipeline.synthetic import build_pipeline

    templates = SchedulerTemplates(build_pipeline("tiny").scheduler, family="unet")
    with pytest.raises(InvalidTaskError, match="not a sampler for this model.*euler_a") as caught:
        templates.check("flow_euler")
    assert caught.value.field == "scheduler"


def test_a_text_to_image_only_sampler_is_refused_for_image_to_image(schnell):
    with pytest.raises(InvalidTaskError, match="cannot do image to image") as caught:
        schnell.job(init_image=INIT, scheduler="flow_unipc")
    assert caught.value.field == "scheduler" and "flow_euler" in caught.value.message


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 72}, "width"),  # 16: the VAE's 8 x the transformer's 2x2 patches (SD3) or packing (FLUX.1)
        ({"height": 40}, "height"),
    ],
)
def test_sizes_the_latents_cannot_hold_are_refused(sd3, schnell, params, field):
    for m in (sd3, schnell):
        with pytest.raises(InvalidTaskError, match="multiples of 16") as caught:
            m.job(**params)
        assert caught.value.field == field


def test_true_cfg_is_for_flux_only(sd3, schnell):
    with pytest.raises(InvalidTaskError, match="FLUX.1") as caught:
        sd3.job(true_cfg_scale=3.0)
    assert caught.value.field == "true_cfg_scale"
    task, warnings = schnell.model.prepare(ImageTask(ImageParams(prompt="x", seed=1, negative_prompt="fog")))
    assert warnings and "true_cfg_scale" in warnings[0]  # a negative prompt FLUX.1 would ignore is reported


# -- failures stay with their image ------------------------------------------------------


def test_a_row_that_overflows_in_the_transformer_fails_only_its_image(sd3):
    jobs = [sd3.job(prompt=f"row {i}", seed=i, guidance_scale=1.0) for i in range(3)]
    states = sd3.start(*jobs)

    def poison_row(module, args, kwargs, output):
        output[0][1] = float("nan")
        return output

    handle = sd3.pipe.transformer.register_forward_hook(poison_row, with_kwargs=True)
    try:
        errors = sd3.stepper.step(states)
    finally:
        handle.remove()
    assert [e is None for e in errors] == [True, False, True]
    assert isinstance(errors[1], GenerationError) and "non-finite" in str(errors[1]) and states[1].done
    images = sd3.finish(states[0], states[2])
    for image, j in zip(images, (jobs[0], jobs[2])):
        assert max_diff(image, sd3.reference(j)[0]) <= 1


def test_a_failed_transformer_call_advances_nothing(dev, monkeypatch):
    request = dev.job(seed=4)
    [state] = dev.start(request)
    dev.stepper.step([state])
    real_forward = dev.pipe.transformer.forward
    monkeypatch.setattr(
        dev.pipe.transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x"))
    )
    with pytest.raises(torch.OutOfMemoryError):
        dev.stepper.step([state])
    monkeypatch.setattr(dev.pipe.transformer, "forward", real_forward)
    assert state.step_index == 1 and state.error is None
    assert max_diff(dev.finish(state)[0], dev.reference(request)[0]) == 0


def test_a_prompt_that_cannot_be_encoded_fails_only_its_image(schnell, monkeypatch):
    real_encode = schnell.pipe.encode_prompt

    def encode(prompt, *args, **kwargs):
        if "poison" in prompt:
            raise RuntimeError("tokenizer exploded")
        return real_encode(prompt, *args, **kwargs)

    monkeypatch.setattr(schnell.pipe, "encode_prompt", encode)
    jobs = [schnell.job(prompt="good", seed=1), schnell.job(prompt="poison", seed=2)]
    good, bad = schnell.stepper.start(jobs)
    monkeypatch.undo()
    assert isinstance(bad, GenerationError) and bad.field == "prompt"
    assert max_diff(schnell.finish(good)[0], schnell.reference(jobs[0])[0]) <= 1


# -- decode and preview ------------------------------------------------------------------


def test_decode_groups_sizes_and_batched_equals_one_by_one(dev, record_property):
    states = dev.start(dev.job(seed=1), dev.job(seed=2), dev.job(seed=3, width=128, height=64))
    dev.finish(states[0], states[1])
    dev.finish(states[2])
    batched = dev.stepper.decode(states)
    alone = [dev.stepper.decode([state])[0] for state in states]
    assert [image.shape for image in batched] == [(64, 64, 3), (64, 64, 3), (64, 128, 3)]
    diff = max(max_diff(a, b) for a, b in zip(batched, alone))
    record_property("max_diff_decode_flux", diff)
    assert diff <= 1


@pytest.mark.parametrize("family", ["sd3", "flux-schnell"])
def test_a_preview_is_a_small_png_of_the_latents(models, family):
    m = models[family]
    [state] = m.start(m.job(width=128, height=64))
    m.stepper.step([state])
    preview = m.stepper.preview(state)
    assert Image.open(io.BytesIO(preview)).size == (16, 8)  # latent resolution, unpacked for FLUX.1


# -- which stepper ------------------------------------------------------------------------


def test_each_family_gets_its_stepper_and_other_pipelines_say_why_not(sd3, schnell):
    from serve_app.pipeline.steppers.unet import UNetStepper

    assert isinstance(make_stepper(sd3.model)[0], FlowStepper)
    assert isinstance(make_stepper(schnell.model)[0], FlowStepper)
    assert FlowStepper.unsupported_reason(sd3.pipe) is None
    reason = FlowStepper.unsupported_reason(schnell.img2img)
    assert isinstance(reason, str) and "FluxImg2ImgPipeline" in reason
    assert "StableDiffusion3Pipeline" in UNetStepper.unsupported_reason(sd3.pipe)
    with pytest.raises(ValueError, match="cannot be stepped"):
        FlowStepper(schnell.img2img)
