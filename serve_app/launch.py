"""`make serve`: check a Serve config, start `serve run` on it, and say where to go once it answers.

    python -m serve_app.launch configs/cpu-demo.yaml

Before starting: the config's coherence (`python -m serve_app.config`) and whether this machine has
the GPUs its replicas ask for (a replica asking for a GPU that no node has waits forever, silently).
After starting: readiness is polled (`GET /readyz`), not guessed from log lines, and the URL with a
first request to try is printed once the server can make images. Ctrl-C stops `serve run`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from .config import check_serve_config

READY_TIMEOUT_S = 600


def gpus_on_this_machine() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def gpu_problems(config: dict, gpus: int) -> list[str]:
    """One line per deployment asking for more GPUs per replica than this machine has."""
    problems = []
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []):
            asked = (deployment.get("ray_actor_options") or {}).get("num_gpus", 0) or 0
            if asked > gpus:
                key = f"applications[{app.get('name', '?')}].{deployment.get('name')}.ray_actor_options.num_gpus"
                problems.append(
                    f"{key} asks for {asked:g} GPU per replica, and this machine has {gpus}: its replicas would "
                    "wait forever for one. On a machine without a GPU use configs/cpu-demo.yaml "
                    "(make serve CONFIG=configs/cpu-demo.yaml); on a cluster, `serve deploy` it where GPUs are."
                )
    return problems


def base_url(config: dict) -> str:
    http = config.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host == "0.0.0.0" else host
    return f"http://{host}:{http.get('port', 8000)}"


def wait_until_ready(url: str, server: subprocess.Popen) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serve_app.launch CONFIG", file=sys.stderr)
        return 2
    path = Path(args[0])
    config = yaml.safe_load(path.read_text())
    problems = check_serve_config(config) + gpu_problems(config, gpus_on_this_machine())
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    url = base_url(config)
    serve = Path(sys.executable).with_name("serve")
    command = [str(serve) if serve.exists() else "serve", "run", str(path)]
    print(f"Starting {path} ({' '.join(command)}); waiting until {url}/readyz answers ...", flush=True)
    server = subprocess.Popen(command, env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    try:
        if wait_until_ready(url, server):
            print(
                f"\nReady: {url}  (web page {url}/ , API docs {url}/docs)\n"
                f"Try:   curl -X POST {url}/generate -H 'Content-Type: application/json' "
                f'-d \'{{"prompt": "a lighthouse at dawn", "seed": 42}}\' -o image.png\n',
                flush=True,
            )
        elif server.poll() is None:
            print(f"{url}/readyz did not answer within {READY_TIMEOUT_S}s; see the log above", file=sys.stderr)
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        return server.wait()


if __name__ == "__main__":
    sys.exit(main())
