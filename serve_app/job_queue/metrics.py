"""The job store's Prometheus metrics: latency and errors of every store operation, from the replicas that use
the store (the Ingress reads records and images; the JobManager writes them and sweeps). Listed in README.md's
"Metrics to watch"; as scraped, Ray prefixes `ray_` and adds `_total` to counters and the Serve tags.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

STORE_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class StoreMetrics:
    """An observer for `JobStore(url, observe=StoreMetrics(...))`; created in a Serve replica."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.seconds = Histogram(
            "sd_store_seconds",
            description="Seconds per job store operation (put_record, get_record, list, put_image, get_image, "
            "delete, usage, probe, ...), by operation and backend.",
            boundaries=STORE_BUCKETS_S,
            tag_keys=("op", "backend"),
        )
        self.errors = Counter(
            "sd_store_errors",
            description="Job store operations that failed (a missing file is no error), by operation and error type.",
            tag_keys=("op", "backend", "error"),
        )

    def __call__(self, op: str, seconds: float, error: BaseException | None) -> None:
        tags = {"op": op, "backend": self.backend}
        self.seconds.observe(seconds, tags=tags)
        if error is not None:
            self.errors.inc(tags={**tags, "error": type(error).__name__})
