"""Concurrency sweep: closed-loop load at each concurrency level against a running server.

    python -m loadtest.sweep --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16,32,64 --duration 10

At each level, `concurrency` workers each send a request, wait for the answer
and send the next one (a closed loop), for a fixed duration or a fixed number
of requests. Per level: throughput in images/s, latency p50/p95/p99, error
rate, and the batch sizes the server reports (`X-Batch-Size`, or `batch_size`
in JSON responses). Writes sweep.csv, sweep.md and sweep.png to --out.

Throughput counts images whose response arrived inside the level's window;
requests still in flight at the end are awaited (so the next level starts
clean) and their latencies are kept, but their images are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from .traffic import DEFAULT, Request, RequestMix, RequestStream

DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Outcome:
    """What one request got back."""

    latency_s: float
    finished_at: float
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # one per image; 0 where the server does not say
    error: str | None = None


@dataclass
class LevelResult:
    """One concurrency level, summarised."""

    concurrency: int
    requests: int
    errors: int
    images: int  # counted inside the window
    seconds: float  # length of the window
    latencies_s: list[float] = field(repr=False)
    images_returned: int = 0  # all images, those that came back after the window too
    batch_sizes: Counter[int] = field(default_factory=Counter)  # batch size -> images seen at that size
    error_kinds: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # server CPU seconds during the level, by process
    client_cpu_s: float = 0.0  # this process (the load generator), sharing the machine with the server

    def cpu_ms_per_image(self, process: str | None = None) -> float:
        """Server CPU per image made (all its processes, or one): comparable across runs on a busy machine."""
        if not self.cpu_s or not self.images_returned:
            return math.nan
        seconds = self.cpu_s.get(process, 0.0) if process else sum(self.cpu_s.values())
        return seconds * 1000 / self.images_returned

    @property
    def client_cpu_ms_per_image(self) -> float:
        return self.client_cpu_s * 1000 / self.images_returned if self.images_returned else math.nan

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def latency_s(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_s, percentile)) if self.latencies_s else math.nan

    @property
    def mean_batch_size(self) -> float:
        known = {size: n for size, n in self.batch_sizes.items() if size > 0}
        total = sum(known.values())
        return sum(size * n for size, n in known.items()) / total if total else math.nan


def read_outcome(status: int, content_type: str, headers, payload, latency_s: float, finished_at: float) -> Outcome:
    """Images and batch sizes from a response: an image with X-Batch-Size, or JSON listing its images
    (native `images` with `batch_size` each, OpenAI `data`, AUTOMATIC1111 `images` as base64 strings)."""
    if status != 200:
        return Outcome(latency_s, finished_at, error=f"HTTP {status}")
    if content_type.startswith("application/json"):
        images = payload.get("images") or payload.get("data") or []
        sizes = [int(i.get("batch_size", 0)) if isinstance(i, dict) else 0 for i in images]
        return Outcome(latency_s, finished_at, len(images), sizes)
    return Outcome(latency_s, finished_at, 1, [int(headers.get("X-Batch-Size", 0))])


async def send(session: aiohttp.ClientSession, request: Request) -> Outcome:
    started = time.perf_counter()
    try:
        async with session.request(request.method, request.path, json=request.body) as response:
            content_type = response.headers.get("Content-Type", "")
            payload = await response.json() if content_type.startswith("application/json") else await response.read()
            finished = time.perf_counter()
            return read_outcome(response.status, content_type, response.headers, payload, finished - started, finished)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # ValueError: a body that is not valid JSON
        finished = time.perf_counter()
        return Outcome(finished - started, finished, error=type(exc).__name__)


async def run_level(
    session: aiohttp.ClientSession,
    stream: RequestStream,
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
) -> LevelResult:
    """Closed loop with `concurrency` workers for `duration_s` seconds or `requests` requests in all."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give exactly one of duration_s and requests")
    started = time.perf_counter()
    deadline = started + duration_s if duration_s is not None else math.inf
    outcomes: list[Outcome] = []
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (requests is None or sent < requests):
            sent += 1
            outcomes.append(await send(session, stream.next()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if duration_s is not None:
        window_end, seconds = deadline, duration_s
    else:
        window_end = max((o.finished_at for o in outcomes), default=started)
        seconds = window_end - started
    result = LevelResult(concurrency, len(outcomes), 0, 0, seconds, [o.latency_s for o in outcomes])
    for outcome in outcomes:
        result.images_returned += outcome.images
        if outcome.error:
            result.errors += 1
            result.error_kinds[outcome.error] += 1
        elif outcome.finished_at <= window_end:
            result.images += outcome.images
            result.batch_sizes.update(outcome.batch_sizes)
    return result


def make_session(url: str, max_concurrency: int, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max_concurrency, force_close=False)
    return aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def run_sweep(
    url: str,
    levels: list[int],
    mix: RequestMix,
    duration_s: float | None = None,
    requests: int | None = None,
    seed: int = 0,
    warmup_requests: int = 4,
    timeout_s: float = 120,
    progress: bool = True,
    label: str = "server",
    cpu_probe: Callable[[], dict[str, float]] | None = None,
) -> list[LevelResult]:
    """Every level in turn against `url`, after a few untimed requests that warm connections and server.

    `cpu_probe`, if given, returns the server's CPU seconds so far by process; each level records the difference.
    """
    from tqdm import tqdm

    stream = RequestStream(mix, seed=seed)
    results = []
    async with make_session(url, max(levels), timeout_s) as session:
        for _ in range(warmup_requests):
            await send(session, stream.next())
        with tqdm(levels, desc=label, unit="level", disable=not progress, file=sys.stderr) as bar:
            for concurrency in bar:
                bar.set_postfix_str(f"concurrency {concurrency}")
                cpu_before = cpu_probe() if cpu_probe else {}
                client_before = time.process_time()
                result = await run_level(session, stream, concurrency, duration_s, requests)
                result.client_cpu_s = time.process_time() - client_before
                if cpu_probe:
                    cpu_after = cpu_probe()
                    result.cpu_s = {k: round(v - cpu_before.get(k, 0.0), 3) for k, v in cpu_after.items()}
                results.append(result)
                bar.write(f"  {label:>8}  concurrency {concurrency:>3}: {summary(result)}", file=sys.stderr)
    return results


def summary(result: LevelResult) -> str:
    return (
        f"{result.images_per_s:6.1f} images/s  p50 {result.latency_s(50) * 1000:6.0f} ms  "
        f"p95 {result.latency_s(95) * 1000:6.0f} ms  errors {result.error_rate:.1%}  "
        f"mean batch {result.mean_batch_size:.1f}"
        + (f"  server CPU {result.cpu_ms_per_image():.1f} ms/image" if result.cpu_s else "")
    )


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"concurrency levels must be whole numbers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be 1 or more, got {text!r}")
    return levels


def add_mix_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request mix (see loadtest/traffic.py)")
    group.add_argument("--sizes", default=DEFAULT, help='weighted sizes, e.g. "64x64:3,128x128:1" (default: model)')
    group.add_argument("--steps", default=DEFAULT, help='weighted step counts, e.g. "2:3,4:1" (default: model)')
    group.add_argument("--endpoints", default="png", help='weighted endpoints, e.g. "png:7,json:1,openai:1,a1111:1"')
    group.add_argument("--negative-share", type=float, default=0.25, help="share of requests with a negative prompt")
    group.add_argument("--seed", type=int, default=0, help="seed of the request stream")


def mix_from_arguments(args: argparse.Namespace) -> RequestMix:
    try:
        return RequestMix.from_specs(args.sizes, args.steps, args.endpoints, args.negative_share)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=parse_levels, default=list(DEFAULT_LEVELS), help="comma-separated levels")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=None, help="seconds per level (default 10)")
    length.add_argument("--requests", type=int, default=None, help="requests per level instead of a duration")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before one request counts as failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_length(args: argparse.Namespace) -> tuple[float | None, int | None]:
    if args.requests is not None:
        return None, args.requests
    return (args.duration if args.duration is not None else 10.0), None


def main(argv: list[str] | None = None) -> int:
    from . import report

    parser = argparse.ArgumentParser(prog="python -m loadtest.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("results") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    parser.add_argument("--label", default="server", help="name of this server in the report")
    add_run_arguments(parser)
    add_mix_arguments(parser)
    args = parser.parse_args(argv)
    duration_s, requests = run_length(args)
    mix = mix_from_arguments(args)
    results = asyncio.run(
        run_sweep(
            args.url,
            args.concurrency,
            mix,
            duration_s,
            requests,
            seed=args.seed,
            timeout_s=args.timeout,
            progress=not args.no_progress,
            label=args.label,
        )
    )
    series = {args.label: results}
    written = report.write_sweep_report(args.out, series, title=f"Concurrency sweep: {args.url} ({mix.describe()})")
    print(report.sweep_table(series))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
