"""ImageGenerator: the GPU deployment. One engine per replica, requests batched by @serve.batch."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import resource
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from .config import GENERATOR_MAX_ONGOING_REQUESTS, BatchingConfig
from .metrics import GeneratorMetrics
from .pipeline.jobs import GenerationJob, ImageResult
from .pipeline.loading import PipelineOptions
from .pipeline.params import GenerationDefaults

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


class PipelineQueue:
    """Jobs waiting for the pipeline; each run takes all that wait, up to `max_batch_size`.

    @serve.batch closes a batch when its wait ends, even while the pipeline is still busy with
    the previous one; under load it then hands over batches of k and max-k in turn. Here those
    batches wait together and the next run takes them at once, so a busy replica runs full batches.
    Runs never overlap, and a job whose caller gave up is dropped before it costs a pipeline call.
    """

    def __init__(self, run: Callable[[list[GenerationJob]], Awaitable[list]], max_batch_size: int):
        self._run = run
        self.max_batch_size = max_batch_size
        self._waiting: deque[tuple[GenerationJob, asyncio.Future]] = deque()
        self._draining: asyncio.Task | None = None
        self.cancelled_before_start = 0
        self.running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, jobs: list[GenerationJob]) -> list[asyncio.Future]:
        """One future per job, resolved with its result (an image or the exception that stopped it)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures))
        if self._draining is None or self._draining.done():
            # A context of its own: the runs serve many requests, not the one whose batch started them.
            self._draining = loop.create_task(self._drain(), context=contextvars.Context())
        return futures

    async def _drain(self) -> None:
        while self._waiting:
            taken = []
            while self._waiting and len(taken) < self.max_batch_size:
                job, future = self._waiting.popleft()
                if future.cancelled():
                    self.cancelled_before_start += 1
                else:
                    taken.append((job, future))
            if not taken:
                continue
            self.running = len(taken)
            try:
                results = await self._run([job for job, _ in taken])
            except Exception as exc:  # noqa: BLE001 - every caller of this run gets the failure
                results = [exc] * len(taken)
            finally:
                self.running = 0
            for (_, future), result in zip(taken, results):
                if not future.done():
                    future.set_result(result)


@serve.deployment(
    name="ImageGenerator",
    ray_actor_options={"num_cpus": 1},
    # Well above the batch: requests queue here, where the next pipeline run takes them all,
    # rather than in the callers' routers, whose retries back off while the pipeline idles.
    max_ongoing_requests=GENERATOR_MAX_ONGOING_REQUESTS,
    user_config=_DEFAULT_BATCHING.model_dump(),
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class ImageGenerator:
    def __init__(self, model: str, pipeline: PipelineOptions, defaults: GenerationDefaults):
        from .pipeline.engine import ImageEngine  # torch loads here, on the replica, not in the builder

        self.engine = ImageEngine.load(model, pipeline, defaults)
        self.warmup_s = self.engine.warmup()
        self.engine.calls_by_batch_size.clear()  # report traffic, not the warm-up
        # One worker thread: pipeline calls never overlap, and the event loop stays free
        # to collect the next batch while this one computes.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._batching = _DEFAULT_BATCHING
        self._queue = PipelineQueue(self._run_pipeline, self._batching.max_batch_size)
        self._started = time.time()
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self.metrics = GeneratorMetrics()
        self.outcomes: Counter[str] = Counter()  # jobs received, succeeded, failed
        logger.info("ImageGenerator ready: %s, warm-up %.2fs", self.engine.describe(), self.warmup_s)

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config or {})
        self._collect_batch.set_max_batch_size(batching.max_batch_size)
        self._collect_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._queue.max_batch_size = batching.max_batch_size
        self._batching = batching
        self.metrics.max_batch_size.set(batching.max_batch_size)

    async def generate(self, job: GenerationJob) -> ImageResult:
        if job.submitted_at is None:  # called by something other than the ingress: the wait starts here
            job = dataclasses.replace(job, submitted_at=time.time())
        self.outcomes["received"] += 1
        result = await (await self._collect_batch(job))
        self.outcomes["failed" if isinstance(result, Exception) else "succeeded"] += 1
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s
    )
    async def _collect_batch(self, jobs: list[GenerationJob]) -> list[asyncio.Future]:
        """Hand a collected batch to the pipeline queue without waiting for its run, so batching goes on."""
        return self._queue.submit(jobs)

    async def _run_pipeline(self, jobs: list[GenerationJob]) -> list[ImageResult | Exception]:
        loop = asyncio.get_running_loop()
        try:
            started, results, call_sizes = await loop.run_in_executor(self._worker, self._generate_on_worker, jobs)
        except Exception as exc:
            self.metrics.record_results([exc] * len(jobs), [])
            raise
        # Metrics are recorded here, on the event loop, not from the worker thread.
        self.metrics.record_queue_waits([started - job.submitted_at for job in jobs])
        self.metrics.record_results(results, call_sizes)
        for result in results:
            if isinstance(result, ImageResult):
                result.replica = self._replica
        return results

    def _generate_on_worker(self, jobs: list[GenerationJob]) -> tuple[float, list, list[int]]:
        """When the work started, the results, and the size of each pipeline call it took."""
        started = time.time()
        calls_before = Counter(self.engine.calls_by_batch_size)
        results = self.engine.generate(jobs)
        # Only this thread runs the engine, so the difference is exactly this batch's calls.
        call_sizes = list((self.engine.calls_by_batch_size - calls_before).elements())
        return started, results, call_sizes

    def info(self) -> dict:
        return {
            **self.engine.describe(),
            "replica": self._replica,
            "node_id": self._node_id,
            "pid": os.getpid(),
            "memory_rss_bytes": _rss_bytes(),
            "uptime_s": round(time.time() - self._started, 1),
            "warmup_s": round(self.warmup_s, 3),
            "batching": self._batching.model_dump(),
            "pipeline_calls_by_batch_size": {str(k): v for k, v in sorted(self.engine.calls_by_batch_size.items())},
            # Jobs since start: tests and operators synchronise on these rather than on time.
            "jobs": {
                **{key: self.outcomes[key] for key in ("received", "succeeded", "failed")},
                "cancelled_before_start": self._queue.cancelled_before_start,
                "waiting": self._queue.waiting,
                "running": self._queue.running,
            },
        }

    def check_health(self) -> None:
        self.engine.check_health()


def _rss_bytes() -> int:
    """Resident memory of this replica process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
