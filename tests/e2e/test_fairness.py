"""Tenants on the demo, through real Serve: a light key's requests finish while a heavy key's backlog waits; a
key past its rate gets 429 with its headers; a daily quota survives the ingress replica's restart; a burst far
above what the ingress holds (`limits.max_concurrent_requests`) gets only 200s and 503s that say when to retry,
while health answers through it: Serve's own bounds sit above the ingress's, as the config check requires, so every
request reaches the ingress's admission and probes always find room.

Synchronised on what the server exposes (per-tenant counts in /info and /usage), never on sleeps; no test
checks a time. Bursts go out with aiohttp (httpx's pool is no load generator at this concurrency), to
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import httpx
from harness import TENANT_KEYS, TENANTS_MAX_CONCURRENT, wait_until

from serve_app.job_queue.records import owner_of


def as_key(url: str, name: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TENANT_KEYS[name]}"})


def tenant_counts(http: httpx.Client, name: str) -> dict:
    """The Generator's counts for a key's tenant (images waiting and running now, admitted since start) and the
    JobManager's (jobs queued and running)."""
    info = http.get("/info").json()
    tenant = owner_of(TENANT_KEYS[name])
    images = {"waiting": 0, "running": 0, "admitted": 0, **info["generator"]["tenants"].get(tenant, {})}
    jobs = {"queued": 0, "running": 0, **info["job_manager"]["tenants"].get(tenant, {})}
    return {**images, "jobs_unfinished": jobs["queued"] + jobs["running"]}


def test_the_light_keys_requests_finish_while_the_heavy_keys_backlog_waits(tenants_server):
    with as_key(tenants_server, "heavy") as heavy, as_key(tenants_server, "light") as light:
        for i in range(150):  # 8-step jobs: seconds of work, queued in the JobManager and the engine
            response = heavy.post("/jobs", json={"prompt": f"heavy {i}", "seed": i, "num_inference_steps": 8})
            assert response.status_code == 202, response.text
        wait_until(lambda: tenant_counts(heavy, "heavy")["waiting"] >= 16, 120, "the heavy backlog waits in the engine")
        for i in range(3):
            before = tenant_counts(heavy, "heavy")
            response = light.post("/generate", json={"prompt": f"light {i}", "seed": i, "num_inference_steps": 8})
            assert response.status_code == 200, response.text
            after = tenant_counts(heavy, "heavy")
            # Of the heavy images that waited when the light request came, most still waited when it was answered:
            # it took the next free place, not a place behind them.
            assert after["admitted"] - before["admitted"] < before["waiting"], (before, after)
            assert after["jobs_unfinished"] > 0
        light_counts = tenant_counts(light, "light")
        assert light_counts["admitted"] == 3 and light_counts["waiting"] == 0
        usage = light.get("/usage").json()
        assert usage["name"] == "light" and usage["tenant"] == owner_of(TENANT_KEYS["light"]) and usage["images"] == 3
        wait_until(lambda: tenant_counts(heavy, "heavy")["jobs_unfinished"] == 0, 300, "the heavy backlog is done")


def test_priority_is_the_callers_to_raise_up_to_its_max(tenants_server):
    with as_key(tenants_server, "heavy") as heavy, as_key(tenants_server, "light") as light:
        refused = heavy.post("/generate", json={"prompt": "x", "priority": "high"})
        assert refused.status_code == 403 and refused.json()["error"]["field"] == "priority"
        assert light.post("/generate", json={"prompt": "x", "priority": "high"}).status_code == 200
        job = heavy.post("/jobs", json={"prompt": "x", "priority": "low"})
        assert job.status_code == 202


def test_past_its_rate_a_key_gets_429_with_retry_after_and_ratelimit_headers(tenants_server):
    with as_key(tenants_server, "rated") as rated, as_key(tenants_server, "light") as light:
        answers = [rated.post("/generate", json={"prompt": f"rated {i}"}) for i in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[0].headers["ratelimit-limit"] == "2" and answers[0].headers["ratelimit-remaining"] == "1"
        refused = answers[2]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1 and refused.headers["ratelimit-remaining"] == "0"
        assert int(refused.headers["ratelimit-reset"]) >= 1
        assert light.post("/generate", json={"prompt": "another key"}).status_code == 200  # buckets are per key
        assert rated.get("/usage").json()["refused"]["rate"] >= 1


def test_the_daily_quota_survives_a_restart_of_the_ingress(tenants_server):
    with as_key(tenants_server, "capped") as capped:
        assert capped.post("/generate", json={"prompt": "capped", "num_images": 3}).status_code == 200
        refused = capped.post("/generate", json={"prompt": "one more"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        assert int(refused.headers["retry-after"]) >= 1
        wait_until(lambda: capped.get("/usage").json()["quota"]["stored"], 60, "the count is in the job store")
        old = capped.get("/info")
        os.kill(old.json()["ingress"]["pid"], signal.SIGKILL)  # a replica process this test's Serve instance started

        def new_replica_answers():
            try:
                response = capped.get("/usage")
            except httpx.HTTPError:
                return None
            fresh = (
                response.status_code == 200
                and response.headers["x-ingress-replica"] != old.headers["x-ingress-replica"]
            )
            return response if fresh else None

        usage = wait_until(new_replica_answers, 180, "a new ingress replica answers").json()
        assert usage["quota"]["used"] == 3 and usage["quota"]["remaining"] == 0
        again = capped.post("/generate", json={"prompt": "after the restart"})
        assert again.status_code == 429 and again.json()["error"]["code"] == "quota_exceeded"


async def _burst(url: str, count: int) -> tuple[list[tuple[int, str | None, str]], list[int]]:
    """`count` POST /generate at once (deadline 10 s each) while /healthz and /readyz are asked in turn;
    (status, Retry-After, body) per request, and each probe's status."""
    done = asyncio.Event()
    probes: list[int] = []
    headers = {"Authorization": f"Bearer {TENANT_KEYS['light']}", "X-Request-Timeout": "10"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(index: int):
            body = {"prompt": f"burst {index}", "seed": index, "num_inference_steps": 4}
            async with session.post("/generate", json=body, headers=headers) as response:
                body = await response.read()  # a PNG, or an error (ours in JSON, Serve's in plain text)
                return response.status, response.headers.get("Retry-After"), body[:200].decode("utf-8", "replace")

        async def probe():
            while not done.is_set():
                for path in ("/healthz", "/readyz"):
                    async with session.get(path) as response:
                        await response.read()
                        probes.append(response.status)
                await asyncio.sleep(0.1)

        prober = asyncio.ensure_future(probe())
        answers = await asyncio.gather(*(one(i) for i in range(count)))
        done.set()
        await prober
    return answers, probes


def test_a_burst_far_above_what_the_ingress_holds_gets_only_200s_and_503s_with_retry_after(tenants_server):
    count = 12 * TENANTS_MAX_CONCURRENT
    answers, probes = asyncio.run(_burst(tenants_server, count))
    statuses = {status for status, _, _ in answers}
    assert statuses <= {200, 503}, {s: b for s, _, b in answers if s not in (200, 503)}
    assert 200 in statuses and 503 in statuses
    refusals = [(retry_after, body) for status, retry_after, body in answers if status == 503]
    assert all(retry_after is not None and int(retry_after) >= 1 for retry_after, _ in refusals), refusals[:3]
    assert probes and set(probes) == {200}
    assert all(body.startswith("{") for _, body in refusals)  # the ingress's own admission refused, not Serve's proxy
    answered = sum(1 for status, _, _ in answers if status == 200)
    print(f"\nburst of {count}: {answered} answered, {len(refusals)} refused; {len(probes)} probes, all 200")
