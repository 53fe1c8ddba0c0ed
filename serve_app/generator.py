"""ImageGenerator: the GPU deployment. One engine per replica, fed through @serve.batch.

@serve.batch is the admission window: what arrives together is handed to the engine loop
together, and joins the running batch at its next tick (the step engine) or the next
pipeline call (the request engine) while the current one computes. The loop runs on its own
thread (pipeline layer, `pipeline/batching.py`); results come back to this replica's event
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
from collections.abc import AsyncIterator

import ray
from ray import serve

from .config import GENERATOR_MAX_ONGOING_REQUESTS, BatchingConfig
from .metrics import GeneratorMetrics
from .pipeline.batching import Progress
from .pipeline.jobs import GenerationJob, ImageResult
from .pipeline.loading import PipelineOptions
from .pipeline.params import GenerationDefaults

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


@serve.deployment(
    name="ImageGenerator",
    ray_actor_options={"num_cpus": 1},
    # Well above the batch: requests queue here, where the engine loop takes them at its next tick,
    # rather than in the callers' routers, whose retries back off while the model idles.
    max_ongoing_requests=GENERATOR_MAX_ONGOING_REQUESTS,
    user_config=_DEFAULT_BATCHING.model_dump(),
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class ImageGenerator:
    def __init__(self, model: str, pipeline: PipelineOptions, defaults: GenerationDefaults):
        # torch loads here, on the replica, not in the app builder
        from .pipeline.batching import EngineLoop, LoopCounters, make_batcher
        from .pipeline.engine import ImageEngine

        self.engine = ImageEngine.load(model, pipeline, defaults)
        self.warmup_s = self.engine.warmup()
        self._batching = _DEFAULT_BATCHING
        self.limits = self._batching.loop_limits()
        self.counters = LoopCounters()
        self.batcher = make_batcher(self.engine, pipeline.engine, self.limits, self.counters)
        self.loop = EngineLoop(self.batcher, self.engine.prepare)
        self._started = time.time()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self.metrics = GeneratorMetrics()
        self.received = 0
        self._progress_queues: dict[int, asyncio.Queue] = {}  # by id() of a job being streamed
        logger.info(
            "ImageGenerator ready: %s, engine %s, warm-up %.2fs",
            self.engine.describe(),
            self.batcher.engine_name,
            self.warmup_s,
        )

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config or {})
        self._collect_batch.set_max_batch_size(batching.max_batch_size)
        self._collect_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        # The loop reads these at every tick.
        new = batching.loop_limits()
        self.limits.max_batch_size = new.max_batch_size
        self.limits.max_active_requests = new.max_active_requests
        self.limits.admission = new.admission
        self._batching = batching
        self.metrics.max_batch_size.set(batching.max_batch_size)

    async def generate(self, job: GenerationJob) -> ImageResult:
        self.received += 1
        result = await (await self._collect_batch(_stamped(job)))
        if isinstance(result, Exception):
            raise result
        return result

    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[dict | ImageResult]:
        """The job's progress as it runs, `{"step", "total_steps"}` (the latest, when several steps
        passed since the last one was read; with `"preview"`, a base64 PNG, every `job.preview_every`
        steps), then its `ImageResult`; errors are raised. Closing the
        stream (the caller gave up) cancels the job: it leaves the engine at its next step."""
        job = _stamped(job)
        progress: asyncio.Queue[Progress] = asyncio.Queue()
        self._progress_queues[id(job)] = progress
        outcome = asyncio.ensure_future(self.generate(job))
        try:
            while not outcome.done():
                waiting = asyncio.ensure_future(progress.get())
                await asyncio.wait([outcome, waiting], return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    continue
                latest = waiting.result()
                preview = latest.preview
                while not progress.empty():
                    latest = progress.get_nowait()
                    preview = latest.preview or preview
                update = {"step": latest.step, "total_steps": latest.total_steps}
                if preview is not None:
                    update["preview"] = base64.b64encode(preview).decode("ascii")
                yield update
            yield outcome.result()
        finally:
            self._progress_queues.pop(id(job), None)
            outcome.cancel()

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s
    )
    async def _collect_batch(self, jobs: list[GenerationJob]) -> list[asyncio.Future]:
        """Hand a collected batch to the engine loop without waiting for it, so collecting goes on."""
        event_loop = asyncio.get_running_loop()
        futures = [event_loop.create_future() for _ in jobs]

        def on_done(index: int, result: ImageResult | Exception) -> None:
            # Called on the engine's thread: results cross to this replica's event loop.
            event_loop.call_soon_threadsafe(self._deliver, jobs[index], futures[index], result)

        def on_progress(index: int, progress: Progress) -> None:
            queue = self._progress_queues.get(id(jobs[index]))
            if queue is not None:  # someone streams this job's progress
                event_loop.call_soon_threadsafe(queue.put_nowait, progress)

        tickets = self.loop.submit_all(jobs, on_done, on_progress)
        for future, ticket in zip(futures, tickets):
            # The caller gave up (disconnect, deadline, cancel): the job leaves at the next tick.
            future.add_done_callback(lambda f, ticket=ticket: ticket.cancel() if f.cancelled() else None)
        return futures

    def _deliver(self, job: GenerationJob, future: asyncio.Future, result: ImageResult | Exception) -> None:
        if isinstance(result, ImageResult):
            result.replica = self._replica
        if not future.done():
            future.set_result(result)
        try:
            self.metrics.record_result(job, result, time.time())
            self.metrics.record_counters(self.counters.snapshot())
        except Exception:  # noqa: BLE001 - metrics must never cost a caller its image
            logger.exception("ImageGenerator: recording metrics failed")

    async def info(self) -> dict:
        # async: runs on the replica's event loop, like every other user of the metrics
        counters = self.counters.snapshot()
        self.metrics.record_counters(counters)
        counters = dict(counters)
        return {
            **self.engine.describe(),
            "engine": self.batcher.engine_name,
            "replica": self._replica,
            "node_id": self._node_id,
            "pid": os.getpid(),
            "memory_rss_bytes": _rss_bytes(),
            "uptime_s": round(time.time() - self._started, 1),
            "warmup_s": round(self.warmup_s, 3),
            "batching": self._batching.model_dump(),
            # Images per model call: a UNet step (step engine) or a whole pipeline call (request engine).
            "model_calls_by_batch_size": counters.pop("model_calls_by_batch_size"),
            # Jobs since start: tests and operators synchronise on these rather than on time.
            "jobs": {"received": self.received, **counters, "waiting": self.loop.waiting, "running": self.loop.active},
        }

    def check_health(self) -> None:
        self.engine.check_health()


def _stamped(job: GenerationJob) -> GenerationJob:
    """The job with the time its wait started: the ingress sets it; for other callers it starts here."""
    return job if job.submitted_at is not None else dataclasses.replace(job, submitted_at=time.time())


def _rss_bytes() -> int:
    """Resident memory of this replica process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
