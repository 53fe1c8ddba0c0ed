"""Overload, deadlines and disconnects against real Serve with tight limits.

The Generator holds 16 requests (max_ongoing_requests) and Serve queues 8 more in front of it
(max_queued_requests); it denoises at most 8 images at once (max_active_requests), so a 9th
request reaches the replica and waits there. The ingress holds 32 generation requests.
Slow requests (many steps) keep it busy. Each test synchronises on the Generator's own image
counters (/info `generator.images`), never on time passing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from harness import deployment, generator_jobs, open_request, wait_until
from helpers import burst

# About 3 s per batch of 8 on one CPU thread: long enough to queue behind, short enough for CI.
SLOW = {"prompt": "slow", "num_inference_steps": 50, "width": 128, "height": 128}
ACTIVE = 8  # images denoised at once
# Three times longer: no image finishes (freeing a Generator slot) while a burst of 96 requests is still
# arriving through the proxy and the ingress, which takes seconds on two busy cores.
LONG = {**SLOW, "num_inference_steps": 150}


def tight(config: dict) -> None:
    config["applications"][0]["args"]["limits"].update(max_concurrent_requests=32, retry_after_s=3, max_steps=150)
    generator = deployment(config, "ImageGenerator")
    generator.update(max_ongoing_requests=16, max_queued_requests=8)
    # The first batch waits to fill, so no slot frees while a burst arrives (the demo itself does not wait).
    generator["user_config"] = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_active_requests": ACTIVE}


@pytest.fixture(scope="module")
def tight_server(deployed_variant) -> str:
    return deployed_variant(tight)


@pytest.fixture
def http(tight_server):
    with httpx.Client(base_url=tight_server, timeout=120) as client:
        # Each test starts from an idle Generator, whatever ran before it.
        wait_until(lambda: idle(generator_jobs(client)), timeout_s=120, what="the Generator is idle")
        yield client


def idle(jobs: dict) -> bool:
    return jobs["waiting"] == 0 and jobs["running"] == 0


def test_overload_at_four_times_capacity_sheds_503_with_retry_after(tight_server, http):
    capacity = 16 + 8  # generator ongoing + queued
    # One round of slow images first: the Generator admits work by its measured rate, and a rate
    # measured on this size (not on a fresh replica's first, slower, model calls) admits what fits.
    burst(tight_server, [("/generate", {**SLOW, "seed": 1000 + i}) for i in range(ACTIVE)], timeout=300)
    before = generator_jobs(http)
    with HealthProbes(tight_server) as probes:
        responses = burst(tight_server, [("/generate", {**LONG, "seed": i}) for i in range(4 * capacity)], timeout=300)
    statuses = Counter(r.status_code for r in responses)
    shed_by = Counter(r.json()["error"]["message"].split(":")[-1][:60] for r in responses if r.status_code == 503)
    print(f"\noverload at 4x capacity ({4 * capacity} requests): {dict(statuses)}; shed: {dict(shed_by)}")
    print(f"health during the burst: {len(probes.statuses)} probes, slowest {probes.slowest_s:.2f} s")
    # Only answers and refusals: no 504 (an accepted request past its deadline), no Serve 408, no 500.
    assert set(statuses) <= {200, 503}, statuses
    # The probes kept answering, and said the server is up and ready, while it shed the flood.
    assert probes.statuses and set(probes.statuses) == {200}, Counter(probes.statuses)
    # Accepted requests complete (at least one round of the Generator's 8); the excess is shed at once
    # instead of queueing without bound.
    assert statuses[200] >= ACTIVE and statuses[503] >= 2 * capacity
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"].isdigit() for r in shed)
    assert all(r.json()["error"]["code"] == "overloaded" and r.json()["request_id"] for r in shed)
    messages = [r.json()["error"]["message"] for r in shed]
    # Both bounds act: the ingress's own in-flight limit, and the Generator's (Serve's queue limit in
    # front of it, or its refusal of work it could not finish before the request's deadline).
    assert any("in flight" in m for m in messages)
    assert any("backpressure" in m or "after its deadline" in m for m in messages)
    # Shed requests cost no images: the Generator made exactly the answered ones.
    after = wait_until(lambda: idle(jobs := generator_jobs(http)) and jobs, timeout_s=60, what="the burst is done")
    assert after["succeeded"] - before["succeeded"] == statuses[200]


class HealthProbes:
    """/healthz and /readyz in turn, ten times a second from a thread of their own, while the block runs."""

    def __init__(self, url: str):
        self.url = url
        self.statuses: list[int] = []
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe, daemon=True)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                for path in ("/healthz", "/readyz"):
                    started = time.perf_counter()
                    self.statuses.append(client.get(path).status_code)
                    self.slowest_s = max(self.slowest_s, time.perf_counter() - started)
                self._stop.wait(0.1)

    def __enter__(self) -> HealthProbes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _occupy(http: httpx.Client, count: int) -> tuple[ThreadPoolExecutor, list[Future]]:
    """Start `count` slow requests in the background and return once the Generator is denoising them all.
    Each is sent once the Generator has received the one before: a steady stream, not a thundering herd,
    so the queue limit in front of the Generator stays out of it. (Slow, not long: the Generator refuses
    at once what it could not finish before the deadline, and 8 long images may not fit on a busy machine.)"""
    received = generator_jobs(http)["received"]
    pool = ThreadPoolExecutor(count)
    client = httpx.Client(base_url=str(http.base_url), timeout=120)
    futures: list[Future] = []

    def answered_early() -> None:
        for future in futures:
            if future.done():
                raise AssertionError(f"an occupying request was answered already: {future.result().text}")

    def holds(sent: int) -> bool:
        answered_early()
        return generator_jobs(http)["received"] - received >= sent

    for i in range(count):
        futures.append(pool.submit(client.post, "/generate", json={**SLOW, "seed": i}))
        wait_until(lambda sent=i + 1: holds(sent), 60, f"the Generator received occupying request {i + 1}", 0.01)
    wait_until(
        lambda: answered_early() or generator_jobs(http)["running"] >= count,
        timeout_s=60,
        what=f"the Generator denoises the {count} occupying requests",
    )
    return pool, futures


def _wait_until_dropped(http: httpx.Client, before: dict, count: int) -> dict:
    """The Generator's counters once `count` more jobs were dropped than `before` says."""

    def cancelled(jobs: dict) -> int:
        # Dropped while waiting; the step engine also drops jobs mid-flight, at their next step.
        return jobs["cancelled_before_start"] + jobs.get("cancelled_in_flight", 0)

    def dropped() -> dict | None:
        jobs = generator_jobs(http)
        return jobs if cancelled(jobs) - cancelled(before) >= count else None

    return wait_until(dropped, timeout_s=60, what=f"the Generator dropped {count} abandoned job(s)")


def test_work_that_cannot_meet_its_deadline_is_refused_at_once_and_never_runs(tight_server, http):
    """Behind 8 slow images, a request with half a second left is answered 503 at admission, not 504 later:
    by the ingress (its expected wait, from answers per second, once it has seen enough answers) or by
    the Generator (its backlog of denoising steps and its measured rate), whichever knows first."""
    before = generator_jobs(http)
    pool, busy = _occupy(http, ACTIVE)
    wait_until(
        lambda: generator_jobs(http)["image_steps_per_s"], timeout_s=60, what="the Generator has measured its rate"
    )
    with httpx.Client(base_url=tight_server, timeout=60) as quick:
        late = quick.post("/generate", json={"prompt": "late"}, headers={"X-Request-Timeout": "0.5"})
    assert late.status_code == 503, late.text
    message = late.json()["error"]["message"]
    assert late.json()["error"]["code"] == "overloaded"
    assert "after its deadline" in message or "too close to this request's 0.5s deadline" in message, message
    assert late.headers["retry-after"].isdigit() and int(late.headers["retry-after"]) >= 1
    assert [f.result().status_code for f in busy] == [200] * ACTIVE
    pool.shutdown()
    after = generator_jobs(http)
    assert after["refused"] - before["refused"] == (1 if "after its deadline" in message else 0)
    assert after["succeeded"] - before["succeeded"] == ACTIVE  # only the occupying requests made images
    assert after["cancelled_before_start"] == before["cancelled_before_start"]  # it never waited to be dropped


def test_a_client_that_disconnects_leaves_no_work_behind(tight_server, http):
    before = generator_jobs(http)
    pool, busy = _occupy(http, ACTIVE)
    # Four callers whose images wait behind the slow ones (ACTIVE are denoised at once) hang up.
    callers = [open_request(tight_server, "/generate", {"prompt": "gone", "seed": i}) for i in range(4)]
    wait_until(lambda: generator_jobs(http)["waiting"] >= 4, 60, "the four callers' images wait in the Generator")
    for caller in callers:
        caller.close()
    # Dropped while they waited (the slow ones have most of their steps to go): never denoised.
    after = _wait_until_dropped(http, before, 4)
    assert after["cancelled_before_start"] - before["cancelled_before_start"] == 4
    assert after.get("cancelled_in_flight", 0) == before.get("cancelled_in_flight", 0)
    assert [f.result().status_code for f in busy] == [200] * ACTIVE
    pool.shutdown()
    after = generator_jobs(http)
    assert after["succeeded"] - before["succeeded"] == ACTIVE  # only the occupying requests made images
