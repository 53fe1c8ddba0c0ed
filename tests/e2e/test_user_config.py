"""Batching settings change at run time through the Generator's user_config: Serve calls reconfigure()
on the running replica (no restart), and the next requests batch by the new settings."""

from __future__ import annotations

import httpx
from harness import deployment, load_config
from helpers import burst, png


def one_image_per_call(config: dict) -> None:
    deployment(config, "ImageGenerator")["user_config"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}


def test_batch_size_changes_at_run_time_without_a_restart(serve_cluster, deployed_variant):
    serve_cluster.deploy(load_config())
    with httpx.Client(base_url=serve_cluster.url, timeout=60) as http:
        before = http.get("/info").json()["generator"]
        assert before["batching"]["max_batch_size"] == 8
        deployed_variant(one_image_per_call)
        reconfigured = http.get("/info").json()["generator"]
        assert reconfigured["batching"]["max_batch_size"] == 1
        assert reconfigured["pid"] == before["pid"]  # the same replica, reconfigured in place

        responses = burst(serve_cluster.url, [("/generate", {"prompt": "one at a time", "seed": i}) for i in range(8)])
        assert [png(r).size for r in responses] == [(64, 64)] * 8
        assert {r.headers["x-batch-size"] for r in responses} == {"1"}
        after = http.get("/info").json()["generator"]
        calls = reconfigured["model_calls_by_batch_size"]
        new_calls = {size: n - calls.get(size, 0) for size, n in after["model_calls_by_batch_size"].items()}
        assert {size for size, n in new_calls.items() if n} == {"1"}, new_calls
