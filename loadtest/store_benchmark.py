"""Job submit latency and image fetch latency with the job store on a local directory and on an S3-protocol server.

    python -m loadtest.store_benchmark                  # 100 jobs per store, a few minutes
    python -m loadtest.store_benchmark --jobs 200

One run, the same demo server (configs/cpu-demo.yaml, a fresh local Ray each time) twice: once with
`jobs.store` in a directory of --out, once with it on a local S3-protocol server (moto's, started here and
stopped by its PID; `pip install 'moto[server]' s3fs`) with `jobs.presign_s` set. Against each, one client
at a time (latency, not throughput):
  1. POST /jobs --jobs times (64x64, 2 steps): the 202 is answered once the job is stored;
  2. once every job has ended: GET /jobs/{id} (a record read) and GET /jobs/{id}/images/0 (an image through
     the ingress) for each; with S3 also the job's presigned URL, fetched straight from the object store;
  3. GET /jobs?limit=20 pages (a listing and its records).
Reports p50/p95 in milliseconds per store and the S3 / local ratio of each p50. Absolute numbers vary with
the machine's load: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from .servers import REPO, s3_env, s3_server, serve_server

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"
BUCKET = "store-benchmark"
JOB = {"prompt": "a store benchmark", "width": 64, "height": 64, "num_inference_steps": 2}


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {
        "n": len(ms),
        "p50": round(float(np.percentile(ms, 50)), 2),
        "p95": round(float(np.percentile(ms, 95)), 2),
        "mean": round(float(ms.mean()), 2),
    }


def timed(call) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def measure(url: str, jobs: int) -> dict:
    results: dict = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        http.post("/jobs", json={**JOB, "seed": 0}).raise_for_status()  # warm the path once
        submits, ids = [], []
        for i in range(jobs):
            response, seconds = timed(lambda i=i: http.post("/jobs", json={**JOB, "seed": i}))
            assert response.status_code == 202, response.text
            submits.append(seconds)
            ids.append(response.json()["id"])
        results["submit"] = percentiles(submits)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            manager = http.get("/info").json()["job_manager"]
            if manager["queued"] == 0 and manager["running"] == 0:
                break
            time.sleep(0.25)
        reads, fetches, direct, links = [], [], [], []
        for job_id in ids:
            response, seconds = timed(lambda job_id=job_id: http.get(f"/jobs/{job_id}"))
            assert response.json()["status"] == "succeeded", response.text
            reads.append(seconds)
            links.append(response.json()["images"][0]["url"])
            response, seconds = timed(lambda job_id=job_id: http.get(f"/jobs/{job_id}/images/0"))
            assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
            fetches.append(seconds)
        results["job_read"] = percentiles(reads)
        results["image_fetch_via_server"] = percentiles(fetches)
        if links[0].startswith("http"):  # presigned: straight from the object store
            with httpx.Client(timeout=60) as plain:
                for link in links:
                    response, seconds = timed(lambda link=link: plain.get(link))
                    assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
                    direct.append(seconds)
            results["image_fetch_presigned"] = percentiles(direct)
        pages, cursor = [], None
        for _ in range(max(1, jobs // 20)):
            response, seconds = timed(lambda cursor=cursor: http.get("/jobs", params={"limit": 20, "cursor": cursor}))
            pages.append(seconds)
            cursor = response.json()["next_cursor"]
            if cursor is None:
                break
        results["list_page_of_20"] = percentiles(pages)
    return results


def run_against(store: str, jobs: int, out: Path, name: str, presign_s: float | None = None) -> dict:
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    settings = {"store": store}
    if presign_s is not None:
        settings["presign_s"] = presign_s
    config["applications"][0]["args"]["jobs"] = {**config["applications"][0]["args"].get("jobs", {}), **settings}
    path = out / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with serve_server(path, out / f"logs-{name}") as server:
        return measure(server.url, jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.store_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("store-benchmark-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    report: dict = {"jobs": args.jobs, "stores": {}}
    with s3_server(out / "logs-s3") as s3:
        os.environ.update(s3_env(s3))  # the Serve processes started below inherit it, as a deployment sets it
        import fsspec

        fsspec.filesystem("s3").mkdir(BUCKET)
        report["stores"]["local"] = run_against(str(out / "store"), args.jobs, out, "local")
        report["stores"]["s3"] = run_against(f"s3://{BUCKET}/jobs", args.jobs, out, "s3", presign_s=3600)
    local, s3 = report["stores"]["local"], report["stores"]["s3"]
    report["s3_vs_local_p50"] = {
        key: round(s3[key]["p50"] / local[key]["p50"], 2) for key in local if key in s3 and local[key]["p50"]
    }
    if "image_fetch_presigned" in s3:
        report["presigned_vs_server_fetch_p50_on_s3"] = round(
            s3["image_fetch_presigned"]["p50"] / s3["image_fetch_via_server"]["p50"], 2
        )
    report["load_average_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    report["cpus"] = os.cpu_count()
    (out / "store-benchmark.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
