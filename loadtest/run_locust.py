"""Run the Locust suite headless, as its own process, against a URL; writes Locust's CSV and HTML report.

    python -m loadtest.run_locust --url http://127.0.0.1:8000 --load-profile spike --peak-users 32 --stage-seconds 20

Locust runs in a child process because it patches the standard library with
gevent on import, which breaks other libraries loaded in the same process.
The load shape stops by itself after its last stage; a time limit on the child
process backs that up. Anything after `--` goes to Locust unchanged.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from .servers import REPO
from .shapes import PROFILES, total_seconds
from .traffic import DEFAULT, REALISTIC_ENDPOINTS

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.url,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        "30",  # let requests in flight finish when a stage lowers the user count
        "--load-profile",
        args.load_profile,
        "--peak-users",
        str(args.peak_users),
        "--stage-seconds",
        str(args.stage_seconds),
        "--mix-sizes",
        args.sizes,
        "--mix-steps",
        args.steps,
        "--mix-endpoints",
        args.endpoints,
        "--mix-negative-share",
        str(args.negative_share),
        *args.locust_args,
    ]


def aggregated_stats(out: Path) -> dict | None:
    """The "Aggregated" row of Locust's locust_stats.csv."""
    path = out / "locust_stats.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        return next((row for row in csv.DictReader(handle) if row["Name"] == "Aggregated"), None)


def run(args: argparse.Namespace) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    limit_s = total_seconds(args.load_profile, args.stage_seconds) + 60
    started = time.monotonic()
    try:
        completed = subprocess.run(locust_command(args, out), cwd=REPO, timeout=limit_s)
        code = completed.returncode
    except subprocess.TimeoutExpired:
        print(f"locust did not stop within {limit_s:.0f}s and was stopped", file=sys.stderr)
        code = 124
    stats = aggregated_stats(out)
    if stats:
        print(
            f"{stats['Request Count']} requests, {stats['Failure Count']} failed, "
            f"{float(stats['Requests/s']):.1f} req/s, median {stats['50%']} ms, p95 {stats['95%']} ms, "
            f"p99 {stats['99%']} ms in {time.monotonic() - started:.0f}s"
        )
    written = sorted(p.name for p in out.iterdir() if p.name.startswith("locust") or p.name == "report.html")
    print(f"wrote {out}/: {', '.join(written) or 'nothing'}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run_locust", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--load-profile", choices=sorted(PROFILES), default="ramp", help="loadtest/shapes.py")
    parser.add_argument("--peak-users", type=int, default=16)
    parser.add_argument("--stage-seconds", type=float, default=20)
    parser.add_argument("--sizes", default=DEFAULT, help='weighted sizes, e.g. "64x64:3,128x128:1"')
    parser.add_argument("--steps", default=DEFAULT, help='weighted step counts, e.g. "2:3,4:1"')
    parser.add_argument("--endpoints", default=REALISTIC_ENDPOINTS, help="weighted endpoints (traffic.ENDPOINTS)")
    parser.add_argument("--negative-share", type=float, default=0.25, help="share of requests with a negative prompt")
    parser.add_argument("--out", type=Path, default=Path("results") / time.strftime("locust-%Y%m%d-%H%M%S"))
    parser.add_argument("locust_args", nargs="*", help="after --: passed to locust as they are")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
