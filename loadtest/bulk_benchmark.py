"""Bulk generation against the raw engine and the HTTP path: same machine, same rows, one run.

    python -m loadtest.bulk_benchmark                                   # synthetic:tiny on CPU, a few minutes
    python -m loadtest.bulk_benchmark --rows 4000 --steps "2:3,4:1" --no-http   # mixed rows, engines compared

One after the other, from one Serve config (default configs/cpu-demo.yaml: its model,
pipeline options and defaults everywhere):
  1. the raw engine (`loadtest.raw_pipeline`: `LoadedModel.generate` in this process) at batch
     sizes 1..16 on the same request mix; its best images/s is the ceiling (measured again
     at the end; the faster pass counts at each batch size);
  2. `python -m serve_app.bulk` on a JSONL file of --rows rows drawn from the mix, once per
     --engines, with --max-batch-size at the raw engine's best batch size. Images/s from the
     manifest: from the first row finished to the last (start-up aside, as the ceiling leaves
     model loading aside), and end to end (the command's wall time, Ray's start included);
  3. `sd-serve prompts` through the demo server (`serve run` of the config on a free port) on
     the same prompts, at --concurrency, its own images/s. It sends one set of parameters
     for every line, so it runs only when the mix has one size and one step count.
Writes summary.json and report.md to --out (default results/bulk-benchmark-<time>/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import report
from .benchmark import ServedModel
from .raw_pipeline import RawResult, measure
from .servers import REPO, serve_server, session_cpu_seconds
from .sweep import add_mix_arguments, mix_from_arguments, parse_levels
from .traffic import DEFAULT, RequestMix, RequestStream

CPU_CONFIG = REPO / "configs" / "cpu-demo.yaml"
TARGET_OF_CEILING = 0.9
ROW_FIELDS = ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "seed")


def write_rows(path: Path, mix: RequestMix, rows: int, seed: int) -> list[dict]:
    """JSONL rows drawn from the request mix (the raw engine draws its jobs from the same stream)."""
    stream = RequestStream(mix, seed=seed)
    drawn = []
    for _ in range(rows):
        body = stream.next().body
        drawn.append({k: v for k, v in body.items() if k in ROW_FIELDS})
    path.write_text("".join(json.dumps(row) + "\n" for row in drawn))
    return drawn


def run_bulk(
    rows_file: Path, out: Path, config: Path, engine: str, max_batch_size: int, log: Path, extra: list[str]
) -> dict:
    """One bulk run as a user runs it; images/s from its manifest and its wall time."""
    import pyarrow.parquet as pq

    command = [sys.executable, "-m", "serve_app.bulk", str(rows_file), str(out), "--config", str(config)]
    command += ["--engine", engine, "--max-batch-size", str(max_batch_size), "-q", *extra]
    started = time.perf_counter()
    cpu: dict[str, float] = {}
    with log.open("w") as output:
        # Its own session: the CPU of its processes (driver, Ray's daemons, workers) is summed from /proc.
        process = subprocess.Popen(
            command, cwd=REPO, env=_env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        while process.poll() is None:
            for name, seconds in session_cpu_seconds(process.pid).items():
                if name != "?":  # a process that is ending (no command line left): counted under its name
                    cpu[name] = max(cpu.get(name, 0.0), seconds)  # its last reading before it ends
            time.sleep(0.5)
    wall_s = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"bulk ({engine}) exited with {process.returncode}; see {log}")
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    finished = manifest["finished_at"].sort_values()
    first, last = finished.iloc[0], finished.iloc[-1]
    after_first = int((finished > first).sum())  # the rows of the first call finish together
    span_s = (last - first).total_seconds()
    images = int(manifest["num_images"].sum())
    return {
        "engine": engine,
        "rows": len(manifest),
        "images": images,
        "failed": int((manifest["status"] != "done").sum()),
        "steady_images_per_s": after_first / span_s if span_s > 0 else float("nan"),
        "end_to_end_images_per_s": images / wall_s,
        "wall_s": round(wall_s, 1),
        "mean_batch": round(float(manifest["batch_size"].mean()), 2),
        "worker_cpu_ms_per_image": 1000 * sum(v for k, v in cpu.items() if k.startswith("MapWorker")) / images,
        "cpu_ms_per_image": 1000 * sum(cpu.values()) / images,
        "cpu_s_by_process": {k: round(v, 1) for k, v in sorted(cpu.items(), key=lambda item: -item[1])},
    }


def run_http(config: Path, prompts: list[str], out: Path, concurrency: int, params: list[str]) -> dict:
    """`sd-serve prompts` through the demo server; its own summary line gives images/s."""
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(p.replace("\n", " ") + "\n" for p in prompts))
    with serve_server(config, out / "logs") as server:
        command = [sys.executable, "-m", "serve_app.cli", "--url", server.url, "prompts", str(prompts_file)]
        command += ["--out-dir", str(out / "http-images"), "--concurrency", str(concurrency), "-q", *params]
        done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"sd-serve prompts exited with {done.returncode}:\n{done.stderr[-2000:]}")
    match = re.search(r"(\d+) images? written .* in ([\d.]+) s \(([\d.]+) images/s\)", done.stdout)
    if not match:
        raise RuntimeError(f"no summary in sd-serve prompts's output:\n{done.stdout[-2000:]}")
    return {"images": int(match[1]), "seconds": float(match[2]), "images_per_s": float(match[3])}


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def best_of(first: list[RawResult], second: list[RawResult]) -> list[RawResult]:
    by_size = {r.batch_size: r for r in first}
    for r in second:
        if r.batch_size not in by_size or r.images_per_s > by_size[r.batch_size].images_per_s:
            by_size[r.batch_size] = r
    return [by_size[size] for size in sorted(by_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bulk_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CPU_CONFIG, help="Serve config: model, pipeline, defaults")
    parser.add_argument("--rows", type=int, default=3000, help="rows in the bulk input (default 3000)")
    parser.add_argument("--engines", default="step,request", help="bulk engines to run (default: step,request)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine, alternated (default 1)")
    parser.add_argument("--batch-sizes", type=parse_levels, default=[1, 2, 4, 8, 16], help="raw engine batch sizes")
    parser.add_argument("--seconds", type=float, default=4.0, help="raw engine: seconds per batch size")
    parser.add_argument("--concurrency", type=int, default=16, help="sd-serve prompts: requests in flight")
    parser.add_argument("--no-http", action="store_true", help="leave out sd-serve prompts through the server")
    parser.add_argument("--bulk-args", default="", help="more options for serve_app.bulk, e.g. '--no-sort'")
    parser.add_argument("--out", type=Path, default=Path("results") / time.strftime("bulk-benchmark-%Y%m%d-%H%M%S"))
    add_mix_arguments(parser)
    args = parser.parse_args(argv)
    mix = mix_from_arguments(args)
    config = yaml.safe_load(args.config.read_text())
    served = ServedModel.of(config)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]

    print(f"raw engine ({served.model}, {served.device}, threads {served.threads}) ...", flush=True)
    raw = measure(served.model, served.pipeline, args.batch_sizes, mix, served.defaults, args.seconds, seed=args.seed)
    best = max(raw, key=lambda r: r.images_per_s)

    rows_file = args.out / "rows.jsonl"
    rows = write_rows(rows_file, mix, args.rows, args.seed)
    bulk = []
    for round_ in range(1, args.rounds + 1):  # engines alternate, so a change in the machine's load hits both
        for engine in args.engines.split(","):
            print(
                f"bulk, {engine} engine, {args.rows} rows, max batch {best.batch_size}, round {round_} ...", flush=True
            )
            name = f"bulk-{engine}-{round_}"
            result = run_bulk(
                rows_file, args.out / name, args.config, engine, best.batch_size, args.out / f"{name}.log",
                args.bulk_args.split(),
            )  # fmt: skip
            bulk.append({**result, "round": round_})

    http = None
    uniform = len(mix.sizes.choices) == 1 and len(mix.steps.choices) == 1
    if not args.no_http and uniform:
        print(f"sd-serve prompts through the server, concurrency {args.concurrency} ...", flush=True)
        params = []
        if mix.sizes.choices[0] != DEFAULT:
            params += ["--size", mix.sizes.choices[0]]
        if mix.steps.choices[0] != DEFAULT:
            params += ["--steps", mix.steps.choices[0]]
        http = run_http(args.config, [row["prompt"] for row in rows], args.out, args.concurrency, params)

    print("raw engine again ...", flush=True)
    raw_after = measure(
        served.model, served.pipeline, args.batch_sizes, mix, served.defaults, args.seconds, seed=args.seed
    )
    raw = best_of(raw, raw_after)
    ceiling = max(r.images_per_s for r in raw)

    lines = [
        f"# Bulk benchmark ({served.model}, {served.device}, torch threads {served.threads})",
        "",
        f"- command: python -m loadtest.bulk_benchmark {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
        f"- rows: {args.rows}; sizes {args.sizes}, steps {args.steps}; machine load (1-minute average) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "",
        "## Raw engine (the ceiling)",
        "",
        report.raw_table(raw),
        "",
        "## Bulk and HTTP against the ceiling",
        "",
    ]
    headers = [
        "path",
        "images/s (steady)",
        "/ ceiling",
        "images/s (end to end)",
        "wall s",
        "mean batch",
        "CPU ms/image (worker / all)",
    ]
    table = [
        [
            f"bulk ({r['engine']} engine, round {r['round']})",
            round(r["steady_images_per_s"], 2),
            round(r["steady_images_per_s"] / ceiling, 3),
            round(r["end_to_end_images_per_s"], 2),
            r["wall_s"],
            r["mean_batch"],
            f"{r['worker_cpu_ms_per_image']:.1f} / {r['cpu_ms_per_image']:.1f}",
        ]
        for r in bulk
    ]
    if http:
        table.append(
            [
                f"sd-serve prompts (HTTP, concurrency {args.concurrency})",
                http["images_per_s"],
                round(http["images_per_s"] / ceiling, 3),
                http["images_per_s"],
                http["seconds"],
                "",
                "",
            ]
        )
    lines += [report.markdown(headers, table), ""]
    for r in bulk:
        ratio = r["steady_images_per_s"] / ceiling
        verdict = "met" if ratio >= TARGET_OF_CEILING else "MISSED"
        lines.append(
            f"bulk ({r['engine']}, round {r['round']}) / ceiling: {ratio:.2f} (target >= {TARGET_OF_CEILING}: {verdict})"
        )
        if http:
            lines.append(
                f"bulk ({r['engine']}) / sd-serve prompts: {r['steady_images_per_s'] / http['images_per_s']:.2f}"
            )
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    summary = {
        "ceiling": ceiling,
        "raw": [vars(r) for r in raw],
        "bulk": bulk,
        "http": http,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
