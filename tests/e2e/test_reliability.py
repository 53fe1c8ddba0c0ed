"""Overload, time-outs, disconnects and health against real Serve with tight limits.

The Generator takes 16 requests at once (two batches of 8) and queues 8 more;
the ingress holds 32 generation requests. Slow requests (many steps) keep it busy.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from harness import deployment, load_config
from helpers import burst

# About 3 s per batch of 8 on one CPU thread: long enough to queue behind, short enough for CI.
SLOW = {"prompt": "slow", "num_inference_steps": 50, "width": 128, "height": 128}


@pytest.fixture(scope="module")
def tight_server(serve_cluster) -> str:
    config = load_config()
    config["applications"][0]["args"]["limits"].update(max_concurrent_requests=32, retry_after_s=3)
    generator = deployment(config, "ImageGenerator")
    generator.update(max_ongoing_requests=16, max_queued_requests=8)
    # The first batch waits to fill, so no slot frees while a burst arrives (the demo itself does not wait).
    generator["user_config"] = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    serve_cluster.deploy(config)
    yield serve_cluster.url
    serve_cluster.deploy(load_config())


@pytest.fixture
def http(tight_server):
    with httpx.Client(base_url=tight_server, timeout=120) as client:
        yield client


def images_computed(http: httpx.Client) -> int:
    calls = http.get("/info").json()["generator"]["pipeline_calls_by_batch_size"]
    return sum(int(size) * count for size, count in calls.items())


def test_overload_at_four_times_capacity_sheds_503_with_retry_after(tight_server, http):
    capacity = 16 + 8  # generator ongoing + queued
    responses = burst(tight_server, [("/generate", {**SLOW, "seed": i}) for i in range(4 * capacity)], timeout=300)
    statuses = Counter(r.status_code for r in responses)
    print(f"\noverload at 4x capacity ({4 * capacity} requests): {dict(statuses)}")
    assert set(statuses) <= {200, 503}, statuses
    # Accepted requests complete; the excess is shed at once instead of queueing without bound.
    assert statuses[200] >= 8 and statuses[503] >= 2 * capacity
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"].isdigit() for r in shed)
    assert all(r.json()["error"]["code"] == "overloaded" and r.json()["request_id"] for r in shed)
    # Both bounds act: the ingress's own in-flight limit and the Generator's queue limit.
    assert any("in flight" in r.json()["error"]["message"] for r in shed)
    assert any("backpressure" in r.json()["error"]["message"] for r in shed)


def _occupy(url: str, count: int):
    """Start `count` slow requests in the background; returns (pool, futures)."""
    pool = ThreadPoolExecutor(count)
    client = httpx.Client(base_url=url, timeout=120)
    futures = []
    for i in range(count):
        futures.append(pool.submit(client.post, "/generate", json={**SLOW, "seed": i}))
        time.sleep(0.02)  # a steady stream, not a thundering herd: the Generator's queue limit stays out of it
    time.sleep(0.5)  # let them reach the Generator
    return pool, futures


def test_deadline_gives_504_and_drops_queued_work(tight_server, http):
    before = images_computed(http)
    pool, busy = _occupy(tight_server, 16)
    with httpx.Client(base_url=tight_server, timeout=60) as quick:
        timed = quick.post("/generate", json={"prompt": "late"}, headers={"X-Request-Timeout": "0.5"})
    assert timed.status_code == 504 and timed.json()["error"]["code"] == "timeout"
    assert "0.5s" in timed.json()["error"]["message"]
    assert [f.result().status_code for f in busy] == [200] * 16
    pool.shutdown()
    time.sleep(1)
    assert images_computed(http) - before == 16  # the timed-out request was dropped before it ran


def test_a_client_that_disconnects_leaves_no_work_behind(tight_server, http):
    before = images_computed(http)
    pool, busy = _occupy(tight_server, 16)
    with httpx.Client(base_url=tight_server, timeout=0.3) as impatient:
        for i in range(4):
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/generate", json={"prompt": "gone", "seed": i})
    assert [f.result().status_code for f in busy] == [200] * 16
    pool.shutdown()
    time.sleep(1)
    assert images_computed(http) - before == 16  # the abandoned requests were cancelled before they started


def test_readyz_and_info_report_replicas_uptime_and_outcomes(http):
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["generator"]["running_replicas"] == 1
    info = http.get("/info").json()
    assert info["generator_deployment"]["running_replicas"] == 1
    assert info["uptime_s"] >= 0 and info["generator"]["uptime_s"] >= 0
    assert info["generator"]["memory_rss_bytes"] > 0 and info["generator"]["pid"] > 0
    outcomes = info["responses_by_status"]
    assert outcomes.get("200", 0) > 0 and outcomes.get("503", 0) > 0 and outcomes.get("504", 0) > 0
