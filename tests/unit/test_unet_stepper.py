"""Step-level batching mechanics (serve_app/pipeline/steppers/unet.py), against the plain diffusers pipelines.

The invariant: an image made by UNetStepper equals the one the plain pipeline
makes for the same parameters and seed — bit for bit when it runs alone, within
1/255 per pixel beside other images (kernels round differently by batch size,
as in any batched call).
"""

import contextlib
import copy
import time

import numpy as np
import pytest
import torch
from helpers import started, step_to_the_end
from PIL import Image

from serve_app.pipeline.errors import GenerationError, InvalidTaskError
from serve_app.pipeline.loading import ModelSource, PipelineOptions, load_pipeline
from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.schedulers import SCHEDULER_NAMES, SchedulerTemplates, make_scheduler
from serve_app.pipeline.steppers.unet import COHORT_SCHEDULERS, UNetStepper
from serve_app.pipeline.tasks import ImageTask, to_uint8

# 32x32 and 3 steps keep each case in tens of milliseconds; multistep samplers still use their history.
DEFAULTS = GenerationDefaults(width=32, height=32, num_inference_steps=3, guidance_scale=7.5, strength=0.7)
INIT = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


class Model:
    """A tiny pipeline, its img2img twin, the scheduler it shipped with, and a UNetStepper over them."""

    def __init__(self, source: str):
        from diffusers import AutoPipelineForImage2Image

        self.pipe = load_pipeline(ModelSource.parse(source), PipelineOptions(device="cpu", torch_threads=1))
        self.model_scheduler = self.pipe.scheduler  # references below replace pipe.scheduler
        self.img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
        self.img2img.set_progress_bar_config(disable=True)
        self.stepper = UNetStepper(self.pipe, SchedulerTemplates(self.model_scheduler), img2img_pipe=self.img2img)
        self._fresh: dict = {}

    def scheduler(self, name: str):
        """A fresh make_scheduler(name, ...): a copy of one made once (KDPM2's constructor alone takes 0.3 s)."""
        if name not in self._fresh:
            self._fresh[name] = make_scheduler(name, self.model_scheduler)
        return copy.deepcopy(self._fresh[name])

    def reference(self, *jobs: ImageTask) -> list[np.ndarray]:
        """The plain pipeline's images for jobs that share every parameter but prompt, negative and seed."""
        p = jobs[0].params
        pipe = self.pipe if jobs[0].init_image is None else self.img2img
        pipe.scheduler = self.scheduler(p.scheduler)
        negatives = [job.params.negative_prompt for job in jobs]
        kwargs = {
            "prompt": [job.params.prompt for job in jobs],
            "negative_prompt": negatives if any(negatives) else None,  # as the request-level engine passes it
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
            "output_type": "np",
        }
        if jobs[0].init_image is None:
            kwargs.update(width=p.width, height=p.height)
        else:
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


@pytest.fixture(scope="module")
def sd():
    return Model("synthetic:tiny")


@pytest.fixture(scope="module")
def xl():
    return Model("synthetic:tiny-xl")


@pytest.fixture
def models(sd, xl):
    return {"sd": sd, "xl": xl}


def job(*, init_image=None, **params) -> ImageTask:
    values = {"prompt": "a cat", "seed": 3, **params}
    return ImageTask(ImageParams(**values), init_image=init_image).with_defaults(DEFAULTS)


def img2img_job(**params) -> ImageTask:
    return job(init_image=INIT, **params)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@contextlib.contextmanager
def unet_calls(pipe):
    """Rows of every UNet call made inside the block."""
    rows: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


# -- alone: bit for bit -----------------------------------------------------------------


# The fast loop checks one scheduler of each family (the model's own, ancestral, second-order,
# multistep); `make test` runs every named one.
FAST_SCHEDULERS = {"default", "euler_a", "heun", "dpmpp_2m"}
SCHEDULERS = [pytest.param(name, marks=() if name in FAST_SCHEDULERS else pytest.mark.slow) for name in SCHEDULER_NAMES]


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("model", ["sd", "xl"])
def test_alone_equals_the_plain_pipeline(models, model, scheduler, kind, record_property):
    m = models[model]
    make = job if kind == "txt2img" else img2img_job
    request = make(scheduler=scheduler, negative_prompt="blurry", seed=11)
    diff = max_diff(m.alone(request), m.reference(request)[0])
    record_property(f"max_diff_alone[{model}-{scheduler}-{kind}]", diff)
    assert diff == 0


def test_total_steps_count_unet_evaluations_not_inference_steps(sd):
    states = sd.start(
        job(scheduler="pndm", num_inference_steps=4),
        job(scheduler="heun", num_inference_steps=4),
        job(scheduler="euler", num_inference_steps=4),
        img2img_job(scheduler="euler", num_inference_steps=4, strength=0.5),
    )
    assert [s.total_steps for s in states] == [5, 7, 4, 2]  # PNDM N+1, Heun 2N-1, img2img from strength
    assert all(s.step_index == 0 and not s.done for s in states)


# -- together: one UNet call per tick ----------------------------------------------------


def test_uniform_requests_step_as_one_pipeline_batch(sd):
    jobs = [job(prompt=f"a cat {i}", seed=i, scheduler="dpmpp_2m", negative_prompt="ugly" * (i % 2)) for i in range(4)]
    states = sd.start(*jobs)
    schedulers = [s.scheduler for s in states]
    assert all(s is schedulers[0] for s in schedulers)  # a cohort in lockstep: one scheduler, like one call
    with unet_calls(sd.pipe) as rows:
        images = sd.finish(*states)
    with unet_calls(sd.pipe) as reference_rows:
        references = sd.reference(*jobs)
    assert rows == reference_rows == [8] * 3
    assert [max_diff(a, b) for a, b in zip(images, references)] == [0] * 4  # the same batch, the same bits


@pytest.mark.parametrize("model", ["sd", "xl"])
def test_a_request_admitted_mid_flight_shares_the_unet_call(models, model, record_property):
    m = models[model]
    first = job(prompt="a lighthouse", seed=5, scheduler="euler", num_inference_steps=6, guidance_scale=7.5)
    later = img2img_job(prompt="a boat", seed=8, scheduler="dpmpp_2m", num_inference_steps=5, strength=0.6)
    later = ImageTask(later.params.model_copy(update={"guidance_scale": 3.0}), init_image=INIT)
    [a] = m.start(first)
    with unet_calls(m.pipe) as rows:
        for _ in range(2):
            m.stepper.step([a])
        [b] = m.start(later)
        assert b.total_steps == 3 and a.step_index == 2
        images = m.finish(a, b)
    assert rows == [2, 2, 4, 4, 4, 2]  # A alone, then A and B in the same calls, then A alone
    diffs = [max_diff(image, m.reference(j)[0]) for image, j in zip(images, (first, later))]
    record_property(f"max_diff_mid_flight[{model}]", max(diffs))
    assert max(diffs) <= 1


def test_each_request_keeps_its_own_guidance_in_one_call(sd, record_property):
    scales = [7.5, 1.0, 3.0, 7.5]  # guided rows not contiguous; 1.0: no unconditional row at all
    jobs = [job(prompt=f"a dog {i}", seed=20 + i, guidance_scale=g, scheduler="euler_a") for i, g in enumerate(scales)]
    states = sd.start(*jobs)
    assert [s.rows for s in states] == [2, 1, 2, 2]
    with unet_calls(sd.pipe) as rows:
        images = sd.finish(*states)
    assert rows == [7] * 3
    diffs = [max_diff(image, sd.reference(j)[0]) for image, j in zip(images, jobs)]
    record_property("max_diff_mixed_guidance", max(diffs))
    assert max(diffs) <= 1


def test_mixed_schedulers_steps_and_kinds_share_calls(xl, record_property):
    jobs = [
        job(prompt="one", seed=1, scheduler="heun", num_inference_steps=3),
        job(prompt="two", seed=2, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0),
        img2img_job(prompt="three", seed=3, scheduler="pndm", num_inference_steps=5, strength=0.8),
        job(prompt="four", seed=4, scheduler="dpmpp_2m_karras", num_inference_steps=5, negative_prompt="fog"),
    ]
    states = xl.start(*jobs)
    with unet_calls(xl.pipe) as rows:
        images = xl.finish(*states)
    assert len(rows) == max(s.total_steps for s in states) == 5
    assert rows[0] == sum(s.rows for s in states)
    diffs = [max_diff(image, xl.reference(j)[0]) for image, j in zip(images, jobs)]
    record_property("max_diff_mixed_xl", max(diffs))
    assert max(diffs) <= 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_cohort_splits_exactly_when_its_members_part(sd, scheduler, record_property):
    """Started together, stepped together, then one is left out: each part keeps its rows of history."""
    jobs = [job(prompt=f"p{i}", seed=40 + i, scheduler=scheduler, negative_prompt=f"n{i}") for i in range(3)]
    states = sd.start(*jobs)
    if type(states[0].scheduler).__name__ in COHORT_SCHEDULERS:
        assert states[0].scheduler is states[2].scheduler
    sd.stepper.step(states)
    sd.stepper.step(states)
    kept = [states[0], states[2]]
    while not kept[0].done:
        sd.stepper.step(kept)  # states[1] waits: it is split off at its own step index
    assert states[1].scheduler is not states[0].scheduler
    assert states[1].step_index == 2
    while not states[1].done:
        sd.stepper.step([states[1]])
    images = sd.stepper.decode(states)
    diffs = [max_diff(image, reference) for image, reference in zip(images, sd.reference(*jobs))]
    record_property(f"max_diff_split[{scheduler}]", max(diffs))
    assert max(diffs) <= 1


def test_sdxl_empty_and_non_empty_negative_prompts_in_one_call(xl, record_property):
    # SDXL encodes an empty negative prompt as zeros (force_zeros_for_empty_prompt), a non-empty one
    # through its text encoders: the two could not share one pipeline call; they share one UNet call here.
    jobs = [
        job(prompt="a fox", seed=7, negative_prompt=""),
        job(prompt="a fox", seed=7, negative_prompt="blurry"),
        img2img_job(prompt="an owl", seed=9, negative_prompt=""),
    ]
    states = xl.start(*jobs)
    assert torch.count_nonzero(states[0].uncond) == 0 and torch.count_nonzero(states[1].uncond) > 0
    images = xl.finish(*states)
    diffs = [max_diff(image, xl.reference(j)[0]) for image, j in zip(images, jobs)]
    record_property("max_diff_sdxl_negatives", max(diffs))
    assert max(diffs) <= 1
    assert max_diff(images[0], images[1]) > 0


# -- failures stay with their request ----------------------------------------------------


def test_non_finite_latents_fail_only_that_request(sd):
    a_job, b_job = job(prompt="fine", seed=1, scheduler="unipc"), job(prompt="doomed", seed=2, scheduler="unipc")
    a, b = sd.start(a_job, b_job)
    sd.stepper.step([a, b])
    b.latents = torch.full_like(b.latents, float("nan"))  # takes b out of its cohort
    assert a.scheduler is not b.scheduler
    errors = sd.stepper.step([a, b])
    assert errors[0] is None and isinstance(errors[1], GenerationError) and "non-finite" in str(errors[1])
    assert b.done and not b.denoised and b.error is errors[1]
    with pytest.raises(ValueError, match="done"):
        sd.stepper.step([a, b])
    image = sd.finish(a)[0]
    assert max_diff(image, sd.reference(a_job)[0]) <= 1


def test_a_row_that_overflows_in_the_unet_fails_only_its_request(sd):
    jobs = [job(prompt=f"row {i}", seed=i, scheduler="euler") for i in range(3)]
    states = sd.start(*jobs)

    def poison_row(module, args, output):  # rows: 3 unconditional, then 3 conditional; poison state 1's
        output[0][4] = float("nan")
        return output

    handle = sd.pipe.unet.register_forward_hook(poison_row)
    try:
        errors = sd.stepper.step(states)
    finally:
        handle.remove()
    assert [e is None for e in errors] == [True, False, True]
    images = sd.finish(states[0], states[2])
    for image, j in zip(images, (jobs[0], jobs[2])):
        assert max_diff(image, sd.reference(j)[0]) <= 1


def test_a_failed_unet_call_advances_nothing(sd, monkeypatch):
    request = job(prompt="retry", seed=4, scheduler="heun")
    [state] = sd.start(request)
    sd.stepper.step([state])
    real_forward = sd.pipe.unet.forward
    monkeypatch.setattr(sd.pipe.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        sd.stepper.step([state])
    monkeypatch.setattr(sd.pipe.unet, "forward", real_forward)
    assert state.step_index == 1 and state.error is None
    assert max_diff(sd.finish(state)[0], sd.reference(request)[0]) == 0


def test_a_prompt_that_cannot_be_encoded_fails_only_its_job(sd, monkeypatch):
    real_encode = sd.pipe.encode_prompt
    calls = []

    def encode(prompt, *args, **kwargs):
        calls.append(list(prompt))
        if "poison" in prompt:
            raise RuntimeError("tokenizer exploded")
        return real_encode(prompt, *args, **kwargs)

    monkeypatch.setattr(sd.pipe, "encode_prompt", encode)
    jobs = [job(prompt="good", seed=1), job(prompt="poison", seed=2), job(prompt="also good", seed=3)]
    good, bad, also_good = sd.stepper.start(jobs)
    monkeypatch.undo()
    assert calls == [["good", "poison", "also good"], ["good"], ["poison"], ["also good"]]  # batched, then one by one
    assert isinstance(bad, GenerationError) and bad.field == "prompt"
    images = sd.finish(good, also_good)
    for image, j in zip(images, (jobs[0], jobs[2])):
        assert max_diff(image, sd.reference(j)[0]) <= 1


def test_invalid_jobs_fail_alone_with_the_field_named(sd):
    results = sd.stepper.start(
        [
            job(seed=1),
            img2img_job(seed=2, strength=0.1, num_inference_steps=4),
            job(seed=3, width=40),
            job(seed=4, scheduler="lcm", num_inference_steps=60),  # LCM stops at its original 50 steps
        ]
    )
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], InvalidTaskError) and results[1].field == "strength"
    assert not isinstance(results[2], Exception) and results[2].latents.shape[-1] == 5
    assert isinstance(results[3], InvalidTaskError) and results[3].field == "num_inference_steps"
    with pytest.raises(ValueError, match="with_defaults"):
        sd.stepper.start([ImageTask(ImageParams(prompt="x", seed=1))])


def test_misuse_is_refused_with_a_reason(sd):
    small, large = sd.start(job(seed=1), job(seed=1, width=64, height=64))
    with pytest.raises(ValueError, match="shape_key"):
        sd.stepper.step([small, large])
    with pytest.raises(ValueError, match="twice"):
        sd.stepper.step([small, small])
    with pytest.raises(ValueError, match="not finished"):
        sd.stepper.decode([small])


# -- decode ------------------------------------------------------------------------------


def test_decode_batched_equals_one_by_one(sd, xl, record_property):
    for m in (sd, xl):
        states = m.start(job(seed=1), job(seed=2, scheduler="ddim"), img2img_job(seed=3))
        m.finish(*states)
        batched = m.stepper.decode(states)
        alone = [m.stepper.decode([state])[0] for state in states]
        assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in batched)
        diff = max(max_diff(a, b) for a, b in zip(batched, alone))
        record_property(f"max_diff_decode[{type(m.pipe).__name__}]", diff)
        assert diff <= 1


def test_decode_groups_sizes(sd):
    states = sd.start(job(seed=1, num_inference_steps=2), job(seed=1, num_inference_steps=2, width=64))
    for state in states:
        sd.finish(state)
    assert [image.shape for image in sd.stepper.decode(states)] == [(32, 32, 3), (32, 64, 3)]


# -- what can be stepped -----------------------------------------------------------------


def test_text_to_image_pipelines_can_be_stepped_others_say_why(sd, xl):
    assert UNetStepper.unsupported_reason(sd.pipe) is None
    assert UNetStepper.unsupported_reason(xl.pipe) is None
    reason = UNetStepper.unsupported_reason(sd.img2img)
    assert isinstance(reason, str) and "StableDiffusionImg2ImgPipeline" in reason
    with pytest.raises(ValueError, match="cannot be stepped"):
        UNetStepper(sd.img2img)


def test_every_named_scheduler_is_supported(sd):
    for name in SCHEDULER_NAMES:
        scheduler = sd.scheduler(name)
        assert UNetStepper.unsupported_scheduler_reason(scheduler) is None, name
        assert type(scheduler).__name__ in COHORT_SCHEDULERS, name


# -- cost --------------------------------------------------------------------------------


@pytest.mark.slow  # seconds: out of the fast loop
def test_uniform_requests_cost_what_one_pipeline_call_costs(sd, record_property):
    """The property behind the throughput: a cohort steps its scheduler once per tick, not once per image.
    (Wall-clock ratio recorded, not asserted: shared CI machines vary by more than the difference.)"""
    jobs = [job(prompt=f"bench {i}", seed=i, num_inference_steps=4, width=64, height=64) for i in range(8)]
    steps = []
    scheduler_class = type(sd.model_scheduler)
    real_step = scheduler_class.step

    def counting_step(self, *args, **kwargs):
        steps.append(args[0].shape[0])
        return real_step(self, *args, **kwargs)

    def stepped():
        return sd.finish(*sd.start(*jobs))

    scheduler_class.step = counting_step
    try:
        stepped()
    finally:
        scheduler_class.step = real_step
    assert steps == [8] * 5  # PNDM: N+1 ticks, one scheduler step over all 8 rows each

    def best(run):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    ratio = best(lambda: sd.reference(*jobs)) / best(stepped)
    record_property("stepped_vs_plain_images_per_s_8x4_steps", round(ratio, 3))
