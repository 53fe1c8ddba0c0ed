"""ImageGenerator: the GPU deployment. One engine per replica, requests batched by @serve.batch."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from .config import BatchingConfig, RequestDefaults
from .pipeline.jobs import GeneratedImage, GenerationJob
from .pipeline.loading import PipelineOptions

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


@serve.deployment(
    name="ImageGenerator",
    ray_actor_options={"num_cpus": 1},
    # Twice the batch: one batch computes while the next one fills.
    max_ongoing_requests=2 * _DEFAULT_BATCHING.max_batch_size,
    user_config=_DEFAULT_BATCHING.model_dump(),
    health_check_period_s=2,
    health_check_timeout_s=30,
)
class ImageGenerator:
    def __init__(self, model: str, pipeline: PipelineOptions, defaults: RequestDefaults):
        from .pipeline.engine import ImageEngine  # torch loads here, on the replica, not in the builder

        self.engine = ImageEngine.load(model, pipeline, defaults.model_dump())
        self.warmup_s = self.engine.warmup()
        self.engine.calls_by_batch_size.clear()  # report traffic, not the warm-up
        # One worker thread: pipeline calls never overlap, and the event loop stays free
        # to collect the next batch while this one computes.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._batching = _DEFAULT_BATCHING
        self._started = time.time()
        self._replica = serve.get_replica_context().replica_id.unique_id
        logger.info("ImageGenerator ready: %s, warm-up %.2fs", self.engine.describe(), self.warmup_s)

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config or {})
        max_ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
        if batching.max_batch_size > max_ongoing:
            raise ValueError(
                f"ImageGenerator: user_config.max_batch_size ({batching.max_batch_size}) is larger than "
                f"max_ongoing_requests ({max_ongoing}), which would cap every batch at {max_ongoing}; "
                f"set max_ongoing_requests to at least {batching.max_batch_size} (2x is better)"
            )
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._batching = batching

    async def generate(self, job: GenerationJob) -> GeneratedImage:
        result = await self._run_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s
    )
    async def _run_batch(self, jobs: list[GenerationJob]) -> list[GeneratedImage | Exception]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._worker, self.engine.generate, jobs)
        for result in results:
            if isinstance(result, GeneratedImage):
                result.replica = self._replica
        return results

    def info(self) -> dict:
        return {
            **self.engine.describe(),
            "replica": self._replica,
            "pid": os.getpid(),
            "memory_rss_bytes": _rss_bytes(),
            "uptime_s": round(time.time() - self._started, 1),
            "warmup_s": round(self.warmup_s, 3),
            "batching": self._batching.model_dump(),
            "pipeline_calls_by_batch_size": {str(k): v for k, v in sorted(self.engine.calls_by_batch_size.items())},
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
