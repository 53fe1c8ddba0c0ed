"""Short and long requests together: the step engine against whole pipeline calls, in one run.

    python -m loadtest.mixed_traffic                    # configs/cpu-demo.yaml, both engines, ~4 min
    python -m loadtest.mixed_traffic --duration 20 --short-clients 2 --long-clients 4
    python -m loadtest.mixed_traffic --model synthetic:tiny-flux-schnell   # one of the config's models, or a source

For each engine (`pipeline.engine: step`, then `request`), the same config is served on a fresh
local Ray instance and driven, closed loop, through four phases:
  1. short alone:   `--short-clients` clients sending `--short-steps`-step requests;
  2. mixed:         the same short clients while `--long-clients` clients send `--long-steps`-step requests;
  3. uniform:       `--uniform-clients` clients sending the model's default request (today's `make bench` load);
  4. cancellation:  `--long-clients` long requests whose client gives up a quarter of the way through; the
                    replica's counters then show them cancelled in flight and how many model calls ran after.
Reports p50/p95 per class and images/s, the ratios the step engine is judged by (short p95 mixed / alone,
throughput step / request), and writes mixed-traffic.json and .md to --out (default results/mixed-<time>/).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import yaml

from .servers import REPO, serve_server, with_one_model
from .sweep import LevelResult, make_session, run_level, send
from .traffic import RequestMix, RequestStream

DEMO_CONFIG = REPO / "configs" / "cpu-demo.yaml"
ENGINES = ("step", "request")
GOAL_SHORT_P95_RATIO = 1.5  # short p95 with long traffic present / alone (step engine)


def engine_config(config: dict, engine: str) -> dict:
    config = copy.deepcopy(config)
    config["applications"][0]["args"].setdefault("pipeline", {})["engine"] = engine
    return config


def stream(steps: str, seed: int) -> RequestStream:
    return RequestStream(RequestMix.from_specs(steps=steps, endpoints="png", negative_share=0.25), seed=seed)


async def measure_engine(url: str, args) -> dict:
    short, long_, uniform = stream(str(args.short_steps), 1), stream(str(args.long_steps), 2), stream("default", 3)
    clients = args.short_clients + args.long_clients + args.uniform_clients
    async with make_session(url, clients, timeout_s=300) as session:
        for _ in range(4):  # warm connections and the replica
            await send(session, short.next())
        alone = await run_level(session, short, args.short_clients, args.duration)
        mixed_short, mixed_long = await asyncio.gather(
            run_level(session, short, args.short_clients, args.duration),
            run_level(session, long_, args.long_clients, args.duration),
        )
        uniform_level = await run_level(session, uniform, args.uniform_clients, args.duration)
    # Clients give up a quarter of the way through a long request (as this run measured it), so every
    # abandoned request is mid-flight whatever this machine's speed.
    give_up_s = max(0.1, mixed_long.latency_s(50) / 4)
    cancellation = await measure_cancellation(url, long_, args.long_clients, give_up_s)
    return {
        "short_alone": level_summary(alone),
        "mixed_short": level_summary(mixed_short),
        "mixed_long": level_summary(mixed_long),
        "mixed_images_per_s": round((mixed_short.images + mixed_long.images) / args.duration, 2),
        "uniform": level_summary(uniform_level),
        "cancellation": cancellation,
    }


async def measure_cancellation(url: str, long_: RequestStream, count: int, give_up_s: float) -> dict:
    """Long requests abandoned by their clients after `give_up_s`: how many the replica cancelled in flight,
    and model calls made after every cancel was seen (0: their rows stopped costing compute)."""
    info = httpx.get(url + "/info", timeout=30).json()["generator"]
    before = info["images"]
    timeout = aiohttp.ClientTimeout(total=give_up_s)
    async with aiohttp.ClientSession(url, timeout=timeout) as session:
        await asyncio.gather(*(send(session, long_.next()) for _ in range(count)), return_exceptions=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = httpx.get(url + "/info", timeout=30).json()["generator"]
        jobs = info["images"]
        gone = (jobs["cancelled_in_flight"] - before["cancelled_in_flight"]) + (
            jobs["cancelled_before_start"] - before["cancelled_before_start"]
        )
        if gone >= count and jobs["running"] == 0:
            break
        await asyncio.sleep(0.05)
    calls_then = sum(info["model_calls_by_batch_size"].values())
    await asyncio.sleep(1.0)  # a window in which no one sends anything: nothing should run
    calls_after = sum(httpx.get(url + "/info", timeout=30).json()["generator"]["model_calls_by_batch_size"].values())
    return {
        "abandoned": count,
        "given_up_after_s": round(give_up_s, 3),
        "cancelled_in_flight": jobs["cancelled_in_flight"] - before["cancelled_in_flight"],
        "cancelled_before_start": jobs["cancelled_before_start"] - before["cancelled_before_start"],
        "completed_anyway": jobs["succeeded"] - before["succeeded"],
        "model_calls_after_cancel": calls_after - calls_then,
    }


def level_summary(level: LevelResult) -> dict:
    return {
        "requests": level.requests,
        "errors": level.errors,
        "images_per_s": round(level.images_per_s, 2),
        "p50_ms": round(level.latency_s(50) * 1000, 1),
        "p95_ms": round(level.latency_s(95) * 1000, 1),
        "mean_batch_size": round(level.mean_batch_size, 2) if not math.isnan(level.mean_batch_size) else None,
    }


def ratios(results: dict) -> dict:
    step, request = results["step"], results["request"]
    return {
        "step: short p95 mixed / alone": round(step["mixed_short"]["p95_ms"] / step["short_alone"]["p95_ms"], 2),
        "request: short p95 mixed / alone": round(
            request["mixed_short"]["p95_ms"] / request["short_alone"]["p95_ms"], 2
        ),
        "mixed images/s step / request": round(step["mixed_images_per_s"] / request["mixed_images_per_s"], 2),
        "uniform images/s step / request": round(
            step["uniform"]["images_per_s"] / request["uniform"]["images_per_s"], 2
        ),
    }


def markdown(results: dict, args, machine: str) -> str:
    lines = [
        f"Mixed traffic on {machine}: {args.short_clients} clients x {args.short_steps}-step requests, "
        f"{args.long_clients} clients x {args.long_steps}-step requests, {args.duration:g} s per phase, "
        f"config {args.config.name}, model {args.model or 'its default'}.",
        "",
        "| engine | short alone p50 / p95 | short with long p50 / p95 | long p50 / p95 | mixed images/s "
        f"| uniform ({args.uniform_clients} clients) images/s | cancelled in flight | model calls after cancel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine in ENGINES:
        r = results[engine]
        lines.append(
            f"| {engine} | {r['short_alone']['p50_ms']:.0f} / {r['short_alone']['p95_ms']:.0f} ms "
            f"| {r['mixed_short']['p50_ms']:.0f} / {r['mixed_short']['p95_ms']:.0f} ms "
            f"| {r['mixed_long']['p50_ms']:.0f} / {r['mixed_long']['p95_ms']:.0f} ms "
            f"| {r['mixed_images_per_s']:.1f} | {r['uniform']['images_per_s']:.1f} "
            f"| {r['cancellation']['cancelled_in_flight']} of {r['cancellation']['abandoned']} "
            f"| {r['cancellation']['model_calls_after_cancel']} |"
        )
    lines += ["", *(f"- {name}: **{value}**" for name, value in ratios(results).items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.mixed_traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--model", default=None, help="serve only this model (an id of the config's or a source)")
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase")
    parser.add_argument("--short-steps", type=int, default=2)
    parser.add_argument("--long-steps", type=int, default=30)
    parser.add_argument("--short-clients", type=int, default=2)
    parser.add_argument("--long-clients", type=int, default=4)
    parser.add_argument("--uniform-clients", type=int, default=16)
    parser.add_argument("--engines", default=",".join(ENGINES), help="which to run, e.g. step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or REPO / "results" / time.strftime("mixed-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    base = with_one_model(yaml.safe_load(args.config.read_text()), args.model)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores"

    results = {}
    for engine in args.engines.split(","):
        config_path = out / f"config-{engine}.yaml"
        config_path.write_text(yaml.safe_dump(engine_config(base, engine), sort_keys=False))
        print(f"{engine} engine: starting {args.config.name} ...", file=sys.stderr)
        with serve_server(config_path, out / f"logs-{engine}") as server:
            results[engine] = asyncio.run(measure_engine(server.url, args))
        print(f"{engine}: {json.dumps(results[engine])}", file=sys.stderr)

    (out / "mixed-traffic.json").write_text(json.dumps(results, indent=2))
    if set(ENGINES) <= set(results):
        text = markdown(results, args, machine)
        (out / "mixed-traffic.md").write_text(text)
        print(text)
        step_ratio = ratios(results)["step: short p95 mixed / alone"]
        verdict = "meets" if step_ratio <= GOAL_SHORT_P95_RATIO else "misses"
        print(f"step engine {verdict} the goal: short p95 with long traffic <= {GOAL_SHORT_P95_RATIO}x alone")
    print(f"results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
