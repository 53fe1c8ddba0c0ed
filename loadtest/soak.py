"""Soak: steady load for N minutes, sampling the replicas' memory and the outcomes as it goes.

    .venv/bin/python -m loadtest.soak --url http://127.0.0.1:8000 --minutes 30 --concurrency 16

Not part of CI. Every `--interval` seconds it records, from /info, the Generator
replica's resident memory (and GPU memory on CUDA), the images made and the
responses by status, next to the interval's throughput and latency from the
load itself. Writes soak.csv and soak.md under --out and prints a table, so a
leak shows as memory that keeps climbing while throughput stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx

from .report import markdown, write_csv
from .sweep import add_mix_arguments, make_session, mix_from_arguments, run_level
from .traffic import RequestStream

FIELDS = (
    "elapsed_s",
    "images_per_s",
    "p50_ms",
    "p99_ms",
    "errors",
    "replica",
    "replica_rss_mib",
    "gpu_used_mib",
    "images_made",
    "responses_by_status",
)


def sample(info: dict, elapsed_s: float, level) -> dict:
    generator = info["generator"]
    gpu = generator.get("gpu") or {}
    return {
        "elapsed_s": round(elapsed_s),
        "images_per_s": round(level.images_per_s, 2),
        "p50_ms": round(level.latency_s(50) * 1000, 1),
        "p99_ms": round(level.latency_s(99) * 1000, 1),
        "errors": level.errors,
        "replica": generator["replica"],
        "replica_rss_mib": round(generator["memory_rss_bytes"] / 2**20, 1),
        "gpu_used_mib": round(gpu["memory_used_bytes"] / 2**20, 1) if gpu else "",
        "images_made": generator["images"]["succeeded"],
        "responses_by_status": " ".join(f"{k}:{v}" for k, v in info["responses_by_status"].items()),
    }


async def soak(url: str, minutes: float, concurrency: int, interval_s: float, mix, headers: dict) -> list[dict]:
    stream = RequestStream(mix, seed=0)
    rows = []
    started = time.monotonic()
    async with (
        make_session(url, concurrency, timeout_s=120) as session,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http,
    ):
        session.headers.update(headers)
        while time.monotonic() - started < minutes * 60:
            level = await run_level(session, stream, concurrency, duration_s=interval_s)
            info = (await http.get("/info")).raise_for_status().json()
            row = sample(info, time.monotonic() - started, level)
            rows.append(row)
            print("  ".join(f"{k}={row[k]}" for k in FIELDS[:7]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval", type=float, default=30, help="seconds between samples")
    parser.add_argument("--api-key", default=None, help="bearer key, if the server has auth on")
    parser.add_argument("--out", type=Path, default=Path("results") / time.strftime("soak-%Y%m%d-%H%M%S"))
    add_mix_arguments(parser)
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = asyncio.run(soak(args.url, args.minutes, args.concurrency, args.interval, mix_from_arguments(args), headers))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "soak.csv", rows, FIELDS)
    table = markdown(list(FIELDS), [[row[k] for k in FIELDS] for row in rows])
    (args.out / "soak.md").write_text(table + "\n")
    print(table)
    if len(rows) > 1:
        grown = rows[-1]["replica_rss_mib"] - rows[0]["replica_rss_mib"]
        print(f"replica memory: {rows[0]['replica_rss_mib']} -> {rows[-1]['replica_rss_mib']} MiB ({grown:+.1f})")
    print(f"wrote {args.out / 'soak.csv'}, {args.out / 'soak.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
