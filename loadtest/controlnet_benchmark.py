"""ControlNet traffic through the Generator's own step engine, one run: per-row mixing against grouping by ControlNet
set, and what a ControlNet row costs.

    python -m loadtest.controlnet_benchmark                  # synthetic:tiny on CPU, about two minutes
    python -m loadtest.controlnet_benchmark --seconds 30 --clients 24 --steps 8

Closed loop: --clients callers each submit one image, wait for it, and submit the next, for --seconds per scenario,
all in this process (what one Generator replica does, without HTTP). Every third client's requests carry a
ControlNet unit (half of those `edges` at scale 0.5, half `scribble` at 1.0, each with its own control image);
the others carry none:
  1. plain alone:    the plain clients only (no ControlNet clients at all)
  2. all plain:      every client plain (the same load as 3 and 4, without ControlNets)
  3. mixed:          the mixed traffic, rows with either ControlNet and rows without in one UNet call per tick
                     (`pipeline.controlnet_batching: mixed`, the default)
  4. grouped:        the same traffic, only images with the same ControlNet units share a UNet call
Per scenario and class (plain, controlnet): images/s, p50/p95 latency; mean images per UNet call. Then the cost of
a ControlNet row: the time of one step of --rows images stepped together, all plain against all controlled (one
ControlNet; two ControlNets, half each). Writes summary.json and report.md to --out (default
results/controlnet-benchmark-<time>/).

Goals (issue 25): mixed >= 1.3x the images/s of grouped; plain p95 beside ControlNet traffic <= 1.3x plain p95
alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from .models_benchmark import _loop

NETS = (("edges", 0.5), ("scribble", 1.0))
GOAL_THROUGHPUT = 1.3
GOAL_PLAIN_P95 = 1.3


def _model(batching: str, threads: int):
    from serve_app.pipeline.controlnets import ControlNetEntry
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    entries = [ControlNetEntry(name=name, source=f"synthetic:{i + 1}") for i, (name, _) in enumerate(NETS)]
    options = PipelineOptions(device="cpu", torch_threads=threads, controlnet_batching=batching)
    model = LoadedModel.load("synthetic:tiny", options, controlnets=entries)
    model.warmup()
    return model


def control_image(seed: int, size: int) -> np.ndarray:
    """A white box on black at a place drawn from `seed`: a map the ControlNets read."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    x, y = (int(v) for v in rng.integers(0, size // 2, 2))
    image[y : y + size // 3, x : x + size // 4] = 255
    return image


def task_for(client: int, n: int, controlled: bool, args):
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    units, images = [], ()
    if controlled:
        name, scale = NETS[(client // 3) % len(NETS)]
        units, images = [{"name": name, "scale": scale}], (control_image(client * 1000 + n, args.size),)
    params = ImageParams(
        prompt=f"client {client} image {n}",
        seed=client * 100000 + n,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        controlnet=units,
    )
    return ImageTask(params, control_images=images)


def run_scenario(name: str, model, clients: list[int], controlled: set[int], args) -> dict:
    """Closed-loop `clients` (those in `controlled` send ControlNet units) on one step-engine loop, args.seconds."""
    loop, counters = _loop(model, args.max_batch_size)
    latencies: dict[str, list[float]] = {"plain": [], "controlnet": []}
    lock = threading.Lock()
    failures: list[str] = []
    deadline = time.monotonic() + args.seconds

    def client(index: int) -> None:
        n = 0
        kind = "controlnet" if index in controlled else "plain"
        while time.monotonic() < deadline:
            done = threading.Event()
            outcome: list = []
            started = time.perf_counter()
            task = task_for(index, n, index in controlled, args)
            loop.submit(task, lambda result, outcome=outcome, done=done: (outcome.append(result), done.set()))
            done.wait()
            if isinstance(outcome[0], Exception):
                failures.append(repr(outcome[0]))
            else:
                with lock:
                    latencies[kind].append(time.perf_counter() - started)
            n += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in clients]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        loop.stop()
    elapsed = time.perf_counter() - started
    calls = sum(counters.model_calls_by_batch_size.values())
    images_in_calls = sum(size * count for size, count in counters.model_calls_by_batch_size.items())
    result = {
        "scenario": name,
        "clients": len(clients),
        "controlnet_clients": len(controlled & set(clients)),
        "failed": len(failures),
        "images_per_s": round(sum(len(v) for v in latencies.values()) / elapsed, 2),
        "mean_images_per_unet_call": round(images_in_calls / calls, 2) if calls else None,
    }
    for kind, values in latencies.items():
        values.sort()
        result[kind] = {
            "images": len(values),
            "images_per_s": round(len(values) / elapsed, 2),
            "p50_s": round(statistics.median(values), 3) if values else None,
            "p95_s": round(values[int(0.95 * (len(values) - 1))], 3) if values else None,
        }
    if failures:
        result["first_failure"] = failures[0]
    return result


def row_cost(model, args) -> dict:
    """ms per step of --rows images stepped together: all plain, all one ControlNet, half each of two."""
    from serve_app.pipeline.steppers import make_stepper

    stepper, reason = make_stepper(model)
    assert stepper is not None, reason

    def per_step(tasks) -> float:
        prepared = [model.prepare(task)[0] for task in tasks]
        timings = []
        for _ in range(args.repeats):
            states = stepper.start(prepared)
            stepper.step(states)  # the first step also builds the rows' conditioning; not timed
            started = time.perf_counter()
            steps = 0
            while not states[0].done:
                stepper.step(states)
                steps += 1
            timings.append((time.perf_counter() - started) / steps)
        return statistics.median(timings) * 1000

    rows = args.rows
    plain = per_step([task_for(3 * i + 1, 0, False, args) for i in range(rows)])
    one = per_step([task_for(0, i, True, args) for i in range(rows)])
    two = per_step([task_for(3 * (i % 2), i, True, args) for i in range(rows)])
    return {
        "rows": rows,
        "plain_ms_per_step": round(plain, 2),
        "one_controlnet_ms_per_step": round(one, 2),
        "two_controlnets_ms_per_step": round(two, 2),
        "controlnet_row_vs_plain_row": round(one / plain, 2),
        "two_controlnets_vs_plain": round(two / plain, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20, help="per scenario")
    parser.add_argument("--clients", type=int, default=12, help="closed-loop callers; every third sends a ControlNet")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rows", type=int, default=8, help="images per step in the row-cost measurement")
    parser.add_argument("--repeats", type=int, default=5, help="runs of the row-cost measurement (median)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("results") / f"controlnet-benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    mixed, grouped = _model("mixed", args.threads), _model("grouped", args.threads)
    everyone = list(range(args.clients))
    controlled = {i for i in everyone if i % 3 == 0}
    plans = [
        ("plain alone", mixed, [i for i in everyone if i not in controlled], set()),
        ("all plain", mixed, everyone, set()),
        ("mixed", mixed, everyone, controlled),
        ("grouped", grouped, everyone, controlled),
    ]
    results = []
    for name, model, clients, sends_control in plans:
        results.append(run_scenario(name, model, clients, sends_control, args))
        print(json.dumps(results[-1]), flush=True)
    cost = row_cost(mixed, args)
    print(json.dumps(cost), flush=True)
    by_name = {r["scenario"]: r for r in results}
    ratios = {
        "mixed_vs_grouped_images_per_s": round(
            by_name["mixed"]["images_per_s"] / by_name["grouped"]["images_per_s"], 2
        ),
        "plain_p95_mixed_vs_plain_alone": round(
            by_name["mixed"]["plain"]["p95_s"] / by_name["plain alone"]["plain"]["p95_s"], 2
        ),
        "plain_p95_mixed_vs_all_plain": round(
            by_name["mixed"]["plain"]["p95_s"] / by_name["all plain"]["plain"]["p95_s"], 2
        ),
        "plain_p95_grouped_vs_plain_alone": round(
            by_name["grouped"]["plain"]["p95_s"] / by_name["plain alone"]["plain"]["p95_s"], 2
        ),
    }
    goals = {
        f"mixed >= {GOAL_THROUGHPUT}x grouped images/s": ratios["mixed_vs_grouped_images_per_s"] >= GOAL_THROUGHPUT,
        f"plain p95 beside ControlNet <= {GOAL_PLAIN_P95}x alone": ratios["plain_p95_mixed_vs_plain_alone"]
        <= GOAL_PLAIN_P95,
    }
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
        "row_cost": cost,
        "ratios": ratios,
        "goals_met": goals,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary, args))
    print((out / "report.md").read_text())
    return 0


def report(summary: dict, args) -> str:
    def cell(kind: dict, key: str):
        return kind[key] if kind[key] is not None else "-"

    rows = "".join(
        f"| {r['scenario']} | {r['clients']} ({r['controlnet_clients']}) | {r['images_per_s']} "
        f"| {cell(r['plain'], 'images_per_s')} | {cell(r['plain'], 'p50_s')} | {cell(r['plain'], 'p95_s')} "
        f"| {cell(r['controlnet'], 'images_per_s')} | {cell(r['controlnet'], 'p50_s')} "
        f"| {cell(r['controlnet'], 'p95_s')} | {r['mean_images_per_unet_call']} | {r['failed']} |\n"
        for r in summary["results"]
    )
    cost = summary["row_cost"]
    ratios = "\n".join(f"- {name}: {value}" for name, value in summary["ratios"].items())
    goals = "\n".join(f"- {name}: {'met' if met else 'NOT met'}" for name, met in summary["goals_met"].items())
    return (
        f"# ControlNet benchmark\n\n{args.clients} closed-loop clients (every third with a ControlNet unit: edges "
        f"0.5 / scribble 1.0), {args.seconds:g} s per scenario, synthetic:tiny {args.size}x{args.size}, {args.steps} "
        f"steps, max batch {args.max_batch_size}, {args.threads} torch thread(s).\n\n"
        "| scenario | clients (ControlNet) | images/s | plain images/s | plain p50 s | plain p95 s | ControlNet images/s "
        "| ControlNet p50 s | ControlNet p95 s | images per UNet call | failed |\n"
        f"|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n"
        f"One step of {cost['rows']} images: plain {cost['plain_ms_per_step']} ms, one ControlNet "
        f"{cost['one_controlnet_ms_per_step']} ms ({cost['controlnet_row_vs_plain_row']}x), two ControlNets "
        f"{cost['two_controlnets_ms_per_step']} ms ({cost['two_controlnets_vs_plain']}x).\n\n{ratios}\n\n{goals}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
