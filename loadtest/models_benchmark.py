"""Several models and LoRA adapters against one model, through the Generator's own engine loops, one run.

    python -m loadtest.models_benchmark                     # synthetic:tiny on CPU, about two minutes
    python -m loadtest.models_benchmark --seconds 30 --clients 32 --steps 8

Closed loop: --clients callers each submit one image, wait for it, and submit the next, for
--seconds per scenario, all in this process (what one Generator replica does, without HTTP):
  1. one model, no adapters (the reference);
  2. two models (same architecture, other weights), traffic split evenly: one engine loop each
     (batches never mix models), sharing the machine, as two models on one replica do;
  3. one model, traffic spread over 4 adapters and none (a fifth each), adapters MIXED in one
     UNet call (per-row scales, `loras.batching: mixed`);
  4. the same traffic GROUPED: only images with the same adapter set share a UNet call.
Per scenario: images/s, p50/p95 latency, mean images per UNet call, adapter loads; and the
ratios to scenario 1. Writes summary.json and report.md to --out (default
results/models-benchmark-<time>/).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

ADAPTER_NAMES = ["ink", "neon", "clay", "glass"]


def _model(seed: int, batching: str, threads: int):
    from serve_app.pipeline.adapters import AdapterSettings, SyntheticAdapter
    from serve_app.pipeline.loading import PipelineOptions
    from serve_app.pipeline.model import LoadedModel

    adapters = AdapterSettings(
        synthetic=[SyntheticAdapter(name=name, seed=i + 1) for i, name in enumerate(ADAPTER_NAMES)], batching=batching
    )
    options = PipelineOptions(device="cpu", torch_threads=threads, seed=seed)
    model = LoadedModel.load("synthetic:tiny", options, adapters=adapters)
    model.warmup()
    return model


def _loop(model, max_batch_size: int):
    from serve_app.pipeline.engines import EngineLimits, EngineLoop, LoopCounters, make_engine

    counters = LoopCounters()
    limits = EngineLimits(max_batch_size=max_batch_size, max_active_requests=4 * max_batch_size)
    return EngineLoop(make_engine(model, "step", limits, counters), model.prepare), counters


def run_scenario(name: str, loops: list, adapters: bool, args) -> dict:
    """Closed-loop clients over `loops` (client i uses loop i % len(loops)) for args.seconds."""
    from serve_app.pipeline.params import ImageParams
    from serve_app.pipeline.tasks import ImageTask

    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    failures = []

    def client(index: int) -> None:
        rng = random.Random(index)
        loop = loops[index % len(loops)][0]
        n = 0
        while time.monotonic() < deadline:
            choice = rng.randrange(len(ADAPTER_NAMES) + 1) if adapters else len(ADAPTER_NAMES)
            loras = [] if choice == len(ADAPTER_NAMES) else [{"name": ADAPTER_NAMES[choice], "scale": 0.8}]
            job = ImageTask(
                ImageParams(
                    prompt=f"client {index} image {n}",
                    seed=index * 100000 + n,
                    width=args.size,
                    height=args.size,
                    num_inference_steps=args.steps,
                    loras=loras,
                )
            )
            done = threading.Event()
            outcome = []
            started = time.perf_counter()
            loop.submit(job, lambda result, outcome=outcome, done=done: (outcome.append(result), done.set()))
            done.wait()
            if isinstance(outcome[0], Exception):
                failures.append(repr(outcome[0]))
            else:
                with lock:
                    latencies.append(time.perf_counter() - started)
            n += 1

    before = [dict(counters.model_calls_by_batch_size) for _, counters in loops]
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    calls = images_in_calls = 0
    for (_, counters), seen in zip(loops, before):
        for size, count in counters.model_calls_by_batch_size.items():
            new = count - seen.get(size, 0)
            calls += new
            images_in_calls += size * new
    latencies.sort()
    return {
        "scenario": name,
        "images": len(latencies),
        "failed": len(failures),
        "images_per_s": round(len(latencies) / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "mean_images_per_unet_call": round(images_in_calls / calls, 2) if calls else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per engine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("results") / f"models-benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)

    results = []
    mixed = _model(0, "mixed", args.threads)
    grouped = _model(0, "grouped", args.threads)
    other = _model(1, "mixed", args.threads)
    plans = [
        ("one model", [mixed], False),
        ("two models", [mixed, other], False),
        ("4 adapters, mixed", [mixed], True),
        ("4 adapters, grouped", [grouped], True),
    ]
    for name, models, adapters in plans:
        loops = [_loop(model, args.max_batch_size) for model in models]
        try:
            results.append(run_scenario(name, loops, adapters, args))
        finally:
            for loop, _ in loops:
                loop.stop()
        print(json.dumps(results[-1]), flush=True)
    reference = results[0]
    for result in results:
        result["images_per_s_vs_one_model"] = round(result["images_per_s"] / reference["images_per_s"], 2)
        result["p95_vs_one_model"] = round(result["p95_s"] / reference["p95_s"], 2)
    loads = {"mixed": mixed.adapters.describe(), "grouped": grouped.adapters.describe()}
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "adapters": loads}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    header = "| scenario | images/s | × one model | p50 s | p95 s | × p95 | images per UNet call | failed |\n"
    rows = "".join(
        f"| {r['scenario']} | {r['images_per_s']} | {r['images_per_s_vs_one_model']} | {r['p50_s']} | {r['p95_s']} "
        f"| {r['p95_vs_one_model']} | {r['mean_images_per_unet_call']} | {r['failed']} |\n"
        for r in results
    )
    (out / "report.md").write_text(
        f"# Models and adapters benchmark\n\n{args.clients} closed-loop clients, {args.seconds:g} s per scenario, "
        f"synthetic:tiny {args.size}x{args.size}, {args.steps} steps, max batch {args.max_batch_size}.\n\n"
        f"{header}|---|---|---|---|---|---|---|---|\n{rows}\nAdapter loads: {json.dumps(loads)}\n"
    )
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
