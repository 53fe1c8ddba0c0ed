"""ControlNet rows in the step engine (serve_app/pipeline/steppers/control.py) and the request engine, against
diffusers' StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline (and their multi-ControlNet and
image-to-image forms).

The invariant: an image with ControlNet units stepped alone equals the ControlNet pipeline's for the same seed bit
for bit; beside rows with other ControlNets, scales, windows, modes and none, within 1/255; one ControlNet call per
ControlNet and one UNet call per tick.
"""

import contextlib
import copy

import numpy as np
import pytest
import torch
from helpers import lazy_fixtures, started, step_to_the_end
from PIL import Image

from serve_app.pipeline.controlnets import (
    ControlNetEntry,
    controlnet_call_arguments,
    controlnet_pipeline,
    prompt_mode,
    synthetic_controlnet,
)
from serve_app.pipeline.errors import InvalidTaskError
from serve_app.pipeline.loading import ModelSource, PipelineOptions, image_to_image, load_pipeline
from serve_app.pipeline.model import LoadedModel
from serve_app.pipeline.params import GenerationDefaults, ImageParams
from serve_app.pipeline.schedulers import SchedulerTemplates, make_scheduler
from serve_app.pipeline.steppers.unet import UNetStepper
from serve_app.pipeline.tasks import ImageTask, to_uint8

SIDE = 64
DEFAULTS = GenerationDefaults(width=SIDE, height=SIDE, num_inference_steps=3, guidance_scale=7.5, strength=0.7)
INIT = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def control_image(seed: int) -> np.ndarray:
    """A white box on black: a map a ControlNet reads."""
    rng = np.random.default_rng(seed)
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    x, y = rng.integers(0, SIDE - 24, 2)
    image[y : y + 24, x : x + 20] = 255
    return image


class Model:
    """A tiny pipeline, two synthetic ControlNets fitted to it, and a UNetStepper over them."""

    def __init__(self, source: str):
        self.pipe = load_pipeline(ModelSource.parse(source), PipelineOptions(device="cpu", torch_threads=1))
        self.model_scheduler = self.pipe.scheduler
        self.nets = {"edges": synthetic_controlnet(self.pipe.unet, 1), "depth": synthetic_controlnet(self.pipe.unet, 2)}
        self.stepper = UNetStepper(
            self.pipe,
            SchedulerTemplates(self.model_scheduler),
            img2img_pipe=image_to_image(self.pipe),
            controlnets=self.nets,
        )
        self._fresh: dict = {}
        self._pipelines: dict = {}

    def scheduler(self, name: str):
        if name not in self._fresh:
            self._fresh[name] = make_scheduler(name, self.model_scheduler)
        return copy.deepcopy(self._fresh[name])

    def reference(self, task: ImageTask) -> np.ndarray:
        """diffusers' ControlNet pipeline (multi-ControlNet for several units) for one task."""
        p = task.params
        nets = [self.nets[unit.name] for unit in p.controlnet]
        key = (tuple(unit.name for unit in p.controlnet), task.init_image is not None)
        if key not in self._pipelines:
            self._pipelines[key] = controlnet_pipeline(self.pipe, nets, task.init_image is not None)
        pipe = self._pipelines[key]
        pipe.scheduler = self.scheduler(p.scheduler)
        control = controlnet_call_arguments([task], nets)
        kwargs = {
            "prompt": [p.prompt],
            "negative_prompt": [p.negative_prompt] if p.negative_prompt else None,
            "num_inference_steps": p.num_inference_steps,
            "guidance_scale": p.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(p.seed)],
            "output_type": "np",
            "width": p.width,
            "height": p.height,
        }
        if task.init_image is None:
            kwargs["image"] = control.pop("images")
        else:
            kwargs.update(
                image=[Image.fromarray(task.init_image)], control_image=control.pop("images"), strength=p.strength
            )
        scaled = prompt_mode(nets) if p.controlnet[0].control_mode == "prompt" else contextlib.nullcontext()
        with torch.inference_mode(), scaled:
            return to_uint8(pipe(**kwargs, **control).images)[0]

    def start(self, *tasks: ImageTask):
        return started(self.stepper, *tasks)

    def finish(self, *states) -> list[np.ndarray]:
        return self.stepper.decode(step_to_the_end(self.stepper, list(states)))

    def alone(self, task: ImageTask) -> np.ndarray:
        return self.finish(*self.start(task))[0]


@pytest.fixture(scope="module")
def sd():
    return Model("synthetic:tiny")


@pytest.fixture(scope="module")
def xl():
    return Model("synthetic:tiny-xl")


@pytest.fixture
def models(request):
    """The models by name, each loaded when a test first asks for it."""
    return lazy_fixtures(request)


def task(*units: dict, images=None, init_image=None, **params) -> ImageTask:
    values = {"prompt": "a cat", "seed": 3, **params}
    images = images if images is not None else [control_image(i) for i in range(len(units))]
    return ImageTask(
        ImageParams(**values, controlnet=units), init_image=init_image, control_images=tuple(images)
    ).with_defaults(DEFAULTS)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@contextlib.contextmanager
def calls(**modules):
    """Every call of the named modules inside the block, in order: (name, rows, whether residuals were passed)."""
    seen: list[tuple[str, int, bool]] = []
    handles = []
    for name, module in modules.items():

        def record(mod, args, kwargs, name=name):
            sample = args[0] if args else kwargs["sample"]
            seen.append((name, sample.shape[0], kwargs.get("mid_block_additional_residual") is not None))

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def ticks(seen: list) -> list[list]:
    """The calls of each tick: ControlNet calls, then the UNet call that ends it."""
    out, current = [], []
    for call in seen:
        current.append(call)
        if call[0] == "unet":
            out.append(current)
            current = []
    return out


# -- alone: bit for bit ---------------------------------------------------------------------------

CASES = {
    "balanced": ({"name": "edges"},),
    "scale": ({"name": "depth", "scale": 0.4},),
    "guess-mode": ({"name": "edges", "scale": 0.8, "control_mode": "control"},),
    "prompt-mode": ({"name": "depth", "scale": 1.3, "control_mode": "prompt"},),
    "window": ({"name": "edges", "start": 0.3, "end": 0.7},),
}
FAST = {("sd", "balanced"), ("sd", "guess-mode"), ("sd", "prompt-mode"), ("sd", "window"), ("xl", "balanced")}


@pytest.mark.parametrize(
    "model,case",
    [
        pytest.param(model, case, marks=() if (model, case) in FAST else pytest.mark.slow)
        for model in ("sd", "xl")
        for case in CASES
    ],
)
def test_alone_equals_the_controlnet_pipeline(models, model, case, record_property):
    m = models[model]
    request = task(*CASES[case], negative_prompt="blurry", scheduler="euler_a" if case == "window" else "default")
    image = m.alone(request)
    diff = max_diff(image, m.reference(request))
    record_property(f"max_diff_alone[{model}-{case}]", diff)
    assert diff == 0
    plain = m.alone(ImageTask(request.params.model_copy(update={"controlnet": ()})))
    assert max_diff(image, plain) > 8  # the ControlNet moved the image


@pytest.mark.parametrize("model", ["sd", pytest.param("xl", marks=pytest.mark.slow)])
def test_multi_controlnet_alone_equals_the_multi_controlnet_pipeline(models, model, record_property):
    m = models[model]
    request = task({"name": "edges", "scale": 0.7}, {"name": "depth", "scale": 0.5, "end": 0.5}, scheduler="dpmpp_2m")
    diff = max_diff(m.alone(request), m.reference(request))
    record_property(f"max_diff_multi_alone[{model}]", diff)
    assert diff == 0


@pytest.mark.parametrize("guidance", [7.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_without_guidance_and_image_to_image_alone(sd, guidance, record_property):
    for request in (
        task(
            {"name": "edges", "control_mode": "control"},
            {"name": "depth", "control_mode": "control"},
            guidance_scale=1.0,
        ),
        task({"name": "depth", "scale": 0.9}, init_image=INIT, strength=0.7, guidance_scale=guidance),
    ):
        diff = max_diff(sd.alone(request), sd.reference(request))
        record_property(f"max_diff_alone[{request.kind}-guidance-{request.params.guidance_scale:g}]", diff)
        assert diff == 0


# -- together: one call per ControlNet, one UNet call per tick ------------------------------------


def mixed_tasks() -> list[ImageTask]:
    return [
        task({"name": "edges", "scale": 0.5}, seed=1),
        task({"name": "depth", "scale": 1.2, "start": 0.2, "end": 0.8}, seed=2, scheduler="euler"),
        task({"name": "edges", "scale": 0.9}, {"name": "depth", "scale": 0.3}, seed=3, negative_prompt="fog"),
        task({"name": "edges", "control_mode": "control"}, seed=4, num_inference_steps=4),
        task({"name": "depth", "scale": 0.7}, seed=5, guidance_scale=1.0),
        task({"name": "edges", "scale": 0.6}, {"name": "edges", "scale": 1.1}, seed=6),
        task(seed=7, prompt="no control at all"),
        task({"name": "depth", "control_mode": "prompt"}, init_image=INIT, strength=0.8, seed=8),
    ]


@pytest.mark.parametrize("model", ["sd", pytest.param("xl", marks=pytest.mark.slow)])
def test_rows_with_other_controlnets_scales_windows_and_none_share_each_tick(models, model, record_property):
    m = models[model]
    tasks = mixed_tasks()
    references = [m.alone(t) for t in tasks]  # each alone == the pipeline (above)
    states = m.start(*tasks)
    with calls(unet=m.pipe.unet, edges=m.nets["edges"], depth=m.nets["depth"]) as seen:
        images = m.finish(*states)
    by_tick = ticks(seen)
    assert len(by_tick) == max(s.total_steps for s in states)  # one UNet call per tick
    assert by_tick[0][-1] == ("unet", sum(s.rows for s in states), True)
    # Tick 0: edges over tasks 1 (2 rows), 3 (2), 4 (guess mode: its conditional row) and 6 (2), a second call
    # for task 6's second edges unit; depth over 3 (2 rows), 5 (no guidance: 1) and 8 (2); task 2 not yet.
    assert sorted(by_tick[0][:-1]) == [("depth", 5, False), ("edges", 2, False), ("edges", 7, False)]
    for tick in by_tick:
        names = [name for name, _, _ in tick]
        assert names.count("edges") <= 2 and names.count("depth") <= 1
    diffs = [max_diff(image, reference) for image, reference in zip(images, references)]
    record_property(f"max_diff_mixed[{model}]", max(diffs))
    assert max(diffs) <= 1


def test_a_tick_without_controlled_rows_passes_no_residuals(sd):
    late = task({"name": "edges", "start": 0.5}, seed=9, num_inference_steps=4)
    plain = task(seed=10)
    states = sd.start(late, plain)
    with calls(unet=sd.pipe.unet, edges=sd.nets["edges"]) as seen:
        sd.finish(*states)
    unet = [controlled for name, _, controlled in seen if name == "unet"]
    steps = states[0].total_steps
    active = [not (i / steps < 0.5) for i in range(steps)]
    assert unet[:steps] == active and not any(unet[steps:])
    assert sum(name == "edges" for name, _, _ in seen) == sum(active)


def test_grouped_batching_keeps_controlnet_sets_apart(sd):
    grouped = UNetStepper(sd.pipe, sd.stepper.schedulers, controlnets=sd.nets, group_by_controlnets=True)
    a, b, c = task({"name": "edges"}), task({"name": "edges", "scale": 0.5}), task(seed=4)
    assert len({grouped.group_key(t) for t in (a, b, c)}) == 3
    assert len({sd.stepper.group_key(t) for t in (a, b, c)}) == 1
    states = grouped.start([a, b])
    assert states[0].shape_key != states[1].shape_key


# -- the request engine makes the same images --------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    entries = [ControlNetEntry(name="edges", source="synthetic:1"), ControlNetEntry(name="depth", source="synthetic:2")]
    options = PipelineOptions(device="cpu", torch_threads=1, engine="request")
    return LoadedModel.load("synthetic:tiny", options, DEFAULTS, controlnets=entries)


def test_the_request_engine_makes_the_step_engines_images(loaded, sd, record_property):
    same_units = [task({"name": "edges", "scale": 0.5}, images=[control_image(i)], seed=i) for i in (11, 12)]
    tasks = [
        *same_units,  # one pipeline call, each task its own control image
        task(
            {"name": "edges", "scale": 0.7, "control_mode": "prompt"},
            {"name": "depth", "control_mode": "prompt", "end": 0.6},
            seed=13,
        ),
        task({"name": "depth", "control_mode": "control"}, init_image=INIT, seed=14),
    ]
    assert len(loaded.groups([loaded.prepare(t)[0] for t in tasks])) == 3
    results = loaded.generate(tasks)
    diffs = [max_diff(result.pixels, sd.alone(t)) for result, t in zip(results, tasks)]
    record_property("max_diff_request_engine", diffs)
    assert diffs[2:] == [0, 0] and max(diffs) <= 1  # the first two shared a call of 2
    assert {entry["name"] for entry in loaded.describe()["controlnets"]} == {"edges", "depth"}
    assert all(entry["memory_bytes"] > 0 for entry in loaded.describe()["controlnets"])


# -- what is refused ---------------------------------------------------------------------------------


def test_unknown_controlnet_names_the_unit_and_lists_the_names(loaded, sd):
    for check in (loaded.prepare, sd.stepper.check_inputs):
        with pytest.raises(InvalidTaskError) as error:
            check(task({"name": "edges"}, {"name": "pose"}))
        assert error.value.field == "controlnet.1.name"
        assert "depth, edges" in error.value.message


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"images": [np.zeros((32, 64, 3), np.uint8)], "width": SIDE, "height": SIDE}, "controlnet.0.image"),
        ({"images": [np.zeros((64, 64), np.uint8)]}, "controlnet.0.image"),
        ({"images": []}, "controlnet"),
        ({"hires": {"scale": 2}}, "hires"),
    ],
)
def test_control_images_and_combinations_that_are_refused(loaded, changes, field):
    with pytest.raises(InvalidTaskError) as error:
        loaded.prepare(task({"name": "edges"}, **changes))
    assert error.value.field == field


def test_a_controlnet_row_is_not_masked(loaded):
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[16:48, 16:48] = 255
    request = task({"name": "edges"}, init_image=INIT)
    with pytest.raises(InvalidTaskError) as error:
        loaded.prepare(ImageTask(request.params, init_image=INIT, mask=mask, control_images=request.control_images))
    assert error.value.field == "mask"


def test_flow_models_take_no_controlnets():
    from serve_app.pipeline.controlnets import check_control

    with pytest.raises(InvalidTaskError, match="UNet models"):
        check_control(task({"name": "edges"}), "flux")
    with pytest.raises(ValueError, match="FLUX.1"):
        LoadedModel.load(
            "synthetic:tiny-flux-schnell",
            PipelineOptions(device="cpu", max_sequence_length=16),
            controlnets=[ControlNetEntry(name="edges", source="synthetic")],
        )


def test_an_unset_size_is_the_control_images(loaded):
    image = np.zeros((96, 64, 3), np.uint8)
    request = ImageTask(ImageParams(prompt="x", seed=1, controlnet=[{"name": "edges"}]), control_images=(image,))
    prepared, _ = loaded.prepare(request)
    assert (prepared.params.width, prepared.params.height) == (64, 96)


def test_synthetic_controlnets_are_drawn_from_their_seed(sd):
    again = synthetic_controlnet(sd.pipe.unet, 1)
    for (name, a), b in zip(sd.nets["edges"].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = sd.nets["depth"].controlnet_mid_block.weight
    assert not torch.equal(sd.nets["edges"].controlnet_mid_block.weight, other)
