"""The Generator's custom metrics on Ray's Prometheus endpoint, after real HTTP traffic.

The module runs on a fresh deploy (harness.with_every_family, which it deploys first: tests/conftest.py), so its
replica starts from zero and every scraped value can be compared with an exact expectation (the replica's /info,
the response headers, the number of requests sent).
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from harness import APP_NAME, REPO, wait_until, with_every_family
from prometheus_client.parser import text_string_to_metric_families

from serve_app.metrics import BATCH_SIZE_BUCKETS, GENERATION_BUCKETS_S, QUEUE_WAIT_BUCKETS_S

APP = APP_NAME
DASHBOARD = REPO / "deploy" / "grafana" / "stable-diffusion.json"


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    """Every sample on the endpoint: name -> [(labels, value)]."""
    samples = defaultdict(list)
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    return sum(v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items())


@pytest.fixture(scope="module")
def metrics_app(serve_cluster, deployed_variant):
    deployed_variant(with_every_family)
    return serve_cluster


@pytest.fixture(scope="module")
def traffic(metrics_app):
    """A concurrent burst and a few single requests through HTTP, and one job the generator rejects;
    then the replica's own account (/info), read after all of it."""
    from ray import serve

    from serve_app.pipeline.errors import InvalidTaskError
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    def post(i: int) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        # 20 steps: the burst's images overlap in the step loop however far apart the ingress hands them on.
        response = http.post("/generate", json={"prompt": f"metrics {i}", "seed": i, "num_inference_steps": 20})
        return response, time.perf_counter() - started

    with httpx.Client(base_url=metrics_app.url, timeout=120) as http:
        with ThreadPoolExecutor(16) as pool:
            sent = list(pool.map(post, range(16)))
        sent += [post(100 + i) for i in range(3)]
        # An HTTP error for Serve's error counter (the dashboard charts it); it never reaches the generator.
        assert http.post("/generate", json={"prompt": "x", "width": 65}).status_code == 422
        assert all(response.status_code == 200 for response, _ in sent)

        generator = serve.get_deployment_handle("ImageGenerator", app_name=APP)
        with pytest.raises(InvalidTaskError):
            # Valid alone, but 10% of 4 steps leaves no denoising step for this model: the engine refuses it.
            params = ImageParams(prompt="x", seed=1, num_inference_steps=4, strength=0.1)
            generator.generate.remote(ImageTask(params, init_image=np.zeros((64, 64, 3), np.uint8))).result()
        info = http.get("/info").json()["generator"]  # also brings the replica's model-call metrics up to date
    # This replica's series: the endpoint may still show those of the application's earlier replicas.
    mine = {"application": APP, "deployment": "ImageGenerator", "replica": info["replica"]}
    return {"responses": [r for r, _ in sent], "latencies": [s for _, s in sent], "info": info, "mine": mine}


@pytest.fixture(scope="module")
def scraped(metrics_app, traffic):
    """The endpoint once it shows all the traffic (workers report every second)."""
    jobs = traffic["info"]["images"]
    calls = sum(traffic["info"]["model_calls_by_batch_size"].values())

    def complete():
        samples = scrape(metrics_app.metrics_url)
        shown = (
            value(samples, "ray_sd_images_generated_total", **traffic["mine"]),
            value(samples, "ray_sd_generation_errors_total", **traffic["mine"]),
            value(samples, "ray_sd_model_calls_total", **traffic["mine"]),
            # The proxy reports Serve's own counters from another process: the 422 sent above.
            value(samples, "ray_serve_num_http_error_requests_total", application=APP) >= 1,
        )
        return samples if shown == (jobs["succeeded"], jobs["failed"], calls, True) else None

    return wait_until(
        complete, timeout_s=60, what="the metrics endpoint shows the replica's own counts", interval_s=0.5
    )


def test_images_and_batch_sizes_match_the_replicas_own_count(traffic, scraped):
    info = traffic["info"]
    mine = traffic["mine"]
    calls = {int(size): count for size, count in info["model_calls_by_batch_size"].items()}
    print(f"\nmodel calls by batch size: {calls}")
    assert max(calls) > 1, "the burst of 16 should have been batched"
    assert info["images"]["succeeded"] == len(traffic["responses"]) and info["images"]["failed"] == 1

    assert value(scraped, "ray_sd_images_generated_total", **mine) == len(traffic["responses"])
    assert value(scraped, "ray_sd_model_calls_total", **mine) == sum(calls.values())
    # Counts and buckets are exact; Ray exports a histogram's _sum from bucket midpoints, so it is not compared.
    assert value(scraped, "ray_sd_model_batch_size_count", **mine) == sum(calls.values())
    for bound in BATCH_SIZE_BUCKETS:
        expected = sum(n for size, n in calls.items() if size <= bound)
        assert value(scraped, "ray_sd_model_batch_size_bucket", le=str(float(bound)), **mine) == expected
    assert value(scraped, "ray_sd_max_batch_size", **mine) == 8
    assert value(scraped, "ray_sd_model_seconds_total", **mine) == pytest.approx(info["images"]["busy_s"], abs=2e-3)


def test_generation_time_per_image_matches_the_response_headers(traffic, scraped):
    """Each response reports its image's generation time; the histogram holds exactly those."""
    times = [float(r.headers["x-generation-time-s"]) for r in traffic["responses"]]
    rounding = 1e-4  # headers carry 4 decimals, the metrics the exact times
    assert value(scraped, "ray_sd_generation_seconds_count", **traffic["mine"]) == len(times)
    for bound in GENERATION_BUCKETS_S:
        in_bucket = value(scraped, "ray_sd_generation_seconds_bucket", **traffic["mine"], le=str(float(bound)))
        assert sum(t <= bound - rounding for t in times) <= in_bucket <= sum(t <= bound + rounding for t in times)


def test_queue_wait_is_recorded_per_image_and_bounded_by_the_latency(traffic, scraped):
    images = len(traffic["responses"])
    assert value(scraped, "ray_sd_queue_wait_seconds_count", **traffic["mine"]) == images
    # No image waited longer than the slowest request took from end to end.
    slowest = max(traffic["latencies"])
    bound = min(b for b in QUEUE_WAIT_BUCKETS_S if b >= slowest)
    assert value(scraped, "ray_sd_queue_wait_seconds_bucket", **traffic["mine"], le=str(float(bound))) == images
    waits = {
        labels["le"]: v
        for labels, v in scraped["ray_sd_queue_wait_seconds_bucket"]
        if traffic["mine"].items() <= labels.items()
    }
    print(f"\nqueue waits, cumulative by bucket (s): {waits}; slowest request {slowest:.3f} s")


def test_errors_are_counted_by_kind_and_nothing_was_cancelled(traffic, scraped):
    assert value(scraped, "ray_sd_generation_errors_total", **traffic["mine"], kind="invalid_request") == 1
    assert value(scraped, "ray_sd_generation_errors_total", **traffic["mine"]) == 1
    assert value(scraped, "ray_sd_cancelled_total", **traffic["mine"]) == 0
    admitted_mid_flight = traffic["info"]["images"]["admitted_mid_flight"]
    assert value(scraped, "ray_sd_admitted_mid_flight_total", **traffic["mine"]) == admitted_mid_flight


def test_every_metric_the_grafana_dashboard_charts_is_on_the_endpoint(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    charted = {name for expr in exprs for name in re.findall(r"\bray_[a-z_]+\b", expr)}
    assert {"ray_sd_images_generated_total", "ray_sd_queue_wait_seconds_bucket"} <= charted
    # Every panel selects by application, so each metric must carry this application's label.
    missing = sorted(
        name for name in charted if not any(labels.get("application") == APP for labels, _ in scraped[name])
    )
    assert not missing, f"the dashboard charts metrics the endpoint does not have for {APP}: {missing}"
