"""The generation service: from a request's parameters to image tasks, through the Generator, back as images.

Every API family's routes turn their request into `ImageParams` (their protocol module does that)
and come through here, so model choice, limits, seeds, batching and errors behave the same
everywhere. `names` maps our field names to the family's own, so a 422 names the field the caller
actually sent (`size`, `steps`, `cfg_scale`, ...). The JobManager streams its jobs' images through
`stream_images`, and bulk runs check their rows with `check_limits` and seed them with `image_tasks`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar

import numpy as np
from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from ..config import AppArgs, RequestLimits
from ..pipeline.controlnets import describe_entries, refuse_combinations
from ..pipeline.errors import GenerationError, InvalidTaskError
from ..pipeline.fairness import DEFAULT_PRIORITY, Priority
from ..pipeline.families import family_of_source
from ..pipeline.params import ImageParams, new_seed, seed_at, split_lora_tags
from ..pipeline.tasks import ImageResult, ImageTask
from .encoding import MaskMeaning, decode_controls, decode_edit, decode_init_image
from .errors import ApiError
from .streams import latest_then_outcome
from .validation import field_rule

GENERATOR = "ImageGenerator"
_STATUS_CACHE_S = 1.0

# When the caller of the request being served needs its answer (wall-clock time.time()); set per request
# by the HTTP layer's deadline middleware, read when tasks are handed to the Generator.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)
# The request being served's dealings with its tenant's limits (`service.tenants.Admission`): opened by the HTTP
# layer's tenant middleware, used when the request's tasks are made (`stamp`).
REQUEST_ADMISSION: ContextVar = ContextVar("request_admission", default=None)


# -- from parameters to image tasks ------------------------------------------------------------


def check_limits(
    params: ImageParams,
    num_images: int,
    limits: RequestLimits,
    names: dict[str, str] | None = None,
    model: str | None = None,
) -> None:
    """Apply the deployment's limits (`model`'s own, named in the message when given); 422 names the field
    and the allowed range."""
    names = names or {}
    scope = f" for model {model!r}" if model else ""

    def invalid(field: str, problem: str) -> ApiError:
        return ApiError.invalid(names.get(field, field), problem)

    values = {
        **params.model_dump(include={"width", "height", "num_inference_steps", "guidance_scale"}),
        "num_images": num_images,
    }
    for field, (lowest, highest) in limits.bounds().items():
        value = values[field]
        if value is not None and not lowest <= value <= highest:
            raise invalid(field, f"must be {field_rule(field, (lowest, highest))}{scope} (got {value:g})")
    if params.width and params.height and params.width * params.height > limits.max_pixels:
        pixels = params.width * params.height
        raise invalid("width", f"width x height must be at most {limits.max_pixels} pixels{scope} (got {pixels})")
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(params, field))
        if length > limits.max_prompt_chars:
            raise invalid(field, f"must be at most {limits.max_prompt_chars} characters{scope} (got {length})")
    if params.hires is not None:
        if not (params.width and params.height):
            raise invalid("hires", "needs the first pass's width and height: give both")
        width, height = params.hires.target_size(params.width, params.height)
        if width > limits.max_width or height > limits.max_height or width * height > limits.max_pixels:
            raise invalid(
                "hires",
                f"would make {width}x{height}: at most {limits.max_width}x{limits.max_height} and {limits.max_pixels} "
                f"pixels{scope}",
            )


def image_tasks(
    params: ImageParams,
    num_images: int,
    limits: RequestLimits,
    request_id: str,
    *,
    init_image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    control_images: tuple[np.ndarray, ...] = (),
    names: dict[str, str] | None = None,
    model: str | None = None,
) -> list[ImageTask]:
    """One task per image, within `limits` (`model`'s, named in errors); image i gets seed + i (the base seed
    is drawn when left out). `mask` (white = repaint) goes with `init_image`; `control_images`: one map per
    ControlNet unit."""
    check_limits(params, num_images, limits, names, model)
    base_seed = params.seed if params.seed is not None else new_seed()
    return [
        ImageTask(
            params=params.model_copy(update={"seed": seed_at(base_seed, i)}),
            init_image=init_image,
            mask=mask,
            control_images=tuple(control_images),
            request_id=request_id,
        )
        for i in range(num_images)
    ]


class ModelTable:
    """The models and LoRA adapters a deployment offers; turns what a request names into what it gets."""

    def __init__(self, settings: AppArgs):
        served = settings.served_models()
        self.ids = [model.id for model in served]
        self.limits = {model.id: model.limits for model in served}
        self.with_refiner = [model.id for model in served if model.refiner]
        # unet / sd3 / flux, read from each source without loading it; None until a Hub model is cached.
        self.families = {model.id: family_of_source(model.source, model.pipeline.cache_dir) for model in served}
        self.default = settings.default_model_id
        self.adapters = settings.loras.catalog()
        # Each model's ControlNets (name, source), as configured: every replica loads them with the model.
        self.controlnets = {model.id: describe_entries(model.controlnets) for model in served}

    @property
    def several(self) -> bool:
        """Requests are routed by model (Serve's multiplexing) only when there is more than one."""
        return len(self.ids) > 1

    def family(self, model: str | None) -> str | None:
        return self.families.get(model or self.default)

    def limits_for(self, model: str | None) -> RequestLimits:
        """The limits of `model` (the default's when unnamed, or unknown: `resolve` refuses that one)."""
        return self.limits.get(model or self.default) or self.limits[self.default]

    def resolve(self, params: ImageParams, names: dict[str, str] | None = None) -> ImageParams:
        """`params` with the model set (the default when unnamed) and `<lora:name:scale>` prompt tags moved
        to `loras`; 422 naming the field for an unknown model or adapter."""
        names = names or {}
        model = params.model or self.default
        if model not in self.ids:
            raise ApiError.invalid(
                names.get("model", "model"), f"unknown model {model!r}; available: {', '.join(self.ids)}"
            )
        prompt, tags = split_lora_tags(params.prompt)
        loras = [lora.model_dump() for lora in params.loras]
        for name, scale in tags:
            try:
                loras.append({"name": name, "scale": 1.0 if scale in (None, "") else float(scale)})
            except ValueError:
                raise ApiError.invalid(
                    names.get("prompt", "prompt"), f"<lora:{name}:{scale}>: the scale is not a number"
                ) from None
        if not prompt:
            raise ApiError.invalid(names.get("prompt", "prompt"), "is empty once its <lora:...> tags are taken out")
        try:
            resolved = ImageParams.model_validate(
                {**params.model_dump(), "model": model, "prompt": prompt, "loras": loras}
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            field = "prompt" if tags else names.get("loras", "loras")
            raise ApiError.invalid(field, f"LoRA adapters: {error['msg']}") from None
        if resolved.refiner is not None and model not in self.with_refiner:
            having = ", ".join(self.with_refiner) or "none"
            raise ApiError.invalid(
                names.get("refiner", "refiner"), f"model {model!r} has no refiner; models with one: {having}"
            )
        available = self.adapters.names()
        unknown = sorted({lora.name for lora in resolved.loras} - set(available))
        if unknown:
            raise ApiError.invalid(
                names.get("loras", "loras"),
                f"unknown LoRA adapter {', '.join(unknown)}; available: {', '.join(available) or 'none'}",
            )
        self.check_controlnets(resolved, names)
        return resolved

    def check_controlnets(self, params: ImageParams, names: dict[str, str]) -> None:
        """Every ControlNet unit names one of its model's ControlNets (422 naming the unit and listing them)."""
        model = params.model or self.default
        if model not in self.ids:
            return  # `resolve` names the unknown model
        available = [entry["name"] for entry in self.controlnets[model]]
        for index, unit in enumerate(params.controlnet):
            if unit.name not in available:
                field = f"controlnet.{index}.name"
                served = (
                    f"model {model!r} serves {', '.join(available)}" if available else f"model {model!r} serves none"
                )
                raise ApiError.invalid(
                    names.get(field, field), f"unknown ControlNet {unit.name!r}; {served} (GET /controlnets)"
                )


# -- the Generator -----------------------------------------------------------------------------


class GenerationService:
    """What the routes call to make images: tasks from parameters, the Generator's calls and their failures."""

    def __init__(
        self,
        generator: DeploymentHandle,
        settings: AppArgs,
        app_name: str | None = None,
        replica: str = "",
    ):
        self.replica = replica  # this ingress replica's id (X-Ingress-Replica on every answer)
        self.generator = generator
        self.settings = settings
        self.models = ModelTable(settings)
        self.model = self.models.default
        self.published_limits = settings.published_limits()  # the widest; each model's own: models.limits_for
        self.app_name = app_name
        self.started_at = int(time.time())
        self.responses_by_status: Counter[str] = Counter()
        self._status: tuple[float, dict] | None = None
        self._status_read: asyncio.Future | None = None

    def tasks_for(
        self,
        params: ImageParams,
        num_images: int,
        request_id: str,
        *,
        init_image: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        control_images: tuple[np.ndarray, ...] = (),
        names: dict[str, str] | None = None,
        priority: Priority | None = None,
    ) -> list[ImageTask]:
        """The model, adapters and ControlNets resolved, then `image_tasks` within that model's limits, stamped with
        the caller's tenant and `priority` (`stamp`)."""
        params = self.models.resolve(params, names)
        try:
            refuse_combinations(params, mask is not None)
        except InvalidTaskError as exc:
            raise ApiError.invalid((names or {}).get(exc.field, exc.field), exc.message) from None
        limits = self.models.limits_for(params.model)
        own = params.model if limits != self.published_limits else None  # narrower than published: say whose
        tasks = image_tasks(
            params,
            num_images,
            limits,
            request_id,
            init_image=init_image,
            mask=mask,
            control_images=control_images,
            names=names,
            model=own,
        )
        return stamp(tasks, priority, (names or {}).get("priority", "priority"))

    async def edit(
        self,
        image: bytes | str,
        mask: bytes | str | None,
        params: ImageParams,
        *,
        fields: tuple[str, str] = ("init_image", "mask"),
        media_types: tuple[str | None, str | None] = (None, None),
        meaning: MaskMeaning = "white",
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """An image to edit and its mask (`encoding.decode_edit`: resized, inverted, outpainted, checked), decoded
        off the event loop within the model's limits."""
        limits = self.models.limits_for(params.model)
        return await asyncio.to_thread(
            decode_edit, image, mask, params, limits, fields=fields, media_types=media_types, meaning=meaning
        )

    async def control_images(
        self,
        params: ImageParams,
        images: list[bytes | str],
        fields: list[str] | None = None,
        size: tuple[int, int] | None = None,
        names: dict[str, str] | None = None,
    ) -> tuple[ImageParams, tuple[np.ndarray, ...]]:
        """The ControlNet units' images decoded off the event loop (`encoding.decode_controls`: checked as init
        images are, preprocessed, fitted to the output size): `size` (an init image's), else the request's width and
        height; where those are unset the first control image's size becomes the request's. `fields`: how the
        caller names each image (controlnet.<i>.image). The units' names are checked first (`names`: the caller's
        field names)."""
        if not images:
            return params, ()
        self.models.check_controlnets(params, names or {})
        limits = self.models.limits_for(params.model)
        fields = fields or [f"controlnet.{i}.image" for i in range(len(images))]
        width, height = size or (params.width, params.height)
        maps, (width, height) = await asyncio.to_thread(
            decode_controls, images, params.controlnet, limits, width, height, fields
        )
        if size is None:
            params = params.model_copy(update={"width": width, "height": height})
        return params, tuple(maps)

    async def init_image(
        self, data: bytes | str, params: ImageParams, field: str = "init_image", media_type: str | None = None
    ) -> np.ndarray:
        """An uploaded image, decoded off the event loop, at the size `params` ask for within their model's limits."""
        limits = self.models.limits_for(params.model)
        return await asyncio.to_thread(decode_init_image, data, limits, params.width, params.height, field, media_type)

    async def generate(self, tasks: list[ImageTask]) -> list[ImageResult]:
        """One Generator call per image, so the images of one request batch with everyone else's."""
        responses = []
        finished = False
        try:
            responses.extend(
                routed(self.generator, task, self.models.several).generate.remote(handed_on(task)) for task in tasks
            )
            images = list(await self._mapped(asyncio.gather(*responses)))
            finished = True
            return images
        finally:
            if not finished:
                # Failure, time-out or client gone: drop this request's work that has not started.
                for response in responses:
                    _cancel_response(response)

    async def generate_each(self, task_lists: list[list[ImageTask]]) -> list[list[ImageResult]]:
        """Several requests' tasks submitted together (so they share batches), answered per request."""
        images = iter(await self.generate([task for tasks in task_lists for task in tasks]))
        return [[next(images) for _ in tasks] for tasks in task_lists]

    async def generate_events(self, tasks: list[ImageTask]) -> AsyncIterator[dict | list[ImageResult]]:
        """Progress of the request's images as they run, `{"step", "total_steps", "images_done", "num_images"}`
        (all images together; the latest when several came at once), then the list of images. Errors are
        raised as from `generate`."""
        updates: asyncio.Queue[dict] = asyncio.Queue()
        streaming = self.generator.options(stream=True)
        handed = [handed_on(task) for task in tasks]
        running = asyncio.ensure_future(
            self._mapped(stream_images(streaming, handed, updates.put_nowait, self.models.several))
        )
        try:
            async for item in latest_then_outcome(running, updates, merge=_keep_preview):
                yield item
        finally:
            running.cancel()  # the caller gave up: its images leave the engine at their next step

    async def _mapped(self, call):
        """A Generator call's failures as API errors."""
        try:
            return await call
        except GenerationError as exc:
            raise ApiError.of(exc) from None
        except BackPressureError as exc:
            raise self.unavailable("overloaded", f"server busy: {exc.message}", exc.retry_after_s) from None
        except (RayActorError, DeploymentUnavailableError):
            message = "the generator replica working on this request stopped; retry (a new one is starting)"
            raise self.unavailable("generator_unavailable", message) from None

    async def generator_info(self) -> dict:
        return await asyncio.wait_for(self.generator.info.remote(), timeout=10)

    async def generator_status(self) -> dict:
        """Replica counts and state of the Generator deployment, from Serve's controller (cached briefly; callers
        that come while it is being read share that one read, so a burst of probes costs one)."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] <= _STATUS_CACHE_S:
            return self._status[1]
        if self._status_read is None or self._status_read.done():
            self._status_read = asyncio.ensure_future(asyncio.to_thread(self._read_status))
        status = await asyncio.shield(self._status_read)
        self._status = (time.monotonic(), status)
        return status

    def _read_status(self) -> dict:
        from ray import serve

        apps = serve.status().applications
        app = apps.get(self.app_name) if self.app_name else next(iter(apps.values()), None)
        deployment = app.deployments.get(GENERATOR) if app else None
        if deployment is None:
            return {"status": "MISSING", "running_replicas": 0, "replica_states": {}}
        states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
        return {
            "status": str(getattr(deployment.status, "value", deployment.status)),
            "running_replicas": states.get("RUNNING", 0),
            "replica_states": states,
        }

    def unavailable(self, code: str, message: str, retry_after_s: float | None = None) -> ApiError:
        """A 503 that says when to come back."""
        retry_after = max(1, round(retry_after_s)) if retry_after_s else self.published_limits.retry_after_s
        return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})


def stamp(
    tasks: list[ImageTask], priority: Priority | None, field: str = "priority", default: Priority = DEFAULT_PRIORITY
) -> list[ImageTask]:
    """A request's tasks as the engines see them: through its tenant's admission when it has one (its tenant,
    weight and priority stamped; 403 naming `field` above the tenant's max_priority, 429 past a limit, its images
    charged: `service.tenants`), else with the priority only."""
    admission = REQUEST_ADMISSION.get()
    if admission is not None:
        return admission.admit(tasks, priority or default, field)
    return [dataclasses.replace(t, priority=priority or default) for t in tasks]


def routed(generator: DeploymentHandle, task: ImageTask, by_model: bool) -> DeploymentHandle:
    """The handle that sends `task` to a Generator replica holding its model (when routing by model)."""
    if not by_model or task.params.model is None:
        return generator
    return generator.options(multiplexed_model_id=task.params.model)


async def stream_images(
    streaming_generator: DeploymentHandle,
    tasks: list[ImageTask],
    on_progress: Callable[[dict], None],
    by_model: bool = False,
) -> list[ImageResult]:
    """Every task's image through the Generator's streaming call, all at once; `on_progress` gets the
    progress of them all together (`step`, `total_steps`, `images_done`, `num_images`) after each
    change. One failing, or this being cancelled, cancels the others: their images leave the engine
    at the next step."""
    steps, totals, done = [0] * len(tasks), [0] * len(tasks), [0] * len(tasks)

    def report(preview: str | None = None) -> None:
        progress = {"step": sum(steps), "total_steps": sum(totals), "images_done": sum(done), "num_images": len(tasks)}
        on_progress(progress if preview is None else {**progress, "preview": preview})

    async def one(index: int) -> ImageResult:
        result = None
        stream = routed(streaming_generator, tasks[index], by_model).generate_stream.remote(tasks[index])
        try:
            async for item in stream:
                if isinstance(item, dict):
                    steps[index], totals[index] = item["step"], item["total_steps"]
                else:
                    result, done[index] = item, 1
                report(item.get("preview") if isinstance(item, dict) else None)
        finally:
            if result is None:
                stream.cancel()
        return result

    running = [asyncio.ensure_future(one(i)) for i in range(len(tasks))]
    try:
        return list(await asyncio.gather(*running))
    finally:
        for one_image in running:
            one_image.cancel()


def _keep_preview(older: dict, newer: dict) -> dict:
    """Progress updates that waited together: the newer, keeping the older's preview when it brings none."""
    if "preview" in newer or "preview" not in older:
        return newer
    return {**newer, "preview": older["preview"]}


def handed_on(task: ImageTask) -> ImageTask:
    """The task as handed to the Generator: when (for its queue-wait metric) and by when (its deadline)."""
    return dataclasses.replace(task, submitted_at=time.time(), deadline=REQUEST_DEADLINE.get())


def _cancel_response(response) -> None:
    # cancel() re-raises the call's own error (e.g. BackPressureError) when it already failed.
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - nothing left to cancel
        pass


def is_ready(status: dict) -> bool:
    """Ready when a Generator replica runs, or when none is needed yet (scaled to zero, healthy)."""
    return status["running_replicas"] > 0 or status["status"] == "HEALTHY"
