"""The ImageGenerator's Prometheus metrics, exported through Ray's metrics agent on every node.

Each metric's name and meaning is described where it is created (below) and listed in README.md
("Metrics to watch"), the one table of them. As scraped, Ray prefixes each name with `ray_`, adds `_total`
to counters and tags every series with the Serve `application`, `deployment` and `replica`.
Histograms' `_sum` is estimated by Ray 2.60 from bucket midpoints: take means from the counters,
quantiles from the buckets.
"""

from __future__ import annotations

from collections import Counter as Tally

from ray.serve.metrics import Counter, Gauge, Histogram

from .pipeline.engines import TaskCancelled
from .pipeline.errors import GenerationError
from .pipeline.tasks import ImageResult, ImageTask

BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUEUE_WAIT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
GENERATION_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


def error_kind(error: BaseException) -> str:
    """The `kind` tag of an error: the API's error code, so metrics and responses agree."""
    return error.code if isinstance(error, GenerationError) else "internal_error"


class GeneratorMetrics:
    """Created once per replica (Serve adds the replica's tags). Recorded on the replica's event loop."""

    def __init__(self) -> None:
        self.images = Counter("sd_images_generated", description="Images generated.")
        self.calls = Counter("sd_model_calls", description="Model calls: UNet steps or whole pipeline calls.")
        self.model_seconds = Counter("sd_model_seconds", description="Wall time spent in model calls, in seconds.")
        self.batch_size = Histogram(
            "sd_model_batch_size",
            description="Images per model call; the count is the number of calls.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.queue_wait = Histogram(
            "sd_queue_wait_seconds",
            description="Seconds from the ingress handing an image task on to its work starting.",
            boundaries=QUEUE_WAIT_BUCKETS_S,
        )
        self.generation = Histogram(
            "sd_generation_seconds",
            description="Seconds from an image's work starting to the image being ready.",
            boundaries=GENERATION_BUCKETS_S,
        )
        self.admitted_mid_flight = Counter(
            "sd_admitted_mid_flight", description="Images that joined the running batch while others were denoised."
        )
        self.cancelled = Counter(
            "sd_cancelled", description="Images whose caller gave up, by when.", tag_keys=("when",)
        )
        self.errors = Counter(
            "sd_generation_errors", description="Images that failed, by error kind.", tag_keys=("kind",)
        )
        self.max_batch_size = Gauge("sd_max_batch_size", description="The configured max_batch_size.")
        self.model_loads = Counter(
            "sd_model_loads", description="Models loaded on this replica (the default at start)."
        )
        self.model_evictions = Counter(
            "sd_model_evictions", description="Models unloaded to make room (least recently used past the cap)."
        )
        self.model_load_seconds = Histogram(
            "sd_model_load_seconds",
            description="Time to load a model and warm it up, in seconds.",
            boundaries=[0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300],
        )
        self._seen: dict = {"model_calls_by_batch_size": {}}

    def record_result(self, task: ImageTask, result: ImageResult | BaseException, now: float) -> None:
        """One image task's outcome; `now` is the wall-clock time it was delivered."""
        if isinstance(result, ImageResult):
            self.images.inc()
            self.generation.observe(result.generation_time_s)
            if task.submitted_at is not None:  # clocks of two nodes may differ by a little
                self.queue_wait.observe(max(now - result.generation_time_s - task.submitted_at, 0.0))
        elif not isinstance(result, TaskCancelled):
            self.errors.inc(tags={"kind": error_kind(result)})

    def record_counters(self, counters: dict) -> None:
        """The engine loop's counters (`LoopCounters.snapshot()`): what changed since the last call."""
        seen, self._seen = self._seen, counters
        calls = Tally({int(k): v for k, v in counters["model_calls_by_batch_size"].items()})
        calls.subtract({int(k): v for k, v in seen["model_calls_by_batch_size"].items()})
        for size, count in calls.items():
            for _ in range(count):
                self.batch_size.observe(size)
        _increase(self.calls, sum(calls.values()))
        _increase(self.model_seconds, counters["busy_s"] - seen.get("busy_s", 0.0))
        _increase(self.admitted_mid_flight, counters["admitted_mid_flight"] - seen.get("admitted_mid_flight", 0))
        for when in ("before_start", "in_flight"):
            key = f"cancelled_{when}"
            _increase(self.cancelled, counters[key] - seen.get(key, 0), tags={"when": when})


def _increase(counter: Counter, amount: float, **kwargs) -> None:
    if amount > 0:  # Ray counters refuse increments of 0
        counter.inc(amount, **kwargs)


def _is_cancellation(result: BaseException) -> bool:
    return type(result).__name__ == "_Cancelled"
