"""The ImageGenerator's Prometheus metrics, exported through Ray's metrics agent on every node.

As scraped, Ray prefixes each name with `ray_`, adds `_total` to counters and
tags every series with the Serve `application`, `deployment` and `replica`:

  ray_sd_images_generated_total            images made (successful jobs)
  ray_sd_pipeline_calls_total              pipeline calls that made them: images / calls = mean batch size
  ray_sd_pipeline_seconds_total            wall time inside those calls: its rate is the pipeline's busy fraction
  ray_sd_pipeline_batch_size_bucket        images per pipeline call (histogram)
  ray_sd_queue_wait_seconds_bucket         from the ingress handing a job on to its batch starting work (histogram)
  ray_sd_generation_seconds_per_image_bucket  a call's wall time divided by its images, per image (histogram)
  ray_sd_generation_errors_total{kind}     failed jobs by error code (invalid_request, insufficient_memory, ...)
  ray_sd_max_batch_size                    the configured max_batch_size, to compare the batch sizes with

Histograms also have `_count` (exact) and `_sum`, which Ray 2.60 estimates from
bucket midpoints: take means from the counters above, quantiles from the buckets.
Serve's own metrics (HTTP latency and errors, replicas, queued requests) come on
the same endpoint; deploy/grafana/stable-diffusion.json charts both.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from .pipeline.errors import GenerationError
from .pipeline.jobs import ImageResult

BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUEUE_WAIT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
PER_IMAGE_BUCKETS_S = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


def error_kind(error: BaseException) -> str:
    """The `kind` tag of an error: the API's error code, so metrics and responses agree."""
    return error.code if isinstance(error, GenerationError) else "internal_error"


class GeneratorMetrics:
    """Created once per replica (Serve adds the replica's tags)."""

    def __init__(self) -> None:
        self.images = Counter("sd_images_generated", description="Images generated (successful jobs).")
        self.calls = Counter("sd_pipeline_calls", description="Successful pipeline calls.")
        self.pipeline_seconds = Counter(
            "sd_pipeline_seconds", description="Wall time spent in successful pipeline calls, in seconds."
        )
        self.batch_size = Histogram(
            "sd_pipeline_batch_size",
            description="Images per pipeline call; the count is the number of calls.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.queue_wait = Histogram(
            "sd_queue_wait_seconds",
            description="Seconds from the ingress submitting a job to the start of the batch that runs it.",
            boundaries=QUEUE_WAIT_BUCKETS_S,
        )
        self.seconds_per_image = Histogram(
            "sd_generation_seconds_per_image",
            description="Pipeline-call wall time divided by the images in that call, one observation per image.",
            boundaries=PER_IMAGE_BUCKETS_S,
        )
        self.errors = Counter(
            "sd_generation_errors", description="Jobs that failed, by error kind.", tag_keys=("kind",)
        )
        self.max_batch_size = Gauge("sd_max_batch_size", description="The configured max_batch_size.")

    def record_queue_waits(self, waits_s: list[float]) -> None:
        for wait in waits_s:
            self.queue_wait.observe(max(wait, 0.0))  # clocks of two nodes may differ by a little

    def record_results(self, results: list[ImageResult | BaseException], call_sizes: list[int]) -> None:
        """One batch's outcome: a result per job, and the size of every pipeline call it took."""
        for size in call_sizes:
            self.batch_size.observe(size)
        if call_sizes:
            self.calls.inc(len(call_sizes))
        images = [r for r in results if isinstance(r, ImageResult)]
        # Each image carries its call's time and size: summing time/size over images sums the calls' times.
        per_image = [image.generation_time_s / image.batch_size for image in images]
        if images:
            self.images.inc(len(images))
        if sum(per_image) > 0:  # Ray counters refuse increments of 0
            self.pipeline_seconds.inc(sum(per_image))
        for seconds in per_image:
            self.seconds_per_image.observe(seconds)
        for result in results:
            if isinstance(result, BaseException):
                self.errors.inc(tags={"kind": error_kind(result)})
