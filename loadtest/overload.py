"""Open-loop overload: arrivals at 1x, 2x, 5x and 10x the measured capacity against one server.

    python -m loadtest.overload                         # configs/cpu-demo.yaml, ~3 min
    python -m loadtest.overload --levels 1,10 --duration 15 --deadline 10
    python -m loadtest.overload --levels none --burst 1200   # only the burst

First the capacity: a closed loop at --capacity-clients clients, images/s. Then, for each level,
requests arrive at level x capacity per second (Poisson, open loop: arrivals do not wait for
answers) for --duration seconds, each asking for a --deadline s deadline (X-Request-Timeout),
while /healthz is probed every 0.2 s. Per level: goodput (images answered 200 within the
deadline, per second of the window), the share refused (503), p95 time to a refusal, p95 latency
of the accepted, answers by status (408 and 504 should be 0), mean batch size, and the slowest
health probe. Then --burst requests at once (0: none), each with the same deadline, while /healthz
and /readyz are probed every 0.1 s: answers by status, goodput (images answered in time, per second
from the burst to the last of them) against capacity, p95 time to a refusal, the slowest probe, and
whether every 429/503 said when to retry (Retry-After), the ingress's own refusals (JSON) told apart
from Serve's proxy's (plain text); and, for scale, the same number of GET /healthz at once: what the
HTTP path alone (proxy, ingress replica, load generator) takes for a burst of that size on this
machine. Writes overload.json and overload.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import numpy as np

from .servers import REPO, serve_server

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"
BODY = {"prompt": "overload", "num_inference_steps": 4}


async def capacity(session: aiohttp.ClientSession, clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            async with session.post("/generate", json={**BODY, "seed": worker * 100000 + n}) as response:
                await response.read()
                if response.status == 200 and time.perf_counter() <= deadline:
                    done += 1
            n += 1

    await asyncio.gather(*(client(w) for w in range(clients)))
    return done / seconds


async def post_generate(
    session: aiohttp.ClientSession, index: int, deadline_s: float
) -> tuple[int, float, dict, bytes]:
    """One POST /generate asking for `deadline_s`: status (0: no answer), seconds, headers, body."""
    started = time.perf_counter()
    try:
        async with session.post(
            "/generate", json={**BODY, "seed": index}, headers={"X-Request-Timeout": str(deadline_s)}
        ) as response:
            body = await response.read()
            return response.status, time.perf_counter() - started, response.headers, body
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, time.perf_counter() - started, {}, b""


async def open_loop(session: aiohttp.ClientSession, rate: float, seconds: float, deadline_s: float) -> dict:
    outcomes: list[tuple[int, float, int]] = []  # status, seconds, batch size
    probes: list[float] = []
    rng = random.Random(int(rate * 1000))
    stop = time.perf_counter() + seconds

    async def one(index: int) -> None:
        status, seconds, headers, _ = await post_generate(session, index, deadline_s)
        outcomes.append((status, seconds, int(headers.get("X-Batch-Size", 0))))

    async def probe() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                async with session.get("/healthz") as response:
                    await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            probes.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)

    tasks = [asyncio.ensure_future(probe())]
    index = 0
    while (now := time.perf_counter()) < stop:
        tasks.append(asyncio.ensure_future(one(index)))
        index += 1
        await asyncio.sleep(min(rng.expovariate(rate), max(0.0, stop - now)))
    await asyncio.gather(*tasks)
    statuses = Counter(status for status, _, _ in outcomes)
    good = [s for status, s, _ in outcomes if status == 200 and s <= deadline_s]
    refusals = [s for status, s, _ in outcomes if status == 503]
    accepted = [s for status, s, _ in outcomes if status == 200]
    batches = [b for status, _, b in outcomes if status == 200 and b]

    def p95(values: list[float]) -> float | None:
        return round(float(np.percentile(values, 95)) * 1000, 1) if values else None

    return {
        "offered_per_s": round(index / seconds, 2),
        "goodput_images_per_s": round(len(good) / seconds, 2),
        "refused_share": round(len(refusals) / max(1, len(outcomes)), 3),
        "refusal_p95_ms": p95(refusals),
        "accepted_p95_ms": p95(accepted),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "late_or_timed_out": sum(
            1 for status, s, _ in outcomes if status in (408, 504) or (status == 200 and s > deadline_s)
        ),
        "mean_batch_size": round(sum(batches) / len(batches), 2) if batches else None,
        "health_max_ms": round(max(probes) * 1000, 1) if probes else None,
    }


async def burst(session: aiohttp.ClientSession, count: int, deadline_s: float) -> dict:
    """`count` POST /generate at once while /healthz and /readyz are probed in turn every 0.1 s."""
    outcomes: list[tuple[int, float, bool, bool]] = []  # status, seconds, Retry-After sent, our JSON error
    probes: list[float] = []
    finished = asyncio.Event()
    started = time.perf_counter()

    async def one(index: int) -> None:
        status, seconds, headers, body = await post_generate(session, index, deadline_s)
        outcomes.append((status, seconds, "Retry-After" in headers, body.startswith(b"{")))

    async def probe() -> None:
        while not finished.is_set():
            for path in ("/healthz", "/readyz"):
                begun = time.perf_counter()
                try:
                    async with session.get(path) as response:
                        await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                probes.append(time.perf_counter() - begun)
            await asyncio.sleep(0.1)

    prober = asyncio.ensure_future(probe())
    await asyncio.gather(*(one(i) for i in range(count)))
    finished.set()
    await prober
    statuses = Counter(status for status, _, _, _ in outcomes)
    good = [s for status, s, _, _ in outcomes if status == 200 and s <= deadline_s]
    refused = [(s, retry, ours) for status, s, retry, ours in outcomes if status in (429, 503)]
    span = max((s for status, s, _, _ in outcomes if status == 200), default=time.perf_counter() - started)

    def p95(values: list[float]) -> float | None:
        return round(float(np.percentile(values, 95)) * 1000, 1) if values else None

    return {
        "requests": count,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "goodput_images_per_s": round(len(good) / span, 2) if good else 0.0,
        "answered_in_time": len(good),
        "refusal_p95_ms": p95([s for s, _, _ in refused]),
        "refusals_without_retry_after": sum(1 for _, retry, _ in refused if not retry),
        "refused_by_the_ingress": sum(1 for _, _, ours in refused if ours),
        "refused_by_serve": sum(1 for _, _, ours in refused if not ours),
        "health_max_ms": round(max(probes) * 1000, 1) if probes else None,
        "health_p95_ms": p95(probes),
    }


async def probe_burst(session: aiohttp.ClientSession, count: int) -> dict:
    """`count` GET /healthz at once: the floor of any burst's answer times on this machine."""

    async def one() -> float:
        begun = time.perf_counter()
        async with session.get("/healthz") as response:
            await response.read()
        return time.perf_counter() - begun

    seconds = await asyncio.gather(*(one() for _ in range(count)))
    return {"p95_ms": round(float(np.percentile(seconds, 95)) * 1000, 1), "max_ms": round(max(seconds) * 1000, 1)}


def burst_markdown(capacity_per_s: float, result: dict, deadline_s: float) -> str:
    r = result
    return (
        f"\nA burst of {r['requests']} requests at once (deadline {deadline_s:g} s), /healthz and /readyz probed every "
        "0.1 s:\n\n"
        "| answers by status | goodput images/s (x capacity) | refusal p95 | refused by the ingress / by Serve "
        "| refusals without Retry-After | slowest probe (p95) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| {r['statuses']} | {r['goodput_images_per_s']} ({r['goodput_images_per_s'] / capacity_per_s:.2f}) "
        f"| {r['refusal_p95_ms']} ms | {r['refused_by_the_ingress']} / {r['refused_by_serve']} "
        f"| {r['refusals_without_retry_after']} | {r['health_max_ms']} ms ({r['health_p95_ms']} ms) |\n"
        f"\nFor scale, {r['requests']} GET /healthz at once (the HTTP path alone): p95 {r['healthz_burst']['p95_ms']} ms, "
        f"slowest {r['healthz_burst']['max_ms']} ms.\n"
    )


def markdown(capacity_per_s: float, levels: dict, args) -> str:
    lines = [
        f"Capacity {capacity_per_s:.1f} images/s ({args.capacity_clients} closed-loop clients); "
        f"open-loop arrivals for {args.duration:g} s per level, deadline {args.deadline:g} s, {BODY['num_inference_steps']}-step requests.",
        "",
        "| load | offered/s | goodput images/s (x capacity) | refused | refusal p95 | accepted p95 | 408/504/late | mean batch | slowest /healthz |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, r in levels.items():
        lines.append(
            f"| {level}x | {r['offered_per_s']} | {r['goodput_images_per_s']} ({r['goodput_images_per_s'] / capacity_per_s:.2f}) "
            f"| {r['refused_share']:.0%} | {r['refusal_p95_ms']} ms | {r['accepted_p95_ms']} ms | {r['late_or_timed_out']} "
            f"| {r['mean_batch_size']} | {r['health_max_ms']} ms |"
        )
    return "\n".join(lines) + "\n"


async def run(url: str, args) -> tuple[float, dict]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        measured = await capacity(session, args.capacity_clients, args.capacity_seconds)
        levels = {}
        for level in args.levels:
            levels[level] = await open_loop(session, level * measured, args.duration, args.deadline)
            print(f"{level}x: {json.dumps(levels[level])}", file=sys.stderr)
            await asyncio.sleep(2)  # let the queue drain between levels
        burst_result = None
        if args.burst:
            burst_result = await burst(session, args.burst, args.deadline)
            await asyncio.sleep(args.deadline)  # what the burst admitted is done
            burst_result["healthz_burst"] = await probe_burst(session, args.burst)
            print(f"burst of {args.burst}: {json.dumps(burst_result)}", file=sys.stderr)
    return measured, levels, burst_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument(
        "--levels",
        type=lambda t: [] if t == "none" else [float(x) for x in t.split(",")],
        default=[1, 2, 5, 10],
        help="open-loop levels, x capacity (none: only the burst)",
    )
    parser.add_argument("--burst", type=int, default=1200, help="requests sent at once after the levels (0: none)")
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--deadline", type=float, default=10)
    parser.add_argument("--capacity-clients", type=int, default=32)
    parser.add_argument("--capacity-seconds", type=float, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("overload-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with serve_server(args.config, out / "logs") as server:
        measured, levels, burst_result = asyncio.run(run(server.url, args))
    report = {
        "capacity_images_per_s": round(measured, 2),
        "levels": {f"{k:g}": v for k, v in levels.items()},
        "burst": burst_result,
    }
    (out / "overload.json").write_text(json.dumps(report, indent=2))
    text = markdown(measured, {f"{k:g}": v for k, v in levels.items()}, args) if levels else ""
    if burst_result is not None:
        text += burst_markdown(measured, burst_result, args.deadline)
    (out / "overload.md").write_text(text)
    print(text)
    if levels:
        top = levels[max(levels)]
        print(
            f"goodput at {max(levels):g}x: {top['goodput_images_per_s'] / measured:.2f} x capacity (goal >= 0.9); "
            f"refusal p95 {top['refusal_p95_ms']} ms (goal <= 100); late or timed out: {top['late_or_timed_out']} "
            "(goal 0)"
        )
    if burst_result is not None:
        r = burst_result
        print(
            f"burst of {r['requests']}: goodput {r['goodput_images_per_s'] / measured:.2f} x capacity (goal >= 0.9); "
            f"refusal p95 {r['refusal_p95_ms']} ms (goal <= 1000); slowest probe {r['health_max_ms']} ms (goal <= "
            f"1000); refusals without Retry-After: {r['refusals_without_retry_after']} (goal 0)"
        )
    return 0 if math.isfinite(measured) else 1


if __name__ == "__main__":
    sys.exit(main())
