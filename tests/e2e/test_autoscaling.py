"""Autoscaling under real load: 1 -> 2 generator replicas and back (serving two models, routed by Serve's
model multiplexing), and a cold start from zero.

Replica counts come from Serve's status API (serve.status()), the same source as
`serve status`. Times are measured and reported (see the "measurements" summary
at the end of the run), never asserted: this machine's speed varies.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from harness import APP_NAME, TWO_TINY_MODELS, deployment, serve_models

GENERATOR = "ImageGenerator"


def autoscaling(**autoscaling) -> Callable[[dict], None]:
    """An edit of the demo config: an autoscaling generator that batches 2 and aims at 2 requests per replica.

    target_ongoing_requests equals max_batch_size, as in the production configs, only smaller,
    so a handful of loopback clients is enough load.
    """
    return lambda config: _autoscaling(config, autoscaling)


def _autoscaling(config: dict, autoscaling: dict) -> None:
    generator = deployment(config, GENERATOR)
    generator.pop("num_replicas")
    generator["max_ongoing_requests"] = 4
    generator["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.02}
    generator["autoscaling_config"] = {
        "target_ongoing_requests": 2,
        # Handles and replicas push load to the controller every metrics_interval_s (10 s by default;
        # deprecated in favour of RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, which Ray 2.60 does not read yet).
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 3,
        **autoscaling,
    }


def two_models(config: dict) -> None:
    """Two synthetic models on every replica (cap 2), "tiny" the default."""
    serve_models(config, TWO_TINY_MODELS, max_per_replica=2)


def replica_states() -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[APP_NAME].deployments[GENERATOR]
    return {
        str(state.value if hasattr(state, "value") else state): n for state, n in status.replica_states.items() if n
    }


def wait_for_replicas(running: int, timeout_s: float) -> tuple[float, list[tuple[float, dict]]]:
    """Seconds until exactly `running` replicas run and none start or stop; the states seen on the way, timed."""
    started = time.monotonic()
    seen: list[tuple[float, dict]] = []
    while time.monotonic() - started < timeout_s:
        states = replica_states()
        if not seen or seen[-1][1] != states:
            seen.append((round(time.monotonic() - started, 1), states))
        if states == ({"RUNNING": running} if running else {}):
            return time.monotonic() - started, seen
        time.sleep(0.1)
    raise AssertionError(f"not {running} running replicas after {timeout_s}s; states seen: {seen}")


def replicas_that_generated(url: str, want: int, timeout_s: float) -> dict[str, dict]:
    """Replica id -> its model calls by batch size and models loaded, from /info (each /info call reaches one replica),
    for replicas that have made images, until `want` of them are seen (or `timeout_s` passes)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=60) as http:
        while len(seen) < want and time.monotonic() < deadline:
            info = http.get("/info").json()["generator"]
            if info["images"]["succeeded"]:
                seen[info["replica"]] = {
                    "calls": info["model_calls_by_batch_size"],
                    "models": sorted(info["models"]["loaded"]),
                }
            time.sleep(0.05)
    return seen


class LoopbackLoad:
    """`clients` threads posting /generate back to back until stopped (or a deadline passes); client i
    asks for models[i % len(models)] when models are given."""

    def __init__(self, url: str, clients: int, max_seconds: float, models: tuple[str, ...] = ()):
        self.url, self.clients, self.max_seconds, self.models = url, clients, max_seconds, models
        self.statuses: list[int] = []
        self.answered_by: Counter[tuple[str, str]] = Counter()  # (model asked, X-Model answered) -> count
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(clients)

    def __enter__(self) -> LoopbackLoad:
        deadline = time.monotonic() + self.max_seconds
        for client in range(self.clients):
            self._pool.submit(self._client, client, deadline)
        return self

    def _client(self, client: int, deadline: float) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            n = 0
            model = {"model": self.models[client % len(self.models)]} if self.models else {}
            while not self._stop.is_set() and time.monotonic() < deadline:
                response = http.post("/generate", json={"prompt": f"load {client}", "seed": n, **model})
                self.statuses.append(response.status_code)
                self.answered_by[(model.get("model", ""), response.headers.get("x-model", ""))] += 1
                n += 1

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


def test_load_for_two_models_scales_the_generator_to_two_replicas_and_back_to_one(
    serve_cluster, deployed_variant, record_property
):
    scaled = autoscaling(min_replicas=1, max_replicas=2)
    deployed_variant(lambda config: (scaled(config), two_models(config)))
    wait_for_replicas(1, timeout_s=60)

    with LoopbackLoad(serve_cluster.url, clients=8, max_seconds=180, models=("tiny", "tiny-b")) as load:
        scale_up_s, seen_up = wait_for_replicas(2, timeout_s=150)
        served_by = replicas_that_generated(serve_cluster.url, want=2, timeout_s=60)
    scale_down_s, seen_down = wait_for_replicas(1, timeout_s=120)

    print(f"\nscale-up {scale_up_s:.1f}s via {seen_up}; scale-down {scale_down_s:.1f}s via {seen_down}")
    print(
        f"{len(load.statuses)} requests during the load; pipeline calls by batch size and models per replica: {served_by}"
    )
    # The first state other than one running replica: the autoscaler's decision (the second replica
    # PENDING_ALLOCATION or STARTING; a quick start may show it only RUNNING). seen_up[0] is one RUNNING.
    decided_s = next(t for t, states in seen_up if states != {"RUNNING": 1})
    record_property("autoscaling: load start -> a second replica appears (s)", decided_s)
    record_property("autoscaling: 1 -> 2 replicas under load (s)", round(scale_up_s, 1))
    record_property("autoscaling: 2 -> 1 replica after the load (s)", round(scale_down_s, 1))
    assert len(served_by) == 2, f"only {list(served_by)} generated images while 2 replicas ran"
    assert load.statuses and set(load.statuses) == {200}, "requests failed while the generator scaled"
    # Every answer came from the model it asked for, on whichever replica Serve routed it to.
    assert {asked for asked, _ in load.answered_by} == {"tiny", "tiny-b"}
    assert all(asked == answered for asked, answered in load.answered_by), load.answered_by


def test_scale_to_zero_and_a_cold_start_request_waits_and_succeeds(serve_cluster, deployed_variant, record_property):
    # The first test's models: only the autoscaling config differs, which Serve applies without restarting replicas.
    to_zero = autoscaling(min_replicas=0, max_replicas=1, downscale_to_zero_delay_s=1)
    deployed_variant(lambda config: (to_zero(config), two_models(config)))
    idle_to_zero_s, _ = wait_for_replicas(0, timeout_s=120)

    started = time.monotonic()
    response = httpx.post(serve_cluster.url + "/generate", json={"prompt": "cold start", "seed": 3}, timeout=120)
    cold_start_s = time.monotonic() - started

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and response.headers["x-seed"] == "3"
    assert replica_states() == {"RUNNING": 1}
    print(f"\nidle to zero replicas {idle_to_zero_s:.1f}s; cold-start request {cold_start_s:.1f}s")
    record_property("scale to zero: cold-start request from 0 replicas (s)", round(cold_start_s, 1))
