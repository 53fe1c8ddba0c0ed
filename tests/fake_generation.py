"""The HTTP app without Ray: the real GenerationService over a stand-in for the Generator's handle.

Route tests drive `serve_app.api.asgi.create_api` in-process (Starlette's TestClient) in
milliseconds. Only the Ray-facing ends are replaced: `FakeGenerator` answers
`.generate.remote(job)` / `.info.remote()` like the ImageGenerator's DeploymentHandle, and
`FakeGenerationService.generator_status()` reports replica states without asking Serve's
controller. Everything between the routes and the handle (limits, seeds, the mapping of
Generator failures to API errors, cancelling abandoned work) is the real code.

What the Generator does that the routes rely on is imitated, deterministically:
- defaults fill the parameters a job left out (the tiny model's: 64x64, 2 steps, guidance 7.5,
  strength 0.75), and each ImageResult carries its filled-in parameters;
- pixels follow from the seed (and, for image-to-image, the init image and strength): the same
  parameters give the same picture, another seed another one;
- jobs handed on in the same event-loop turn share a "batch": their batch_size is its size,
  as jobs submitted together reach one batch of the real Generator.
"""

from __future__ import annotations

import asyncio

import numpy as np
from harness import load_config

from serve_app.config import AppArgs
from serve_app.pipeline.params import GenerationDefaults
from serve_app.pipeline.tasks import ImageResult, ImageTask
from serve_app.service.generation import GenerationService

# synthetic:tiny's own defaults (pipeline/presets/tiny.json) and the engine's fallback strength.
TINY_DEFAULTS = GenerationDefaults(width=64, height=64, num_inference_steps=2, guidance_scale=7.5, strength=0.75)


def demo_settings(**limits) -> AppArgs:
    """The `args` of configs/cpu-demo.yaml (its limits: 64-256 px, 50 steps), with `limits` changed."""
    args = load_config()["applications"][0]["args"]
    args.setdefault("limits", {}).update(limits)
    return AppArgs.model_validate(args)


def fake_pixels(job: ImageTask) -> np.ndarray:
    """Noise drawn from the seed; image-to-image moves `strength` of the way from the init image to it."""
    params = job.params
    noise = np.random.default_rng(params.seed).integers(0, 256, (params.height, params.width, 3), dtype=np.uint8)
    if job.init_image is None:
        return noise
    mixed = job.init_image.astype(float) * (1 - params.strength) + noise.astype(float) * params.strength
    return mixed.round().astype(np.uint8)


class FakeResponse:
    """Like Serve's DeploymentResponse: awaitable, and `cancel()` drops the work (recorded at once)."""

    def __init__(self, generator: FakeGenerator, job: ImageTask, task: asyncio.Task):
        self._generator, self._job, self._task = generator, job, task

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        if not self._task.done():
            self._generator.note_cancelled(self._job)
        self._task.cancel()


class _Method:
    def __init__(self, call):
        self.remote = call


class FakeGenerator:
    """Stands in for the ImageGenerator's DeploymentHandle.

    `jobs`: every job received, as the ingress sent it. `cancelled`: jobs whose caller gave up
    before they finished. `fail_with`: an exception the jobs raise (as the handle re-raises the
    Generator's error); `hang`: keep jobs unfinished until cancelled. Either may also be a
    function of the job, to pick the jobs it applies to. `routed_to`: the model id of each call routed
    by model (Serve's `multiplexed_model_id`, when the deployment serves several).
    """

    def __init__(self, defaults: GenerationDefaults = TINY_DEFAULTS):
        self.defaults = defaults
        self.jobs: list[ImageTask] = []
        self.cancelled: list[ImageTask] = []
        self.batch_sizes: list[int] = []
        self.fail_with: BaseException | None = None
        self.hang = False
        self.routed_to: list[str] = []
        self._batch: list[ImageTask] | None = None
        self.generate = _Method(self._submit)
        self.generate_stream = _Method(self._stream)
        self.info = _Method(self._info)

    def options(self, multiplexed_model_id: str = "", **_) -> FakeGenerator:
        self.routed_to.append(multiplexed_model_id)
        return self

    def _submit(self, job: ImageTask) -> FakeResponse:
        loop = asyncio.get_running_loop()
        if self._batch is None:
            # Everything submitted before the loop's next turn joins this batch.
            self._batch = []
            loop.call_soon(self._close_batch)
        self._batch.append(job)
        self.jobs.append(job)
        return FakeResponse(self, job, loop.create_task(self._run(job, self._batch)))

    def _close_batch(self) -> None:
        if self._batch:
            self.batch_sizes.append(len(self._batch))
        self._batch = None

    def note_cancelled(self, job: ImageTask) -> None:
        if not any(job is seen for seen in self.cancelled):
            self.cancelled.append(job)

    async def _run(self, job: ImageTask, batch: list[ImageTask]) -> ImageResult:
        try:
            await asyncio.sleep(0)  # the batch closes first
            if self.hang(job) if callable(self.hang) else self.hang:
                await asyncio.get_running_loop().create_future()  # until cancelled
        except asyncio.CancelledError:
            # Cancelled by the caller's task being cancelled (asyncio.gather passes it on) or by cancel().
            self.note_cancelled(job)
            raise
        failure = self.fail_with(job) if callable(self.fail_with) else self.fail_with
        if failure is not None:
            raise failure
        job = job.with_defaults(self.defaults)
        return ImageResult(
            fake_pixels(job), job.params, batch_size=len(batch), generation_time_s=0.0125, replica="fake-replica"
        )

    def _stream(self, job: ImageTask) -> FakeStream:
        self.jobs.append(job)
        return FakeStream(self, job)

    async def _info(self) -> dict:
        return {"replica": "fake-replica", "images": {"received": len(self.jobs), "cancelled": len(self.cancelled)}}


class FakeStream:
    """Like the streaming handle's response of `generate_stream`: progress each step (with an 8x8 preview every
    `preview_every` steps, as the step engine's latent previews of a 64x64 image), then the image."""

    def __init__(self, generator: FakeGenerator, job: ImageTask):
        self._generator, self._job = generator, job

    def __aiter__(self):
        return self._items()

    async def _items(self):
        job = self._job.with_defaults(self._generator.defaults)
        steps = job.params.num_inference_steps
        for step in range(steps + 1):
            update = {"step": step, "total_steps": steps}
            if job.preview_every and step % job.preview_every == 0 and step < steps:
                update["preview"] = _preview_png(step)
            yield update
            await asyncio.sleep(0)
        yield await self._generator._run(self._job, [self._job])

    def cancel(self) -> None:
        self._generator.note_cancelled(self._job)


def _preview_png(step: int) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (step * 40 % 256, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class FakeGenerationService(GenerationService):
    """The real service over a FakeGenerator; replica states from `status` instead of Serve's controller."""

    def __init__(self, settings: AppArgs | None = None, generator: FakeGenerator | None = None):
        settings = settings or demo_settings()
        generator = generator or FakeGenerator(settings.defaults.over(TINY_DEFAULTS))
        super().__init__(generator, settings, app_name="sd")
        self.status = {"status": "HEALTHY", "running_replicas": 1, "replica_states": {"RUNNING": 1}}

    async def generator_status(self) -> dict:
        return self.status
