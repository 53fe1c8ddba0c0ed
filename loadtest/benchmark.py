"""Side-by-side benchmark in one run: raw pipeline, this server, and an unbatched baseline.

    python -m loadtest.benchmark                      # synthetic:tiny on CPU (configs/cpu-demo.yaml), a few minutes
    python -m loadtest.benchmark --model synthetic:sd-turbo --device cuda   # GPU box

Same model, same machine, same request mix, one after the other:
  1. raw pipeline in this process at batch sizes 1, 2, 4, 8, 16; the best images/s is the ceiling
     (measured again at the end; the faster pass counts at each batch size);
  2. this server (`serve_local` on a free port, from --config), under the concurrency sweep;
  3. the unbatched baseline (loadtest/baseline_server.py, uvicorn), under the same sweep.
The raw pipeline and the baseline use the config's torch thread count, like the server's generator.
Prints, per concurrency, server/ceiling and server/baseline throughput, and the
serving overhead: server median latency at concurrency 1 minus the raw batch-1 call.
Everything lands in --out (default results/benchmark-<time>/).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from . import report
from .raw_pipeline import RawResult, measure
from .servers import REPO, baseline_server, serve_server, with_one_model
from .sweep import (
    LevelResult,
    add_mix_arguments,
    add_run_arguments,
    mix_from_arguments,
    parse_levels,
    run_length,
    run_sweep,
)
from .traffic import NATIVE_ENDPOINTS

CPU_CONFIG = REPO / "configs" / "cpu-demo.yaml"
GPU_CONFIG = REPO / "configs" / "synthetic-sd-turbo-gpu.yaml"
TARGET_CONCURRENCY = 16
TARGET_OF_CEILING = 0.8
TARGET_OF_BASELINE = 2.0
TARGET_OVERHEAD_S = 0.025  # plus the configured batch wait


@dataclass
class ServedModel:
    """What the config serves: the raw pipeline and the baseline load the same."""

    model: str
    pipeline: dict  # args.pipeline: device, dtype, torch threads, optimisations
    defaults: dict  # args.defaults: what requests get for parameters they leave out

    @classmethod
    def of(cls, config: dict) -> ServedModel:
        args = config["applications"][0].get("args", {})
        pipeline = dict(args.get("pipeline", {}))
        if pipeline.get("device", "auto") == "auto":
            from serve_app.pipeline.loading import resolve_device

            pipeline["device"] = resolve_device("auto")
        return cls(args.get("model", "synthetic:tiny"), pipeline, dict(args.get("defaults", {})))

    @property
    def device(self) -> str:
        return self.pipeline["device"]

    @property
    def threads(self) -> int | None:
        return self.pipeline.get("torch_threads")


def served_config(path: Path, model: str | None, device: str | None) -> dict:
    """The config file with --model / --device applied to its args."""
    config = with_one_model(copy.deepcopy(yaml.safe_load(path.read_text())), model)
    args = config["applications"][0]["args"]
    if device:
        args.setdefault("pipeline", {})["device"] = device
    return config


@dataclass
class Comparison:
    raw: list[RawResult]
    server: list[LevelResult]
    baseline: list[LevelResult]
    batch_wait_s: float

    @property
    def best_raw(self) -> RawResult:
        return max(self.raw, key=lambda r: r.images_per_s)

    @property
    def ceiling(self) -> float:
        return self.best_raw.images_per_s

    def at(self, results: list[LevelResult], concurrency: int) -> LevelResult | None:
        return next((r for r in results if r.concurrency == concurrency), None)

    @property
    def overhead_s(self) -> float:
        """Server median latency at concurrency 1 minus one raw batch-1 call."""
        single = self.at(self.server, 1)
        raw_single = next((r for r in self.raw if r.batch_size == 1), None)
        if single is None or raw_single is None:
            return math.nan
        return single.latency_s(50) - raw_single.ms_per_call / 1000

    def ratio_rows(self) -> list[dict]:
        rows = []
        for server in self.server:
            baseline = self.at(self.baseline, server.concurrency)
            base_rate = baseline.images_per_s if baseline else math.nan
            rows.append(
                {
                    "concurrency": server.concurrency,
                    "server_images_per_s": round(server.images_per_s, 2),
                    "baseline_images_per_s": round(base_rate, 2),
                    "server_over_ceiling": round(server.images_per_s / self.ceiling, 3),
                    "server_over_baseline": round(server.images_per_s / base_rate, 3) if base_rate else math.nan,
                    "server_p95_ms": round(server.latency_s(95) * 1000, 1),
                    "baseline_p95_ms": round(baseline.latency_s(95) * 1000, 1) if baseline else math.nan,
                    "server_mean_batch": round(server.mean_batch_size, 2),
                    "server_cpu_ms_per_image": round(server.cpu_ms_per_image(), 2),
                    "baseline_cpu_ms_per_image": round(baseline.cpu_ms_per_image(), 2) if baseline else math.nan,
                    "server_error_rate": round(server.error_rate, 4),
                    "baseline_error_rate": round(baseline.error_rate, 4) if baseline else math.nan,
                }
            )
        return rows

    def ratio_table(self) -> str:
        headers = [
            "concurrency",
            "server images/s",
            "baseline images/s",
            "server / ceiling",
            "server / baseline",
            "server p95 ms",
            "baseline p95 ms",
            "server mean batch",
            "CPU ms/image (server / baseline)",
            "errors (server / baseline)",
        ]
        rows = [
            [
                row["concurrency"],
                row["server_images_per_s"],
                row["baseline_images_per_s"],
                row["server_over_ceiling"],
                row["server_over_baseline"],
                row["server_p95_ms"],
                row["baseline_p95_ms"],
                row["server_mean_batch"],
                f"{row['server_cpu_ms_per_image']:.1f} / {row['baseline_cpu_ms_per_image']:.1f}",
                f"{row['server_error_rate']:.1%} / {row['baseline_error_rate']:.1%}",
            ]
            for row in self.ratio_rows()
        ]
        return report.markdown(headers, rows)

    def targets(self) -> list[str]:
        lines = []
        server = self.at(self.server, TARGET_CONCURRENCY)
        baseline = self.at(self.baseline, TARGET_CONCURRENCY)
        if server:
            ratio = server.images_per_s / self.ceiling
            lines.append(
                f"server / ceiling at concurrency {TARGET_CONCURRENCY}: {ratio:.2f} "
                f"(target >= {TARGET_OF_CEILING}: {'met' if ratio >= TARGET_OF_CEILING else 'MISSED'})"
            )
        if server and baseline and baseline.images_per_s:
            ratio = server.images_per_s / baseline.images_per_s
            lines.append(
                f"server / baseline at concurrency {TARGET_CONCURRENCY}: {ratio:.2f} "
                f"(target >= {TARGET_OF_BASELINE}: {'met' if ratio >= TARGET_OF_BASELINE else 'MISSED'})"
            )
        limit = TARGET_OVERHEAD_S + self.batch_wait_s
        met = self.overhead_s <= limit
        lines.append(
            f"serving overhead at concurrency 1: {self.overhead_s * 1000:.1f} ms "
            f"(target <= {limit * 1000:.0f} ms = 25 ms + batch wait {self.batch_wait_s * 1000:.0f} ms: "
            f"{'met' if met else 'MISSED'})"
        )
        return lines

    def summary(self) -> dict:
        return {
            "ceiling_images_per_s": round(self.ceiling, 2),
            "ceiling_batch_size": self.best_raw.batch_size,
            "raw_batch1_ms": next((round(r.ms_per_call, 2) for r in self.raw if r.batch_size == 1), None),
            "raw_cpu_ms_per_image_at_ceiling": round(self.best_raw.cpu_ms_per_image, 2),
            "serving_overhead_ms": round(self.overhead_s * 1000, 1),
            "batch_wait_ms": round(self.batch_wait_s * 1000, 1),
            "ratios": self.ratio_rows(),
            "targets": self.targets(),
        }


def best_per_batch_size(first: list[RawResult], second: list[RawResult]) -> list[RawResult]:
    """The faster of two raw passes at each batch size."""
    return [max(a, b, key=lambda r: r.images_per_s) for a, b in zip(first, second)]


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "?"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def write_results(out: Path, comparison: Comparison, title: str, header: list[str]) -> list[Path]:
    series = {"server": comparison.server, "baseline": comparison.baseline}
    raw_rows = [
        {
            "batch_size": r.batch_size,
            "calls": r.calls,
            "images": r.images,
            "seconds": round(r.seconds, 3),
            "ms_per_call": round(r.ms_per_call, 2),
            "images_per_s": round(r.images_per_s, 2),
        }
        for r in comparison.raw
    ]
    paths = report.write_sweep_report(out, series, title, ceiling=comparison.ceiling)
    paths.append(report.write_csv(out / "raw.csv", raw_rows))
    paths.append(report.write_csv(out / "ratios.csv", comparison.ratio_rows()))
    (out / "summary.json").write_text(json.dumps(comparison.summary(), indent=2) + "\n")
    text = [f"# {title}", "", *header, "", "## Raw pipeline (in-process)", "", report.raw_table(comparison.raw)]
    text += ["", "## Server and baseline under the sweep", "", report.sweep_table(series)]
    text += ["", "## Ratios", "", comparison.ratio_table(), "", "## Targets", ""]
    text += [f"- {line}" for line in comparison.targets()]
    (out / "benchmark.md").write_text("\n".join(text) + "\n")
    return [*paths, out / "summary.json", out / "benchmark.md"]


def batch_wait_of(url: str) -> float:
    info = httpx.get(url + "/info", timeout=30).json()
    return float(info["generator"]["batching"]["batch_wait_timeout_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--config", type=Path, help="Serve config of the server (default: cpu-demo, or the GPU one)")
    parser.add_argument("--model", help="override the config's model (e.g. synthetic:sd-turbo)")
    parser.add_argument("--device", help="override the config's device (cpu, cuda)")
    parser.add_argument("--url", help="benchmark an already running server at this URL instead of starting one")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="raw pipeline batch sizes")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw batch size")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default results/benchmark-<time>)")
    add_run_arguments(parser)
    add_mix_arguments(parser)
    args = parser.parse_args(argv)
    batch_sizes = parse_levels(args.batch_sizes)
    duration_s, requests = run_length(args)
    mix = mix_from_arguments(args)
    if not set(mix.endpoints.choices) <= set(NATIVE_ENDPOINTS):
        parser.error(f"--endpoints: the baseline speaks only {', '.join(NATIVE_ENDPOINTS)}; the mix must too")
    config_path = args.config or (GPU_CONFIG if (args.device or "").startswith("cuda") else CPU_CONFIG)
    config = served_config(config_path, args.model, args.device)
    served = ServedModel.of(config)
    out = args.out or REPO / "results" / time.strftime("benchmark-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()

    def sweep(url: str, label: str, cpu_probe=None) -> list[LevelResult]:
        return asyncio.run(
            run_sweep(
                url,
                args.concurrency,
                mix,
                duration_s,
                requests,
                seed=args.seed,
                timeout_s=args.timeout,
                progress=not args.no_progress,
                label=label,
                cpu_probe=cpu_probe,
            )
        )

    def raw_pass() -> list[RawResult]:
        return measure(served.model, served.pipeline, batch_sizes, mix, served.defaults, args.raw_seconds)

    load_before = os.getloadavg()[0]
    print(f"model {served.model} on {served.device}, torch threads {served.threads}; mix: {mix.describe()}")
    print(f"1/4 raw pipeline, batch sizes {batch_sizes} ...", flush=True)
    raw_first = raw_pass()
    print(report.raw_table(raw_first), flush=True)

    print(f"2/4 server ({'at ' + args.url if args.url else config_path.name + ' on a free port'}) ...", flush=True)
    if args.url:
        batch_wait_s = batch_wait_of(args.url)
        server_results = sweep(args.url, "server")
    else:
        with serve_server(out / "config.yaml", out) as server:
            batch_wait_s = batch_wait_of(server.url)
            server_results = sweep(server.url, "server", server.cpu_seconds)

    print("3/4 unbatched baseline ...", flush=True)
    baseline = baseline_server(
        served.model, served.device, out, served.threads, served.pipeline.get("dtype", "auto"), served.defaults
    )
    with baseline:
        baseline_results = sweep(baseline.url, "baseline", baseline.cpu_seconds)

    print("4/4 raw pipeline again (the better of the two passes counts: a busy moment never lowers the ceiling)")
    raw = best_per_batch_size(raw_first, raw_pass())
    comparison = Comparison(raw, server_results, baseline_results, batch_wait_s)
    length = f"{duration_s:g} s per level" if duration_s else f"{requests} requests per level"
    title = f"Benchmark: {served.model} on {served.device}"
    header = [
        f"- machine: {machine()}",
        f"- server config: {config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path}"
        + (f" with model={args.model}" if args.model else "")
        + (f" device={args.device}" if args.device else ""),
        f"- torch threads (raw, baseline, generator): {served.threads}",
        f"- request mix: {mix.describe()}; {length}; closed loop",
        f"- command: python -m loadtest.benchmark {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"- wall time: {time.perf_counter() - started:.0f} s; machine load (1-minute average) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    ]
    written = write_results(out, comparison, title, header)
    print("\n" + comparison.ratio_table())
    print(f"\nceiling: {comparison.ceiling:.1f} images/s (raw batch {comparison.best_raw.batch_size})")
    for line in comparison.targets():
        print(line)
    print(f"\nwrote {out}/ ({', '.join(p.name for p in written)}) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
