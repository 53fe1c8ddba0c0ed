"""Fair share between tenants on one server: a heavy tenant's backlog and a light tenant's requests.

    python -m loadtest.fairness                         # configs/cpu-demo.yaml, ~4 min on 2 cores
    python -m loadtest.fairness --jobs 200 --weighted-jobs 150 --probe-seconds 15

One server (a fresh local Ray instance, the config with API keys a, b, w1 and w3 from a keys file, w1 of weight
1 and w3 of weight 3, its job store in --out), then, every request --steps steps at 64x64:
  1. B alone: one synchronous POST /generate per second for --probe-seconds; its latencies.
  2. A alone: --jobs jobs submitted at once (POST /jobs); A's images/s, from the first submission to the last
     job finished.
  3. A and B: the same burst of A's jobs, and B's one request per second while A's backlog lasts.
  4. Weights: w1 and w3 submit --weighted-jobs jobs each, at once; their shares of the images finished while
     both still had jobs waiting (from the job records' finish times).
Reports B's p50/p95 with A's backlog / alone, A's images/s with B / alone, the weighted shares, and every
submission's status. Goals (issue 26): B's p95 <= 1.5x alone, A >= 0.95x alone, shares within 10 % of 1:3, every
job accepted. Writes fairness.json and fairness.md to --out. Load generator: aiohttp (httpx's pool cannot send a
burst of this size in time on a small machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import yaml

from .servers import REPO, serve_server

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"
KEYS = {"a": "fair-key-a", "b": "fair-key-b", "w1": "fair-key-w1", "w3": "fair-key-w3"}


def configured(config_path: Path, out: Path) -> Path:
    """The config with the four keys (named, from a file), the weights and the job store in `out`."""
    config = yaml.safe_load(config_path.read_text())
    keys_file = out / "api-keys"
    keys_file.write_text("".join(f"{name} {key}\n" for name, key in KEYS.items()))
    args = config["applications"][0]["args"]
    args["auth"] = {"api_keys_file": str(keys_file)}
    args["tenants"] = {"keys": {"w1": {"weight": 1}, "w3": {"weight": 3}}}
    args["jobs"] = {**args.get("jobs", {}), "store": str(out / "store")}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


async def submit_jobs(session: aiohttp.ClientSession, tenant: str, count: int, steps: int) -> list[int]:
    """`count` POST /jobs at once; their statuses."""

    async def one(index: int) -> int:
        body = {"prompt": f"{tenant} job {index}", "seed": index, "num_inference_steps": steps}
        async with session.post("/jobs", json=body, headers=auth(tenant)) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def unfinished(session: aiohttp.ClientSession, tenant: str) -> int:
    async with session.get("/usage", headers=auth(tenant)) as response:
        jobs = (await response.json())["jobs"] or {}
    return jobs.get("queued", 0) + jobs.get("running", 0)


async def probe(session: aiohttp.ClientSession, steps: int, keep_going) -> list[float]:
    """B: one synchronous request a second while `keep_going()`; seconds each (200s only)."""
    latencies: list[float] = []
    index = 0
    while await keep_going():
        started = time.perf_counter()
        body = {"prompt": f"b probe {index}", "seed": index, "num_inference_steps": steps}
        async with session.post("/generate", json=body, headers=auth("b")) as response:
            await response.read()
            if response.status == 200:
                latencies.append(time.perf_counter() - started)
        index += 1
        await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
    return latencies


async def backlog(session: aiohttp.ClientSession, jobs: int, steps: int, with_b: bool) -> dict:
    """A's burst of jobs, B probing alongside when `with_b`; A's images/s and B's latencies."""
    started = time.perf_counter()
    statuses = await submit_jobs(session, "a", jobs, steps)

    async def a_waits() -> bool:
        return await unfinished(session, "a") > 0

    probing = asyncio.ensure_future(probe(session, steps, a_waits)) if with_b else None
    while await a_waits():
        await asyncio.sleep(0.25)
    seconds = time.perf_counter() - started
    latencies = await probing if probing else []
    accepted = statuses.count(202)
    return {
        "submitted": len(statuses),
        "accepted": accepted,
        "seconds": seconds,
        "a_images_per_s": accepted / seconds,
        "b_latencies": latencies,
    }


def shares(store: Path, w1_id: str, w3_id: str, since: float) -> dict:
    """Images finished by each weighted tenant while both had jobs in the server: from the later of their first
    starts to the earlier of their last finishes (their jobs were submitted together, but one tenant's reach
    the queue first)."""
    runs: dict[str, list[tuple[float, float]]] = {w1_id: [], w3_id: []}
    for path in (store / "records").glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("tenant") in runs and record["status"] == "succeeded" and record["created_at"] >= since:
            runs[record["tenant"]].append((record["started_at"], record["finished_at"]))
    start = max(min(s for s, _ in times) for times in runs.values())
    end = min(max(f for _, f in times) for times in runs.values())
    done = {tenant: sum(1 for _, f in times if start < f <= end) for tenant, times in runs.items()}
    total = sum(done.values())
    return {
        "w1": done[w1_id],
        "w3": done[w3_id],
        "w3_share": round(done[w3_id] / total, 3) if total else None,
        "window_s": round(end - start, 2),
    }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50_ms": None, "p95_ms": None}
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(values, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(values, 95)) * 1000, 1),
    }


async def run(url: str, store: Path, args) -> dict:
    from serve_app.job_queue.records import owner_of

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        until = time.perf_counter() + args.probe_seconds

        async def for_a_while() -> bool:
            return time.perf_counter() < until

        b_alone = await probe(session, args.steps, for_a_while)
        print(f"B alone: {percentiles(b_alone)}", file=sys.stderr)
        a_alone = await backlog(session, args.jobs, args.steps, with_b=False)
        print(f"A alone: {a_alone['a_images_per_s']:.2f} images/s", file=sys.stderr)
        both = await backlog(session, args.jobs, args.steps, with_b=True)
        print(f"A with B: {both['a_images_per_s']:.2f} images/s, B {percentiles(both['b_latencies'])}", file=sys.stderr)
        since = time.time()
        weighted = await asyncio.gather(
            submit_jobs(session, "w1", args.weighted_jobs, args.steps),
            submit_jobs(session, "w3", args.weighted_jobs, args.steps),
        )
        while await unfinished(session, "w1") or await unfinished(session, "w3"):
            await asyncio.sleep(0.5)
    share = shares(store, owner_of(KEYS["w1"]), owner_of(KEYS["w3"]), since - 1)
    b_alone_p, b_with_p = percentiles(b_alone), percentiles(both["b_latencies"])
    return {
        "steps": args.steps,
        "b_alone": b_alone_p,
        "b_with_a_backlog": b_with_p,
        "b_p50_ratio": _ratio(b_with_p["p50_ms"], b_alone_p["p50_ms"]),
        "b_p95_ratio": _ratio(b_with_p["p95_ms"], b_alone_p["p95_ms"]),
        "a_alone": {k: v for k, v in a_alone.items() if k != "b_latencies"},
        "a_with_b": {k: v for k, v in both.items() if k != "b_latencies"},
        "a_ratio": round(both["a_images_per_s"] / a_alone["a_images_per_s"], 3),
        "weighted": {**share, "submitted": [len(w) for w in weighted], "accepted": [w.count(202) for w in weighted]},
    }


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def markdown(report: dict) -> str:
    b_alone, b_with = report["b_alone"], report["b_with_a_backlog"]
    a_alone, a_with = report["a_alone"], report["a_with_b"]
    w = report["weighted"]
    share = w["w3_share"]
    lines = [
        f"{report['steps']}-step 64x64 images; A: {a_alone['submitted']} jobs at once; B: one synchronous request a second.",
        "",
        "| | alone | with the other tenant | ratio | goal |",
        "|---|---:|---:|---:|---|",
        f"| B p50 | {b_alone['p50_ms']} ms | {b_with['p50_ms']} ms | {report['b_p50_ratio']} | |",
        f"| B p95 | {b_alone['p95_ms']} ms | {b_with['p95_ms']} ms | {report['b_p95_ratio']} | <= 1.5 |",
        f"| A images/s | {a_alone['a_images_per_s']:.2f} | {a_with['a_images_per_s']:.2f} | {report['a_ratio']} | >= 0.95 |",
        f"| A jobs accepted | {a_alone['accepted']}/{a_alone['submitted']} | {a_with['accepted']}/{a_with['submitted']} | | all |",
        "",
        f"Weights 1 and 3, {w['submitted'][0]} jobs each at once (accepted {w['accepted'][0]} and {w['accepted'][1]}): "
        f"in the {w['window_s']} s both had jobs in the server, w1 finished {w['w1']} images and w3 {w['w3']}: w3's share "
        f"{share:.3f} (goal 0.75 +/- 10 %: 0.675-0.825).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--jobs", type=int, default=500, help="A's burst of jobs")
    parser.add_argument("--weighted-jobs", type=int, default=300, help="jobs of each weighted tenant")
    parser.add_argument("--probe-seconds", type=float, default=20, help="B alone, seconds")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("fairness-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    config = configured(args.config, out)
    with serve_server(config, out / "logs", ready_path="/readyz") as server:
        report = asyncio.run(run(server.url, out / "store", args))
    (out / "fairness.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "fairness.md").write_text(text)
    print(text)
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
