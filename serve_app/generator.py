"""ImageGenerator: the GPU deployment. One engine per replica, fed through @serve.batch.

@serve.batch is the admission window: what arrives together is handed to the engine loop
together, and joins the running batch at its next tick (the step engine) or the next
pipeline call (the request engine) while the current one computes. The loop runs on its own
thread (pipeline layer, `pipeline/engines.py`); results come back to this replica's event
loop through callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator

import ray
from ray import serve

from .config import GENERATOR_MAX_ONGOING_REQUESTS, SERVE_BACKPRESSURE, BatchingConfig, ServedModel
from .metrics import GeneratorMetrics
from .pipeline.adapters import AdapterSettings
from .pipeline.engines import Progress
from .pipeline.errors import InsufficientMemoryError, InvalidTaskError
from .pipeline.tasks import ImageResult, ImageTask
from .service.streams import latest_then_outcome

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


@serve.deployment(
    name="ImageGenerator",
    ray_actor_options={"num_cpus": 1},
    # Well above the batch: requests queue here, where the engine loop takes them at its next tick,
    # rather than in the callers' routers, whose retries back off while the model idles.
    max_ongoing_requests=GENERATOR_MAX_ONGOING_REQUESTS,
    backpressure_config=SERVE_BACKPRESSURE,
    user_config=_DEFAULT_BATCHING.model_dump(),
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class ImageGenerator:
    def __init__(self, models: list[ServedModel], max_models_per_replica: int, loras: AdapterSettings):
        self._models = {model.id: model for model in models}
        self.default_model = models[0].id
        self._adapters = loras
        self._batching = _DEFAULT_BATCHING
        self.limits = self._batching.loop_limits()  # shared by every model's loop; reconfigure changes it
        self._max_models = max_models_per_replica
        self._started = time.time()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self.metrics = GeneratorMetrics()
        self.received = 0
        self._progress_queues: dict[int, asyncio.Queue] = {}  # by id() of a task being streamed
        self._loaded: dict[str, ModelRuntime] = {}
        self._retired_counts: Counter = Counter()  # tasks counted by runtimes since unloaded
        self._retired_calls: Counter = Counter()
        self.model_loads = 0
        self.model_evictions = 0
        self.model_load_s = 0.0
        self._event_loop: asyncio.AbstractEventLoop | None = None
        # The default model loads with the replica: ready means it serves. Others load on first use,
        # through Serve's model multiplexing, which routes each request to a replica holding its model
        # and unloads the least recently used past the cap.
        self._preloaded: ModelRuntime | None = self._load_runtime(self.default_model)
        self._runtime_for = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(
            _plain_function(self._runtime)  # Serve keeps its model cache as an attribute of the function
        )
        logger.info(
            "ImageGenerator ready: %s, engine %s, warm-up %.2fs",
            self._preloaded.model.describe(),
            self._preloaded.engine.kind,
            self._preloaded.warmup_s,
        )

    def _load_runtime(self, model_id: str) -> ModelRuntime:
        """Load a model (on a worker thread, except at start); too big for memory is a clear error, once."""
        served = self._models.get(model_id)
        if served is None:
            raise InvalidTaskError(f"unknown model {model_id!r}; available: {', '.join(self._models)}", "model")
        runtime = ModelRuntime.load(served, self._adapters, self.limits, beside=list(self._loaded))
        self.model_loads += 1
        self.model_load_s += runtime.load_s
        self.metrics.model_loads.inc()
        self.metrics.model_load_seconds.observe(runtime.load_s)
        logger.info(
            "model %s loaded in %.2fs (%d loaded on this replica)", model_id, runtime.load_s, len(self._loaded) + 1
        )
        return runtime

    async def _runtime(self, model_id: str) -> ModelRuntime:
        """Serve's multiplexed loader (`self._runtime_for`): the runtime of `model_id`, loaded if needed."""
        self._event_loop = asyncio.get_running_loop()
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None and preloaded.id == model_id:
            runtime = preloaded
        else:
            if preloaded is not None:  # kept outside Serve's count so far: the cap applies to it too
                if len(self._loaded) + 1 >= self._max_models:
                    await asyncio.to_thread(preloaded.unload)
                    self._retire(preloaded)
                else:
                    self._preloaded = preloaded
            runtime = await asyncio.to_thread(self._load_runtime, model_id)
        runtime.on_unload = self._retire_soon
        self._loaded[model_id] = runtime
        return runtime

    def _retire_soon(self, runtime: ModelRuntime) -> None:
        # Serve unloads on a worker thread: count it on the replica's event loop, with everything else.
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._retire, runtime)

    def _retire(self, runtime: ModelRuntime) -> None:
        if self._loaded.get(runtime.id) is runtime:
            del self._loaded[runtime.id]
        counts = runtime.counters.snapshot()
        self._retired_calls.update({int(k): v for k, v in counts.pop("model_calls_by_batch_size").items()})
        self._retired_counts.update({k: v for k, v in counts.items() if k in _SUMMED_COUNTS})
        self.model_evictions += 1
        self.metrics.model_evictions.inc()
        logger.info("model %s unloaded (least recently used)", runtime.id)

    def _runtimes(self) -> list[ModelRuntime]:
        return list(self._loaded.values()) + ([self._preloaded] if self._preloaded is not None else [])

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config or {})
        self._admission_window.set_max_batch_size(batching.max_batch_size)
        self._admission_window.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        # The loop reads these at every tick.
        new = batching.loop_limits()
        self.limits.max_batch_size = new.max_batch_size
        self.limits.max_active_requests = new.max_active_requests
        self.limits.admission = new.admission
        self._batching = batching
        self.metrics.max_batch_size.set(batching.max_batch_size)

    async def generate(self, task: ImageTask) -> ImageResult:
        self.received += 1
        runtime = await self._runtime_for(task.params.model or self.default_model)
        result = await (await self._admission_window((_with_arrival_time(task), runtime)))
        if isinstance(result, Exception):
            raise result
        return result

    async def generate_stream(self, task: ImageTask) -> AsyncIterator[dict | ImageResult]:
        """The task's progress as it runs, `{"step", "total_steps"}` (the latest, when several steps
        passed since the last one was read; with `"preview"`, a base64 PNG, every `task.preview_every`
        steps), then its `ImageResult`; errors are raised. Closing the
        stream (the caller gave up) cancels the task: it leaves the engine at its next step."""
        task = _with_arrival_time(task)
        progress: asyncio.Queue[Progress] = asyncio.Queue()
        self._progress_queues[id(task)] = progress
        outcome = asyncio.ensure_future(self.generate(task))
        try:
            async for item in latest_then_outcome(outcome, progress, merge=_keep_latest_preview):
                if isinstance(item, Progress):
                    update = {"step": item.step, "total_steps": item.total_steps}
                    if item.preview is not None:
                        update["preview"] = base64.b64encode(item.preview).decode("ascii")
                    yield update
                else:
                    yield item
        finally:
            self._progress_queues.pop(id(task), None)
            outcome.cancel()  # the caller gave up: the task leaves the engine at its next step

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s
    )
    async def _admission_window(self, arrivals: list[tuple[ImageTask, ModelRuntime]]) -> list[asyncio.Future]:
        """Hand a collected batch to the engine loops (one per model: batches never mix models) without
        waiting for it, so collecting goes on."""
        event_loop = asyncio.get_running_loop()
        futures = [event_loop.create_future() for _ in arrivals]
        by_runtime: dict[int, list[int]] = {}
        for index, (_, runtime) in enumerate(arrivals):
            by_runtime.setdefault(id(runtime), []).append(index)
        for indices in by_runtime.values():
            runtime = arrivals[indices[0]][1]
            tasks = [arrivals[i][0] for i in indices]
            group_futures = [futures[i] for i in indices]

            def on_done(index: int, result, tasks=tasks, group_futures=group_futures) -> None:
                # Called on the engine's thread: results cross to this replica's event loop.
                event_loop.call_soon_threadsafe(self._deliver, tasks[index], group_futures[index], result)

            def on_progress(index: int, progress: Progress, tasks=tasks) -> None:
                queue = self._progress_queues.get(id(tasks[index]))
                if queue is not None:  # someone streams this task's progress
                    event_loop.call_soon_threadsafe(queue.put_nowait, progress)

            tickets = runtime.loop.submit_all(tasks, on_done, on_progress)
            for future, ticket in zip(group_futures, tickets):
                # The caller gave up (disconnect, deadline, cancel): the task leaves at the next tick.
                future.add_done_callback(lambda f, ticket=ticket: ticket.cancel() if f.cancelled() else None)
        return futures

    def _deliver(self, task: ImageTask, future: asyncio.Future, result: ImageResult | Exception) -> None:
        if isinstance(result, ImageResult):
            result.replica = self._replica
        if not future.done():
            future.set_result(result)
        try:
            self.metrics.record_result(task, result, time.time())
            self.metrics.record_counters(self._counters())
        except Exception:  # noqa: BLE001 - metrics must never cost a caller its image
            logger.exception("ImageGenerator: recording metrics failed")

    def _counters(self) -> dict:
        """The engine loops' counters, every model's (unloaded ones' included) summed."""
        snapshots = [runtime.counters.snapshot() for runtime in self._runtimes()]
        calls = Counter(self._retired_calls)
        totals = Counter(self._retired_counts)
        for snapshot in snapshots:
            calls.update({int(k): v for k, v in snapshot["model_calls_by_batch_size"].items()})
            totals.update({k: v for k, v in snapshot.items() if k in _SUMMED_COUNTS})
        rates = [s["image_steps_per_s"] for s in snapshots if s["image_steps_per_s"] is not None]
        return {
            "model_calls_by_batch_size": {str(k): v for k, v in sorted(calls.items())},
            **{key: round(totals[key], 3) if key == "busy_s" else totals[key] for key in _SUMMED_COUNTS},
            "image_steps_per_s": round(sum(rates), 2) if rates else None,
        }

    async def info(self) -> dict:
        # async: runs on the replica's event loop, like every other user of the metrics
        counters = self._counters()
        self.metrics.record_counters(counters)
        counters = dict(counters)
        runtimes = self._runtimes()
        shown = next((r for r in runtimes if r.id == self.default_model), runtimes[0] if runtimes else None)
        return {
            **(shown.model.describe() if shown else {"model": self.default_model}),
            "engine": shown.engine.kind if shown else None,
            "models": {
                "loaded": {r.id: r.describe() for r in runtimes},
                "max_per_replica": self._max_models,
                "loads": self.model_loads,
                "evictions": self.model_evictions,
                "load_s": round(self.model_load_s, 3),
            },
            "replica": self._replica,
            "node_id": self._node_id,
            "pid": os.getpid(),
            "memory_rss_bytes": _rss_bytes(),
            "uptime_s": round(time.time() - self._started, 1),
            "warmup_s": round(shown.warmup_s, 3) if shown else None,
            "batching": self._batching.model_dump(),
            # Images per model call: a UNet step (step engine) or a whole pipeline call (request engine).
            "model_calls_by_batch_size": counters.pop("model_calls_by_batch_size"),
            # Images since start: tests and operators synchronise on these rather than on time.
            "images": {
                "received": self.received,
                **counters,
                "waiting": sum(r.loop.waiting for r in runtimes),
                "running": sum(r.loop.active for r in runtimes),
            },
            # Per tenant (hashed ids), every model's loop together: images waiting and running now, admitted
            # since start. Fair admission is per replica: these are this replica's.
            "tenants": _tenant_counts([r.loop.tenants() for r in runtimes]),
        }

    def check_health(self) -> None:
        for runtime in self._runtimes():
            runtime.model.check_health()


_SUMMED_COUNTS = (
    "admitted",
    "admitted_mid_flight",
    "cancelled_before_start",
    "cancelled_in_flight",
    "succeeded",
    "failed",
    "busy_s",
    "refused",
)


class ModelRuntime:
    """One model loaded on this replica: its engine and the loop that batches its tasks."""

    def __init__(self, served: ServedModel, adapters: AdapterSettings, limits):
        # torch loads here, on the replica, not in the app builder
        from .pipeline.engines import EngineLoop, LoopCounters, make_engine
        from .pipeline.model import LoadedModel

        started = time.perf_counter()
        self.id = served.id
        self.on_unload = None  # set by the Generator: called once unloaded
        self._unloaded = True  # nothing to stop (or count) until the loop runs: a failed load leaves nothing
        self.model = LoadedModel.load(
            served.source, served.pipeline, served.defaults, adapters, served.refiner, served.controlnets
        )
        self.warmup_s = self.model.warmup()
        self.counters = LoopCounters()
        self.engine = make_engine(self.model, served.pipeline.engine, limits, self.counters)
        self.loop = EngineLoop(self.engine, self.model.prepare)
        self.load_s = time.perf_counter() - started
        self.loaded_at = time.time()
        self._unloaded = False

    @classmethod
    def load(cls, served: ServedModel, adapters: AdapterSettings, limits, beside: list[str]) -> ModelRuntime:
        """Load `served`; one that does not fit in memory (`beside` the models loaded) is a clear error, raised
        once: the request that asked for it gets 507, and the replica goes on serving what it holds."""
        try:
            return cls(served, adapters, limits)
        except Exception as exc:
            if _out_of_memory(exc):
                raise _does_not_fit(served.id, beside) from exc
            raise

    def describe(self) -> dict:
        return {
            "source": str(self.model.source),
            "engine": self.engine.kind,
            "load_s": round(self.load_s, 3),
            "loaded_at": round(self.loaded_at, 3),
            "images_succeeded": self.counters.succeeded,
            "loras": self.model.adapters.describe(),
            "controlnets": self.model.describe_controlnets(),
        }

    def unload(self) -> None:
        """Finish the tasks it holds, then stop its loop; its weights go with the last reference."""
        if self._unloaded:
            return
        self._unloaded = True
        self.loop.stop(drain=True, timeout_s=600)
        if self.on_unload is not None:
            self.on_unload(self)

    # Serve's multiplexing calls __del__ when it unloads a model (least recently used past the cap).
    __del__ = unload


def _tenant_counts(per_loop: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    totals: dict[str, Counter] = {}
    for loop in per_loop:
        for tenant, counts in loop.items():
            totals.setdefault(tenant, Counter({"waiting": 0, "running": 0, "admitted": 0})).update(counts)
    return {tenant: dict(counts) for tenant, counts in sorted(totals.items())}


def _plain_function(method):
    async def call(model_id: str):
        return await method(model_id)

    return call


def _out_of_memory(exc: Exception) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA, MPS), or torch's CPU allocator giving up."""
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"  # without importing torch here
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


def _does_not_fit(model_id: str, loaded: list[str]) -> InsufficientMemoryError:
    others = f" beside {', '.join(loaded)}" if loaded else ""
    return InsufficientMemoryError(
        f"model {model_id!r} does not fit in this replica's memory{others}; lower max_models_per_replica "
        "or give the Generator more memory",
        "model",
    )


def _keep_latest_preview(older: Progress, newer: Progress) -> Progress:
    return newer if newer.preview is not None else dataclasses.replace(newer, preview=older.preview)


def _with_arrival_time(task: ImageTask) -> ImageTask:
    """The task with the time its wait started: the ingress sets it; for other callers it starts here."""
    return task if task.submitted_at is not None else dataclasses.replace(task, submitted_at=time.time())


def _rss_bytes() -> int:
    """Resident memory of this replica process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
