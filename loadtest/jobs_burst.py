"""A burst of jobs against the demo server: every one accepted at once, every one finished, stored once.

    python -m loadtest.jobs_burst                       # 1,000 jobs, configs/cpu-demo.yaml, a few minutes
    python -m loadtest.jobs_burst --jobs 200 --concurrency 32

One server (a fresh local Ray instance, the config's jobs store moved into --out), then:
  1. submit --jobs jobs from --concurrency clients as fast as they are answered (POST /jobs);
  2. wait until the JobManager holds none unfinished; count what the store holds;
  3. the same number of synchronous POST /generate requests from the same number of clients.
Reports submit latency p50/p95/max, jobs/s from the first submission to the last finish, synchronous
images/s, and whether the store holds exactly one record and one image file per job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import yaml

from .servers import REPO, serve_server

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"


async def closed_loop(url: str, count: int, concurrency: int, path: str, body: dict) -> list[tuple[int, float]]:
    """`count` POSTs from `concurrency` clients; (status, seconds) each."""
    results: list[tuple[int, float]] = []
    sent = 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:

        async def client(worker: int) -> None:
            nonlocal sent
            while sent < count:
                index = sent
                sent += 1
                started = time.perf_counter()
                async with session.post(path, json={**body, "seed": index}) as response:
                    await response.read()
                    results.append((response.status, time.perf_counter() - started))

        await asyncio.gather(*(client(w) for w in range(concurrency)))
    return results


def wait_for_jobs(url: str, timeout_s: float) -> float:
    """Seconds until the JobManager holds no unfinished job."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        manager = httpx.get(url + "/info", timeout=60).json()["job_manager"]
        if manager["queued"] == 0 and manager["running"] == 0:
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"jobs still unfinished after {timeout_s}s")


def count_store(store: Path) -> dict:
    records = [json.loads(p.read_text()) for p in (store / "records").glob("*.json")]
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    image_files = sum(1 for _ in (store / "images").glob("*/*.png"))
    images_expected = sum(len(r["seeds"]) for r in records if r["status"] == "succeeded")
    return {
        "records": len(records),
        "by_status": statuses,
        "image_files": image_files,
        "images_expected": images_expected,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.jobs_burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("jobs-burst-%Y%m%d-%H%M%S")
    store = out / "store"
    config = yaml.safe_load(args.config.read_text())
    config["applications"][0]["args"]["jobs"] = {
        **config["applications"][0]["args"].get("jobs", {}),
        "store": str(store),
    }
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    body = {"prompt": "a burst of jobs"}

    with serve_server(config_path, out / "logs") as server:
        started = time.monotonic()
        submits = asyncio.run(closed_loop(server.url, args.jobs, args.concurrency, "/jobs", body))
        submitted_s = time.monotonic() - started
        drained_s = wait_for_jobs(server.url, timeout_s=3600)
        jobs_s = submitted_s + drained_s
        stored = count_store(store)
        started = time.monotonic()
        syncs = asyncio.run(closed_loop(server.url, args.jobs, args.concurrency, "/generate", body))
        sync_s = time.monotonic() - started

    latencies = np.array([s for _, s in submits]) * 1000
    report = {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "submit_statuses": {str(k): sum(1 for s, _ in submits if s == k) for k in {s for s, _ in submits}},
        "submit_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1),
            "p95": round(float(np.percentile(latencies, 95)), 1),
            "max": round(float(latencies.max()), 1),
        },
        "all_submitted_s": round(submitted_s, 2),
        "jobs_per_s": round(args.jobs / jobs_s, 2),
        "store": stored,
        "stored_exactly_once": stored["records"] == args.jobs
        and stored["image_files"] == stored["images_expected"] == args.jobs,
        "sync_statuses": {str(k): sum(1 for s, _ in syncs if s == k) for k in {s for s, _ in syncs}},
        "sync_images_per_s": round(args.jobs / sync_s, 2),
    }
    report["jobs_vs_sync_throughput"] = round(report["jobs_per_s"] / report["sync_images_per_s"], 2)
    (out / "jobs-burst.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0 if report["stored_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
